"""An image set from a prompt list, one generator per image; `torchrun --nproc_per_node N` shards it (see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # torchrun runs the file, not the package

from ldm.cli.sample_many import main  # noqa: E402

if __name__ == "__main__":
    main()
