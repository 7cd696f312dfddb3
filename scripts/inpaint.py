"""Repaint the white part of a mask: inpainting models as the demos they were released with, ordinary models as
masked img2img (see --help and ldm/inpaint.py)."""
from ldm.cli import inpaint_main

if __name__ == "__main__":
    inpaint_main()
