"""Regenerate an image from the generation parameters stored in its PNG (see --help)."""
from ldm.cli.rerun import main

if __name__ == "__main__":
    main()
