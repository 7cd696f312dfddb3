"""The demo world: a procedural text-image dataset (world.py) and a prompt-adherence evaluator (evaluate.py);
and where the shipped demo model lives in a checkout (the one home of these paths, for every script and test)."""

from pathlib import Path

from .evaluate import chance_rates, describe_image, evaluate_generator, evaluate_image, judge, score
from .world import (
    Attributes,
    TextImageWorld,
    all_attributes,
    batch,
    heldout_attributes,
    heldout_prompts,
    is_held_out,
    parse_prompt,
    render,
    sample,
    seen_prompts,
    to_uint8,
    train_attributes,
)

_ROOT = Path(__file__).resolve().parents[2]  # the repository root of an (editable) checkout
DEMO_CONFIG = _ROOT / "configs" / "demo" / "shapes-v1.yaml"
DEMO_CKPT = _ROOT / "checkpoints" / "demo" / "shapes-v1.safetensors"
DEMO_REPORT = _ROOT / "checkpoints" / "demo" / "train_report.json"
