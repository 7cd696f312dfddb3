"""Full-size key coverage: the loader's mapping of every key of real SD checkpoints (tests/fixtures/manifests/,
key -> shape of the released files) onto meta-device models built from the original configs. No weights."""

from pathlib import Path

import pytest

from ldm.config import load_config
from ldm.loader import EMA_BOOKKEEPING, UNET, plan_load
from ldm.models.latent_diffusion import build_model
from manifests import load_manifest

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "stable-diffusion"
# manifest -> configs whose models must take it (v2-inference.yaml differs from -v only in parameterization)
CASES = [
    ("v1-inference", "v1-inference"),
    ("v1-inpainting-inference", "v1-inpainting-inference"),
    ("v2-inpainting-inference", "v2-inpainting-inference"),
    ("v2-inference-v", "v2-inference-v"),
    ("v2-inference-v", "v2-inference"),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}->{c}" for m, c in CASES])
def case(request):
    manifest_name, config_name = request.param
    shapes = load_manifest(manifest_name)
    model = build_model(load_config(CONFIGS / f"{config_name}.yaml"), device="meta")
    return shapes, model


def _pruned(shapes):
    """An EMA-only release: the same keys minus model_ema.* except the bookkeeping (manifests/README.md)."""
    return {k: v for k, v in shapes.items() if not k.startswith("model_ema.") or k in EMA_BOOKKEEPING}


@pytest.mark.parametrize("variant", ["full", "pruned"])
@pytest.mark.parametrize("ema", [True, False], ids=["ema", "raw"])
def test_every_key_is_accounted_for(case, ema, variant):
    shapes, model = case
    if variant == "pruned":
        shapes = _pruned(shapes)
    plan = plan_load(model, shapes, ema=ema)
    assert plan.missing == [] and plan.unexpected == [] and plan.mismatched == []

    targets = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert set(plan.sources) == set(targets)  # every model tensor filled ...
    used = set(plan.sources.values())
    assert len(used) == len(targets)  # ... each from its own checkpoint key
    assert used.isdisjoint(plan.ignored) and used | set(plan.ignored) == set(shapes)  # ... the rest ignored by name
    assert plan.reshaped == set()  # the released files match their configs' layouts exactly
    for key, source in plan.sources.items():
        assert shapes[source] == targets[key], key

    has_ema = any(k.startswith("model_ema.diffusion_model") for k in shapes)
    assert plan.use_ema == (ema and has_ema)
    for key, source in plan.sources.items():
        if key.startswith(UNET):
            assert source.startswith("model_ema." if plan.use_ema else UNET), (key, source)
    # the ignore rules that fire are the expected ones, by name
    expected_rules = {"schedule buffer"}
    if any(k in shapes for k in EMA_BOOKKEEPING):
        expected_rules.add("EMA bookkeeping")
    if has_ema:
        expected_rules.add("raw UNet weight (EMA used)" if ema else "EMA UNet weight (ema=False)")
    if any(k.endswith("position_ids") for k in shapes) and not any(k.endswith("position_ids") for k in targets):
        expected_rules.add("CLIP position_ids")
    assert set(plan.ignored.values()) == expected_rules
