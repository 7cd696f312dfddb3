"""Regenerate an image from the generation parameters stored in its PNG (see --help)."""
from ldm.cli import rerun_main

if __name__ == "__main__":
    rerun_main()
