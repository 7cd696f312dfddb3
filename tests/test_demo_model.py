"""The shipped demo model (checkpoints/demo, configs/demo) still follows its prompts.

Loaded through ldm.load_model and sampled through the txt2img pipeline, as `make demo` does. Kept small (8
prompts, 10 DDIM steps); the full table is checkpoints/demo/scores.md (scripts/score_table.py).
"""

from pathlib import Path

import pytest
import torch

import ldm
from ldm.demo import world
from ldm.train.demo_eval import score_model

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/demo/shapes-v1.yaml"
CKPT = ROOT / "checkpoints/demo/shapes-v1.safetensors"
# The floor is well under the shipped model's measured score for these prompts and settings (7 of 8, 0.875,
# when it was shipped; 0.90 on 40 seen prompts at 25 steps, checkpoints/demo/scores.md): it allows two more
# misses, so it catches a broken load or sampler path, not a small regression. Chance for the whole prompt is
# about 1/(6*3*5*5) = 0.2%.
FLOOR = 0.6


@pytest.fixture(scope="module")
def model():
    return ldm.load_model(CONFIG, CKPT)


def test_shipped_files_fit_the_budget():
    total = sum(f.stat().st_size for f in CKPT.parent.iterdir() if f.is_file())
    assert total <= 25 * 10**6  # the 25 MB, read in decimal megabytes (the stricter reading)


def test_shipped_model_follows_seen_prompts(model):
    result = score_model(model, world.seen_prompts(8), sampler="ddim", steps=10)
    assert result["prompt_accuracy"] >= FLOOR, result


def test_shipped_weights_are_the_ema_export(model):
    # the pruned export keeps the EMA UNet in float16; loaded as float32 every value is a float16 number
    weight = model.unet.out[2].weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, weight.half().float())
