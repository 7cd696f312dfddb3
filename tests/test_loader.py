"""ldm/loader.py on tiny random checkpoints in the original layout (tests/tiny_models.py)."""

import dataclasses
import functools
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm.checkpoint import CheckpointError, UnsafeCheckpointError
from ldm.config import load_config
from ldm.loader import CLIP_NEW, CLIP_OLD, UNET, VAE
from ldm.models.latent_diffusion import build_model
# ema_key: the test's own copy of LitEma's naming (tests/tiny_models.py), not the loader's function under test
from tiny_models import ema_key, make_tiny_checkpoint, schedule_buffers, tiny_config_path, tiny_state_dict

V1 = tiny_config_path("tiny-v1")


@pytest.fixture(scope="module")
def v1_state():
    return tiny_state_dict(V1, seed=0, ema=True)


@pytest.fixture(scope="module")
def v1_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(V1, tmp_path_factory.mktemp("v1") / "tiny-v1.ckpt", seed=0, ema=True)


def _save(tmp_path, state, name="variant.ckpt"):
    path = tmp_path / name
    torch.save({"state_dict": state, "global_step": 0}, path)
    return path


def _load(path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ldm.load_model(V1, path, **kwargs)
    return model, [str(w.message) for w in caught]


def _assert_weights(model, expected):
    """Every model tensor equals `expected[key]` (in the model's dtype), exactly."""
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in state.items():
        assert torch.equal(value, expected[key].to(value.dtype)), key


@functools.cache
def _model_keys():
    return tuple(build_model(load_config(V1), device="meta").state_dict())


def _expected(state, ema):
    """For every model key, the value a correct loader picks from an original-layout state dict."""
    model_keys = _model_keys()
    return {key: state[ema_key(key)] if ema and key.startswith(UNET) else state[key] for key in model_keys}


def test_ema_weights_by_default(v1_ckpt, v1_state):
    model, messages = _load(v1_ckpt)
    assert messages == []  # a consistent checkpoint loads silently
    _assert_weights(model, _expected(v1_state, ema=True))
    unet_key = "model.diffusion_model.out.2.weight"  # EMA and raw differ in the file, so this can fail
    assert not torch.equal(v1_state[unet_key], v1_state[ema_key(unet_key)])
    assert torch.equal(model.state_dict()[unet_key], v1_state[ema_key(unet_key)])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model.alphas_cumprod, schedule_buffers(model.config)["alphas_cumprod"])


def test_ema_false_gives_raw_weights(v1_ckpt, v1_state):
    model, _ = _load(v1_ckpt, ema=False)
    _assert_weights(model, _expected(v1_state, ema=False))


def test_pruned_file_uses_what_is_there(tmp_path, v1_state):
    # EMA-only release: no model_ema.<param>, EMA folded into model.diffusion_model.*, bookkeeping kept
    pruned = {k: v for k, v in v1_state.items() if not k.startswith("model_ema.")}
    pruned.update({k: v1_state[k] for k in ("model_ema.decay", "model_ema.num_updates")})
    model, messages = _load(_save(tmp_path, pruned))
    assert messages == []
    _assert_weights(model, _expected(v1_state, ema=False))


def test_partial_ema_is_an_error(tmp_path, v1_state):
    broken = dict(v1_state)
    del broken["model_ema.diffusion_modelout2weight"]
    with pytest.raises(CheckpointError, match=r"1 missing \(first: model.diffusion_model.out.2.weight "
                                              r"\(as model_ema.diffusion_modelout2weight\)"):
        ldm.load_model(V1, _save(tmp_path, broken))


def test_old_clip_layout_without_text_model(tmp_path, v1_state):
    old = {(CLIP_OLD + k[len(CLIP_NEW):] if k.startswith(CLIP_NEW) else k): v for k, v in v1_state.items()}
    assert not any(k.startswith(CLIP_NEW) for k in old)
    model, messages = _load(_save(tmp_path, old))
    assert messages == []
    _assert_weights(model, _expected(v1_state, ema=True))


def test_missing_and_unexpected_keys_are_listed(tmp_path, v1_state):
    broken = dict(v1_state)
    del broken["first_stage_model.decoder.conv_out.bias"]
    broken["first_stage_model.decoder.conv_extra.weight"] = torch.zeros(3)
    broken["model.diffusion_model.bogus"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        ldm.load_model(V1, _save(tmp_path, broken))
    message = str(info.value)
    assert "\n" not in message and "variant.ckpt" in message
    assert "1 missing (first: first_stage_model.decoder.conv_out.bias)" in message
    assert "2 unexpected (first: first_stage_model.decoder.conv_extra.weight, model.diffusion_model.bogus)" \
        in message


def test_shape_mismatch_is_listed(tmp_path, v1_state):
    broken = dict(v1_state)
    broken["first_stage_model.quant_conv.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"1 shape mismatch \(first: first_stage_model.quant_conv.bias: "
                                              r"model \[8\] vs file \[5\]\)"):
        ldm.load_model(V1, _save(tmp_path, broken))


@pytest.mark.parametrize("name", ["alphas_cumprod", "betas"])
def test_schedule_mismatch_warns(tmp_path, v1_state, name):
    # a v2-like beta range (linear_end 0.02 instead of 0.012) changes both buffers visibly
    other = schedule_buffers(dataclasses.replace(load_config(V1), linear_end=0.02))
    changed = {**v1_state, name: other[name]}
    _, messages = _load(_save(tmp_path, changed))
    assert len(messages) == 1 and f"stored {name} differs from the config's schedule" in messages[0]


def test_non_arange_position_ids_warn(tmp_path, v1_state):
    key = CLIP_NEW + "embeddings.position_ids"
    changed = {**v1_state, key: v1_state[key].flip(-1)}
    _, messages = _load(_save(tmp_path, changed))
    assert len(messages) == 1 and "position_ids is not 0..76" in messages[0]


def test_fp16_file_gives_float32_model(tmp_path, v1_state):
    # as make_tiny_checkpoint(fp16=True): every float tensor in fp16, integer buffers unchanged
    half = {k: v.half() if v.is_floating_point() else v for k, v in v1_state.items()}
    model, messages = _load(_save(tmp_path, half))
    assert messages == []  # fp16 schedule buffers are within the fp16 tolerance of check_schedule
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_weights(model, {k: v.float() for k, v in _expected(half, ema=True).items()})


def test_requested_dtype_is_applied(v1_ckpt, v1_state):
    model, _ = _load(v1_ckpt, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.alphas_cumprod.dtype == torch.float32  # the schedule stays float32 (build_model)
    _assert_weights(model, {k: v.to(torch.bfloat16) for k, v in _expected(v1_state, ema=True).items()})


def test_safetensors_and_ckpt_give_identical_weights(tmp_path, v1_ckpt, v1_state):
    path = tmp_path / "tiny-v1.safetensors"  # the flat layout make_tiny_checkpoint writes for .safetensors
    save_file(v1_state, str(path))
    from_ckpt, _ = _load(v1_ckpt)
    from_safetensors, _ = _load(path)
    _assert_weights(from_safetensors, from_ckpt.state_dict())


def test_legacy_format_and_linear_shaped_projection(tmp_path, v1_state):
    # a v1 (1x1 conv) proj_in stored with a linear (out, in) shape is reshaped back
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert v1_state[ema_key(key)].shape[-2:] == (1, 1)
    linear = {**v1_state, ema_key(key): v1_state[ema_key(key)].flatten(1)}
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": linear}, path, _use_new_zipfile_serialization=False)
    model, _ = _load(path)
    _assert_weights(model, _expected(v1_state, ema=True))


def test_standalone_vae_replaces_vae(tmp_path, v1_ckpt, v1_state):
    # as vae-ft-mse-840000-ema-pruned.ckpt: bare AutoencoderKL keys, its loss module, LitEma bookkeeping
    other = {k: v + 1 for k, v in v1_state.items() if k.startswith(VAE)}  # differs from the checkpoint's VAE
    vae = {k[len(VAE):]: v for k, v in other.items()}
    vae.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4),
                "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)})
    vae_path = tmp_path / "vae.safetensors"
    save_file(vae, str(vae_path))
    model, _ = _load(v1_ckpt, vae_path=vae_path)
    expected = _expected(v1_state, ema=True)
    expected.update(other)
    _assert_weights(model, expected)

    vae["decoder.extra.weight"] = torch.zeros(1)  # not a VAE key, not on the ignore list
    save_file(vae, str(vae_path))
    with pytest.raises(CheckpointError, match="1 unexpected \\(first: first_stage_model.decoder.extra.weight\\)"):
        ldm.load_model(V1, v1_ckpt, vae_path=vae_path)


def test_tiny_v2_openclip_layout(tmp_path):
    config = tiny_config_path("tiny-v2")
    state = tiny_state_dict(config, seed=0, ema=False)  # incl. open_clip's logit_scale, text_projection
    save_file(state, str(tmp_path / "v2.safetensors"))
    model = ldm.load_model(config, tmp_path / "v2.safetensors")
    loaded = model.state_dict()
    assert set(loaded) <= set(state)
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_hostile_checkpoint_is_refused_by_load_model(tmp_path, v1_state):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": v1_state, "callbacks": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        ldm.load_model(V1, path)
    assert not marker.exists()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nope.ckpt: checkpoint not found"):
        ldm.load_model(V1, tmp_path / "nope.ckpt")


def test_training_state_keys_are_ignored(tmp_path, v1_state):
    # Regression: a LatentDiffusion trained with scale_by_std stores a `scale_factor` buffer, learn_logvar a
    # `logvar` parameter, a VAE trained inside it `first_stage_model.loss.*`; the original's inference loads
    # with strict=False and ignores them (scale_factor then comes from the yaml, as here).
    state = dict(v1_state, scale_factor=torch.tensor(0.5), logvar=torch.zeros(1000))
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    model, messages = _load(_save(tmp_path, state))
    assert messages == [] and model.scale_factor == load_config(V1).scale_factor
    _assert_weights(model, _expected(v1_state, ema=True))


def test_config_the_modules_refuse_names_the_config(tmp_path, v1_ckpt):
    # Regression: options the yaml parser accepts but the modules refuse (an unsupported UNet option, a
    # GroupNorm-incompatible width) used to surface as bare errors without the file name
    for old, new in [("        legacy: False", "        legacy: False\n        use_scale_shift_norm: True"),
                     ("        model_channels: 32", "        model_channels: 48")]:
        path = tmp_path / "refused.yaml"
        path.write_text(V1.read_text().replace(old, new, 1))
        with pytest.raises(ValueError, match="cannot build the model") as info:
            ldm.load_model(path, v1_ckpt)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_ema_key_is_litemas_naming():
    # ldm/modules/ema.py LitEma: buffers named after the parameter path without dots, saved under model_ema;
    # the literal key is the one in every released full-EMA checkpoint (tests/fixtures/manifests/v1-inference)
    from ldm.loader import ema_key as loader_ema_key

    assert loader_ema_key("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight") == \
        "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_kweight"
