"""Text to image, with the flags and defaults of CompVis/stable-diffusion scripts/txt2img.py (see --help)."""
from ldm.cli import txt2img_main

if __name__ == "__main__":
    txt2img_main()
