"""Regenerate an image from the generation parameters stored in its PNG (see --help)."""
import sys

try:  # Ctrl-C while torch is being imported ends as it does later (ldm/cli/interrupt.py): one line, status 130
    from ldm.cli.rerun import main
except KeyboardInterrupt:
    sys.stderr.write("rerun.py: interrupted before the run started; nothing was written\n")
    sys.exit(130)

if __name__ == "__main__":
    main()
