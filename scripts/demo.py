"""The README's main command. Until the demo model is trained and shipped it prints the txt2img usage."""
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    script = Path(__file__).resolve().parent / "txt2img.py"
    sys.exit(subprocess.call([sys.executable, str(script), "--help"]))
