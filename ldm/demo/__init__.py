"""The demo world: a procedural text-image dataset (world.py) and a prompt-adherence evaluator (evaluate.py)."""

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
