"""LatentDiffusion assembly: full-size key layout and sizes (meta device), schedule, tiny random models."""

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.config import load_config
from ldm.models.latent_diffusion import build_model
from manifests import load_manifest
from tiny_models import (  # tests/ is on sys.path under pytest's default (prepend) import mode
    SCHEDULE_KEYS, TINY_CONFIGS, ema_key, make_tiny_checkpoint, model_state_dict, random_tensor, schedule_buffers,
    tiny_config_path, tiny_model, tiny_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
# Keys the original checkpoint stores that our model does not own (the loader accounts for them by name).
EXTRA_NAMES = ("embeddings.position_ids", "model.logit_scale", "model.text_projection")


def _manifest(name):
    return load_manifest(name)  # key -> shape of the real checkpoint (tests/fixtures/manifests/README.md)


def _is_extra(key):
    return key.startswith("model_ema.") or key in SCHEDULE_KEYS or key.endswith(EXTRA_NAMES)


def _numel(shapes, prefix):
    return sum(math.prod(s) for k, s in shapes.items() if k.startswith(prefix) and not _is_extra(k))


@functools.lru_cache(maxsize=None)
def _full_model(name):
    return build_model(load_config(ROOT / "configs" / "stable-diffusion" / f"{name}.yaml"), device="meta")


@pytest.fixture(scope="module", params=["v1-inference", "v1-inpainting-inference", "v2-inference-v"])
def full(request):
    return request.param, _full_model(request.param)


def test_full_size_meta_model_has_the_checkpoint_keys_and_shapes(full):
    name, model = full
    manifest = _manifest(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: s for k, s in manifest.items() if not _is_extra(k)}
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(manifest)) == []
    assert {k: ours[k] for k in expected} == expected
    # our model may own some text extras (e.g. open_clip's text_projection); then the shapes agree too
    assert all(ours[k] == manifest[k] for k in ours)


def test_full_size_meta_model_allocates_nothing_and_has_the_real_parameter_counts(full):
    name, model = full
    manifest = _manifest(name)
    assert all(p.is_meta for p in model.parameters())
    counts = {
        "unet": sum(p.numel() for p in model.unet.parameters()),
        "vae": sum(p.numel() for p in model.vae.parameters()),
        "text": sum(p.numel() for k, p in model.cond_stage_model.named_parameters(prefix="cond_stage_model")
                    if not _is_extra(k)),
    }
    assert counts == {
        "unet": _numel(manifest, "model.diffusion_model."),
        "vae": _numel(manifest, "first_stage_model."),
        "text": _numel(manifest, "cond_stage_model."),
    }
    # The manifests agree with the sizes the original prints ("DiffusionWrapper has 859.52 M params.",
    # count_params in ldm/util.py) and the published model cards (VAE 83.65M, CLIP ViT-L/14 text 123.06M).
    published = {"v1-inference": (859_520_964, 83_653_863, 123_060_480),
                 "v1-inpainting-inference": (859_535_364, 83_653_863, 123_060_480),
                 "v2-inference-v": (865_910_724, 83_653_863, None)}[name]
    assert counts["unet"] == published[0] and counts["vae"] == published[1]
    assert published[2] is None or counts["text"] == published[2]
    # the schedule is real even in a meta build (not in the state_dict, so no loader would restore it)
    assert model.alphas_cumprod.device.type == "cpu" and model.alphas_cumprod.shape == (1000,)


def test_alphas_cumprod_matches_the_original_formula():
    # independent float64 computation: ddpm.py register_schedule with make_beta_schedule("linear")
    cfg = load_config(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    expected = np.cumprod(1.0 - betas)
    model = build_model(cfg, device="meta", dtype=torch.float16)
    ac = model.alphas_cumprod
    assert ac.dtype == torch.float32 and not ac.is_meta
    # float64 -> float32 rounding only: relative error <= 2**-24 ~ 6e-8; 1e-7 leaves room for the last-bit
    # differences of torch.linspace vs np.linspace in float64 (~1e-16)
    np.testing.assert_allclose(ac.numpy(), expected, rtol=1e-7, atol=0)
    assert ac[0].item() == np.float32(1 - 0.00085)  # exact: first step is 1 - linear_start
    # the same buffers as the tiny checkpoint writer's (its own numpy float64 code)
    np.testing.assert_allclose(ac.numpy(), schedule_buffers(cfg)["alphas_cumprod"].numpy(), rtol=1e-7)


def test_cosine_schedule_takes_cosine_s():
    # Regression: beta_schedule "cosine" (ddpm.py register_schedule -> util.py make_beta_schedule, Nichol &
    # Dhariwal 2021 eq. 17 with offset cosine_s, betas clipped to [0, 0.999]) used to be refused by the config
    cfg = dataclasses.replace(load_config(tiny_config_path("tiny-v1")), beta_schedule="cosine", cosine_s=0.02)
    steps = np.arange(1001, dtype=np.float64) / 1000 + 0.02
    alphas = np.cos(steps / 1.02 * np.pi / 2) ** 2
    betas = np.clip(1 - (alphas / alphas[0])[1:] / (alphas / alphas[0])[:-1], 0, 0.999)
    ac = build_model(cfg, device="meta").alphas_cumprod
    # float64 -> float32 rounding only (2**-24 relative), as the linear case above
    np.testing.assert_allclose(ac.numpy(), np.cumprod(1.0 - betas), rtol=1e-7, atol=1e-30)


def test_build_model_dtype_and_grad_flags():
    cfg = load_config(tiny_config_path("tiny-v1"))
    model = build_model(cfg, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.alphas_cumprod.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
    assert all(p.requires_grad for p in model.unet.parameters())  # trainable, as in the original


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_apply_model_is_the_unet_under_the_conditioning_route(name):
    """apply_model routes a conditioning dict to the UNet exactly as ddpm.py DiffusionWrapper: the context
    from c_crossattn (list entries concatenated on the token axis), the inpainting channels appended to x,
    nothing else; and every input it routes changes the output (none is dropped on the way)."""
    model = tiny_model(tiny_config_path(name), seed=0)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    hybrid = cfg.conditioning_key == "hybrid"
    with torch.no_grad():
        context = model.encode_text(["a photograph of an astronaut riding a horse", ""])
        assert context.shape == (2, 77, cfg.unet.context_dim)
        x = torch.randn(2, 4, 16, 16, generator=gen)
        t = torch.tensor([999, 1])
        c_concat = torch.randn(2, 5, 16, 16, generator=gen) if hybrid else None
        cond = {"c_crossattn": [context[:, :40], context[:, 40:]], "c_concat": [c_concat] if hybrid else None}
        out = model.apply_model(x, t, cond)
        unet_in = torch.cat([x, c_concat], dim=1) if hybrid else x
        assert torch.equal(out, model.unet(unet_in, t, context))
        assert torch.equal(out, model.apply_model(x, t, context, c_concat=c_concat))  # the keyword form
        # unit-scale weights keep activations O(1): neither vanishing nor exploding (loose by design)
        assert 0.05 < out.std().item() < 20, out.std()
        for changed in ({"c_crossattn": [context.flip(0)]}, {"t": torch.tensor([500, 2])},
                        {"c_concat": [c_concat.flip(0)]} if hybrid else {}):
            if changed:
                args = {"c_crossattn": [context], "c_concat": [c_concat] if hybrid else None, "t": t, **changed}
                other = model.apply_model(x, args.pop("t"), args)
                assert (other - out).abs().max() > 1e-3, changed
        with pytest.raises(ValueError, match="needs c_concat" if hybrid else "conditioning_key is 'crossattn'"):
            model.apply_model(x, t, context, c_concat=None if hybrid else torch.zeros(2, 5, 16, 16))
        images = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
        z = model.vae.encode(images).mode()
        assert z.shape == (1, 4, 16, 16)  # f = 2 (ch_mult [1, 2])
        assert model.vae.decode(z).shape == images.shape


def test_tiny_weights_depend_on_key_and_seed_only():
    v1 = model_state_dict(load_config(tiny_config_path("tiny-v1")), seed=0)
    inpaint = model_state_dict(load_config(tiny_config_path("tiny-v1-inpainting")), seed=0)
    other_seed = model_state_dict(load_config(tiny_config_path("tiny-v1")), seed=1)
    key = "first_stage_model.encoder.conv_in.weight"
    assert torch.equal(v1[key], inpaint[key]) and not torch.equal(v1[key], other_seed[key])
    # the 9-channel input conv has a different shape, hence different values
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    assert v1[conv_in].shape == (32, 4, 3, 3) and inpaint[conv_in].shape == (32, 9, 3, 3)
    assert torch.equal(v1[key], random_tensor(key, (32, 3, 3, 3), 0))
    # fan-in scaling and norm/bias rules
    assert abs(v1[conv_in].std().item() * math.sqrt(4 * 9) - 1) < 0.2  # 1152 samples: std error ~2%
    norm = v1["first_stage_model.encoder.norm_out.weight"]
    assert (norm - 1).abs().max() < 0.6 and v1["first_stage_model.encoder.norm_out.bias"].abs().max() < 0.3


@pytest.mark.parametrize("name, manifest_name, ema", [
    ("tiny-v1", "v1-inference", True), ("tiny-v1-inpainting", "v1-inpainting-inference", True),
    ("tiny-v2-v", "v2-inference-v", False),
])
def test_tiny_checkpoint_has_the_original_layout(tmp_path, name, manifest_name, ema):
    path = make_tiny_checkpoint(tiny_config_path(name), tmp_path / "tiny.ckpt", seed=3, ema=ema)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict", "global_step"}
    state = ckpt["state_dict"]
    model = build_model(load_config(tiny_config_path(name)), device="meta")
    own = set(model.state_dict())
    assert own <= set(state)
    # what the checkpoint holds beyond our model: exactly the kinds of keys the real checkpoint holds
    manifest = _manifest(manifest_name)
    real_full = _full_model(manifest_name)

    def kinds(keys, owned):
        return {"model_ema.<unet>" if k.startswith("model_ema.diffusion_model") else k for k in keys - owned}
    assert kinds(set(state), own) == kinds(set(manifest), set(real_full.state_dict()))
    unet_keys = [k for k in own if k.startswith("model.diffusion_model.")]
    if ema:
        assert len([k for k in state if k.startswith("model_ema.")]) == len(unet_keys) + 2
        for k in unet_keys:
            assert state[ema_key(k)].shape == state[k].shape and not torch.equal(state[ema_key(k)], state[k])
    raw = model_state_dict(model.config, seed=3)  # what tiny_model loads
    assert set(raw) == own and all(torch.equal(state[k], raw[k]) for k in own)


def test_tiny_checkpoint_safetensors_and_fp16(tmp_path):
    from safetensors.torch import load_file

    config = tiny_config_path("tiny-v2")
    ref = tiny_state_dict(config, seed=0)
    flat = load_file(make_tiny_checkpoint(config, tmp_path / "tiny.safetensors"))
    assert set(flat) == set(ref) and all(torch.equal(flat[k], ref[k]) for k in ref)
    half = torch.load(make_tiny_checkpoint(config, tmp_path / "half.ckpt", fp16=True), weights_only=True)
    half = half["state_dict"]
    assert {v.dtype for k, v in half.items() if k != "model_ema.num_updates"} == {torch.float16}
    assert half["model_ema.num_updates"].dtype == torch.int32
    assert torch.equal(half["betas"], ref["betas"].half())


def test_original_cond_forms_and_first_stage_helpers():
    # Regression: ddpm.py LatentDiffusion.apply_model takes `cond` as a tensor, a list (concatenated along
    # dim 1 by DiffusionWrapper) or the inpainting dict {"c_concat": [...], "c_crossattn": [...]}; and the
    # original's first-stage helpers (decode_first_stage multiplies by 1. / scale_factor, which rounds
    # differently from dividing) are available under their names.
    model = tiny_model(tiny_config_path("tiny-v1-inpainting"), seed=0)
    gen = torch.Generator().manual_seed(0)
    x, mask, masked = (torch.randn(2, c, 8, 8, generator=gen) for c in (4, 1, 4))
    context, t = torch.randn(2, 77, model.config.unet.context_dim, generator=gen), torch.tensor([5, 700])
    with torch.no_grad():
        expected = model.apply_model(x, t, context, c_concat=torch.cat([mask, masked], dim=1))
        as_dict = model.apply_model(x, t, {"c_concat": [mask, masked], "c_crossattn": [context]})
        as_sgm = model.apply_model(x, t, {"concat": torch.cat([mask, masked], dim=1), "crossattn": context})
        with pytest.raises(ValueError, match="unknown conditioning 'c_adm'"):
            model.apply_model(x, t, {"c_crossattn": [context], "c_adm": [t]})
        with pytest.raises(ValueError, match="given twice"):
            model.apply_model(x, t, {"c_crossattn": [context], "crossattn": context})
        z = torch.randn(1, 4, 8, 8, generator=gen)
        decoded = model.decode_first_stage(z)
        posterior = model.encode_first_stage(decoded)
    assert torch.equal(as_dict, expected) and torch.equal(as_sgm, expected)
    assert torch.equal(decoded, model.vae.decode(1.0 / model.scale_factor * z))
    assert torch.equal(model.get_first_stage_encoding(posterior, torch.Generator().manual_seed(3)),
                       model.scale_factor * posterior.sample(torch.Generator().manual_seed(3)))
    assert torch.equal(model.get_first_stage_encoding(z), model.scale_factor * z)
    assert torch.equal(model.get_learned_conditioning(["a horse"]), model.encode_text(["a horse"]))
