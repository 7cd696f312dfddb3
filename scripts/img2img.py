"""Variations of an input image, with the flags and defaults of CompVis/stable-diffusion scripts/img2img.py (see --help)."""
import sys

try:  # Ctrl-C while torch is being imported ends as it does later (ldm/cli/interrupt.py): one line, status 130
    from ldm.cli import img2img_main
except KeyboardInterrupt:
    sys.stderr.write("img2img.py: interrupted before the run started; nothing was written\n")
    sys.exit(130)

if __name__ == "__main__":
    img2img_main()
