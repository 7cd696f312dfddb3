"""The command line: scripts/txt2img.py, img2img.py, inpaint.py and rerun.py, one concept per module.

- flags.py: the parser (the original scripts' flags and defaults, plus ours),
- inputs.py: validation of the flags, reading prompts and the init image, checks against the loaded model,
- run.py: load, sample through ldm.pipeline, write numbered PNGs with their parameters,
- record.py: options <-> the PNG `parameters` text,
- rerun.py: regenerate an image from its PNG,
- inpaint.py: what inpaint.py adds (the mask, its checks, ldm/inpaint.py's batches).
- sample_many.py: image sets with one generator per image, sharded over torchrun processes (ldm/image_set.py).

The command line only parses, validates and writes files: batching and randomness are ldm.pipeline's.
"""

from ldm.cli.flags import CLIError, Parser, add_model_flags, build_parser
from ldm.cli.inputs import resolve_device, sampler_name
from ldm.cli.run import GRID_NAME, SAMPLE_NAME, errors_as_one_line, img2img_main, inpaint_main, load, txt2img_main

__all__ = ["CLIError", "Parser", "add_model_flags", "build_parser", "resolve_device", "sampler_name", "GRID_NAME",
           "SAMPLE_NAME", "errors_as_one_line", "img2img_main", "inpaint_main", "load", "txt2img_main"]
