"""Variations of an input image, with the flags and defaults of CompVis/stable-diffusion scripts/img2img.py (see --help)."""
from ldm.cli import img2img_main

if __name__ == "__main__":
    img2img_main()
