"""The shipped demo model (checkpoints/demo, configs/demo) still follows its prompts.

Loaded through ldm.load_model and sampled through the txt2img pipeline, as `make demo` does. Kept small (8
prompts per split, 10 DDIM steps); the full table is checkpoints/demo/scores.md (scripts/score_table.py).
"""

import json

import pytest
import torch

import ldm
from ldm.demo import DEMO_CKPT as CKPT
from ldm.demo import DEMO_CONFIG as CONFIG
from ldm.demo import world
from ldm.train.demo_eval import score_model
# Floors well under the shipped model's measured scores for these prompts and settings (ddim 10 steps, seed 0,
# guidance 2: 8 of the first 8 seen prompts and 8 of the first 8 held-out ones when it was shipped;
# checkpoints/demo/scores.md and scores-seeds01.md hold the 40-prompt tables): two misses more are allowed, so
# the tests catch a broken load or sampler path, or a model that no longer composes, not one unlucky image.
# Chance for a whole prompt is 1/8 on 8 distinct prompts (evaluate.chance_rates).
FLOOR = 0.75
HELD_OUT_FLOOR = 0.75


@pytest.fixture(scope="module")
def model():
    return ldm.load_model(CONFIG, CKPT)


def test_shipped_files_fit_the_budget():
    total = sum(f.stat().st_size for f in CKPT.parent.iterdir() if f.is_file())
    assert total <= 25 * 10**6  # the 25 MB, read in decimal megabytes (the stricter reading)


def test_shipped_model_follows_seen_prompts(model):
    result = score_model(model, world.seen_prompts(8), sampler="ddim", steps=10)
    assert result["prompt_accuracy"] >= FLOOR, result


def test_shipped_model_composes_held_out_pairs(model):
    # the first 8 held-out prompts: round-robin over the 5 held-out pairings (issue 21's goal is >= 0.70 on 40)
    result = score_model(model, world.heldout_prompts(8), sampler="ddim", steps=10)
    assert result["prompt_accuracy"] >= HELD_OUT_FLOOR, result


def test_shipped_weights_are_the_ema_export(model):
    # ldm/train/checkpoint_io.export_pruned records which UNet weights it exported ("ema": "True" only when the
    # EMA shadows of the training checkpoint were folded in) and the training step; a raw export says "False"
    from safetensors import safe_open

    with safe_open(str(CKPT), "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    report = json.loads((CKPT.parent / "train_report.json").read_text())
    assert metadata["ema"] == "True"
    assert int(metadata["global_step"]) == report["diffusion"]["steps"]
    assert not any(k.startswith("model_ema.") for k in keys)  # pruned: the shadows are folded, not kept
    # the pruned export keeps the EMA UNet in float16; loaded as float32 every value is a float16 number
    weight = model.unet.out[2].weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, weight.half().float())
