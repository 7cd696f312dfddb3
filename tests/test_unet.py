"""UNet and attention: full-size key layout, parity with diffusers on tiny configs, backend agreement.

Fixtures tests/fixtures/unet_*.safetensors come from tests/make_fixtures_unet.py (diffusers'
UNet2DConditionModel loaded through diffusers' own converter of original checkpoints, or for the structures
diffusers cannot express the original Stability-AI openaimodel.py itself; the reference and versions are in
each file's metadata). Nothing here imports a reference package.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ldm.config import UNetConfig, load_config
from ldm.models.attention import ATTENTION_BACKENDS, CrossAttention, SpatialTransformer, set_attention_backend
from ldm.models.unet import ResBlock, UNetModel, attention_heads, timestep_embedding
from manifests import load_manifest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
PREFIX = "model.diffusion_model."
CASES = ("v1", "v2", "inpaint", "tiny_v2", "multilevel")

# float32 on CPU, same weights and inputs, different operation order (diffusers pre-scales the query and
# uses baddbmm, adds residuals and biases in other places): each op is within a few float32 ulps
# (eps 1.2e-7) and ~25 layers accumulate them; measured max abs error / max |output| is 0.8e-6 .. 1.6e-6
# (outputs of size ~2). 1e-5 leaves room for other BLAS/thread counts while any real mismatch (a wrong
# head split, cos/sin order, a missing residual or norm eps) gives errors of order 1e-3 .. 1.
PARITY_RTOL = 1e-5


def decode_weights(packed, scales, offsets, keys) -> dict[str, torch.Tensor]:
    # As make_fixtures_unet.decode_weights: two integer codes per byte, weight = code * scale + offset.
    nibbles = torch.stack([packed & 15, packed >> 4], dim=1).flatten()
    codes = nibbles.to(torch.float32) - 8
    out, start = {}, 0
    for i, (key, shape) in enumerate(keys):
        n = math.prod(shape)
        out[key] = codes[start:start + n].reshape(shape) * scales[i] + offsets[i]
        start += n
    return out


def unet_config(params: dict) -> UNetConfig:
    return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


@functools.lru_cache(maxsize=None)
def _read_fixture(name: str):
    path = FIXTURES / f"unet_{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    keys = [(k, tuple(s)) for k, s in json.loads(meta["weights"])]
    weights = decode_weights(t["weights_packed"], t["weights_scale"], t["weights_offset"], keys)
    state = {k[len(PREFIX):]: w for k, w in weights.items()}
    return unet_config(json.loads(meta["unet_params"])), state, t


def load_case(name: str):
    """A fresh UNet with the fixture's weights (built on meta, so no time goes into discarded init)."""
    cfg, state, t = _read_fixture(name)
    with torch.device("meta"):
        model = UNetModel(cfg)
    model.load_state_dict({k: w.clone() for k, w in state.items()}, strict=True, assign=True)
    return model.eval(), t


def max_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|); the relative error is normwise, as elementwise
    ratios blow up at outputs near zero."""
    err = (out - ref).abs().max().item()
    return err, err / ref.abs().max().item()


# ---------------------------------------------------------------------------------------- full size

FULL_SIZE = [("v1-inference", "v1-inference"), ("v1-inpainting-inference", "v1-inpainting-inference"),
             ("v2-inference-v", "v2-inference-v"), ("v2-inference", "v2-inference-v"),
             ("v2-inpainting-inference", "v2-inpainting-inference")]


@pytest.mark.parametrize("config_name,manifest_name", FULL_SIZE)
def test_full_size_keys_and_shapes_equal_manifest(config_name, manifest_name):
    config = REPO / "configs" / "stable-diffusion" / f"{config_name}.yaml"
    want = {k[len(PREFIX):]: s for k, s in load_manifest(manifest_name).items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = UNetModel(load_config(config).unet)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(got.keys() - want.keys()) == [] and sorted(want.keys() - got.keys()) == []
    assert {k: s for k, s in got.items() if s != want[k]} == {}
    assert len(want) > 0


def test_head_count_v1_fixed_heads_v2_fixed_width():
    v1 = load_config(REPO / "configs/stable-diffusion/v1-inference.yaml").unet
    v2 = load_config(REPO / "configs/stable-diffusion/v2-inference-v.yaml").unet
    assert [attention_heads(v1, ch) for ch in (320, 640, 1280)] == [(8, 40), (8, 80), (8, 160)]
    assert [attention_heads(v2, ch) for ch in (320, 640, 1280)] == [(5, 64), (10, 64), (20, 64)]
    # legacy recomputes the width from the count: ch // (ch // 48) for ch=320 is 320 // 6 = 53, not 48
    legacy = dataclasses.replace(v2, num_head_channels=48, legacy=True)
    assert attention_heads(legacy, 320) == (6, 53)
    assert attention_heads(dataclasses.replace(legacy, legacy=False), 320) == (6, 48)


def test_norm_epsilons_are_the_originals():
    # A wrong eps shifts outputs by only ~(eps difference) / variance, ~3e-6 relative on the parity cases,
    # under PARITY_RTOL; so check the values themselves. Sources: diffusionmodules/util.py normalization
    # (GroupNorm32(32, ch), torch default eps 1e-5), attention.py Normalize (GroupNorm eps 1e-6) and
    # BasicTransformerBlock (nn.LayerNorm, default eps 1e-5).
    model, _ = load_case("v1")
    eps = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            kind = "transformer_group" if name.endswith(".norm") else type(m).__name__
            eps.setdefault(kind, set()).add(m.eps)
    assert eps == {"GroupNorm32": {1e-5}, "transformer_group": {1e-6}, "LayerNorm": {1e-5}}


# ------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("timesteps", ["int", "frac"])
def test_parity_with_reference(name, timesteps):
    model, t = load_case(name)
    assert t[f"t_{timesteps}"].dtype == (torch.int64 if timesteps == "int" else torch.float32)
    with torch.no_grad():
        out = model(t["x"], t[f"t_{timesteps}"], t["context"])
    ref = t[f"out_{timesteps}"]
    assert out.shape == ref.shape and out.dtype == torch.float32
    abs_err, rel_err = max_errors(out, ref)
    print(f"unet parity {name} t={timesteps}: max abs {abs_err:.3g}, max rel {rel_err:.3g}")
    assert rel_err < PARITY_RTOL


def test_fixtures_are_sensitive_to_timesteps_and_match_the_shared_tiny_config():
    # Guards against vacuous parity: the reference output must depend on t (it would not if every
    # GroupNorm group held one channel, as in a 32-channel one-level net) ...
    for name in CASES:
        _, _, t = _read_fixture(name)
        assert max_errors(t["out_frac"], t["out_int"])[1] > 1e-2, name
    # ... and the tiny_v2 case must still be the UNet of the shared tiny yaml the other tests use.
    cfg, _, _ = _read_fixture("tiny_v2")
    shared = load_config(REPO / "tests" / "configs" / "tiny-v2.yaml").unet
    assert cfg == shared


def test_attention_backends_agree():
    # v2 case: self- and cross-attention at two widths (2 and 4 heads), 16 and 64 query rows
    model, t = load_case("v2")
    outs = {}
    for backend in ATTENTION_BACKENDS:
        # slice_size 7 divides neither 16 nor 64 query rows, so a ragged last chunk is exercised
        set_attention_backend(model, backend, slice_size=7)
        assert all(m.backend == backend for m in model.modules() if isinstance(m, CrossAttention))
        with torch.no_grad():
            outs[backend] = model(t["x"], t["t_int"], t["context"])
    # the same float32 math in a different order (fused kernel vs explicit matmul/softmax), as for parity
    for backend in ("sdpa", "sliced"):
        assert max_errors(outs[backend], outs["math"])[1] < PARITY_RTOL, backend
    assert max_errors(outs["math"], t["out_int"])[1] < PARITY_RTOL


def test_unknown_backend_lists_valid_ones():
    attn = CrossAttention(query_dim=32, heads=2, dim_head=16)
    with pytest.raises(ValueError) as info:
        set_attention_backend(attn, "xformers")
    assert all(name in str(info.value) for name in ATTENTION_BACKENDS)


def test_cross_attention_backends_match_per_head_loop():
    # An independent loop over heads in float64 as the reference for all three backends.
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=32, context_dim=16, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 37, 32), torch.randn(2, 5, 16)
    q, k, v = (lin.weight.double() for lin in (attn.to_q, attn.to_k, attn.to_v))
    heads = []
    for h in range(4):
        rows = slice(8 * h, 8 * h + 8)
        scores = (x.double() @ q[rows].T) @ (ctx.double() @ k[rows].T).transpose(1, 2) / math.sqrt(8)
        heads.append(scores.softmax(-1) @ (ctx.double() @ v[rows].T))
    want = attn.to_out[0](torch.cat(heads, dim=-1).float())
    for backend in ATTENTION_BACKENDS:
        with torch.no_grad():
            got = set_attention_backend(attn, backend, slice_size=4)(x, ctx)
        # float32 against float64: a few ulps of the O(1) outputs
        assert max_errors(got, want)[1] < 1e-5, backend


# ------------------------------------------------------------------------------ timesteps and dtype

def test_timestep_embedding_matches_formula():
    # util.py timestep_embedding: [cos(t * f_i), sin(t * f_i)], f_i = 10000^(-i / half); reference in
    # float64. Arguments are formed in float32 (as the original), so t * f_i carries ~1e-7 relative
    # error, i.e. up to ~1e-4 absolute at t = 999: tolerance 2e-4.
    t = torch.tensor([0, 1, 250, 999])
    emb = timestep_embedding(t, 33)
    half = 16
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    want = torch.cat([args.cos(), args.sin(), torch.zeros(4, 1, dtype=torch.float64)], dim=1)
    assert emb.shape == (4, 33) and emb.dtype == torch.float32
    assert (emb.double() - want).abs().max() < 2e-4
    assert torch.equal(emb, timestep_embedding(t.float(), 33))
    assert torch.equal(emb[0], torch.cat([torch.ones(half), torch.zeros(half + 1)]))


def test_integer_float_and_scalar_timesteps_agree():
    model, t = load_case("inpaint")
    x, ctx = t["x"], t["context"]
    with torch.no_grad():
        a = model(x, torch.tensor([400, 400]), ctx)
        b = model(x, torch.tensor([400.0, 400.0]), ctx)
        c = model(x, 400, ctx)
    assert torch.equal(a, b) and torch.equal(a, c)


# Half precision keeps 8 (bfloat16, eps 7.8e-3) or 11 (float16, eps 9.8e-4) mantissa bits; rounding
# through ~25 layers gives measured relative errors of 1.4e-2 .. 2.4e-2 and 1.9e-3 .. 2.3e-3 on these cases.
@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 0.1), (torch.float16, 1e-2)])
def test_half_weights_follow_float32_and_keep_input_dtype(dtype, rtol):
    model, t = load_case("inpaint")
    with torch.no_grad():
        out = model.to(dtype)(t["x"], t["t_int"], t["context"])
    assert out.dtype == torch.float32
    assert max_errors(out, t["out_int"])[1] < rtol


def test_gradient_checkpointing_only_while_training_with_grad(monkeypatch):
    # torch.utils.checkpoint itself is PyTorch's (and its first call imports torch._dynamo, seconds of
    # test time), so record that our blocks route through it exactly when they should, and that the
    # result is the plain forward.
    calls = []

    def recording_checkpoint(fn, *args, use_reentrant):
        calls.append(type(fn.__self__).__name__)
        return fn(*args)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", recording_checkpoint)
    torch.manual_seed(0)
    res = ResBlock(32, 64, out_channels=64, use_checkpoint=True)
    tr = SpatialTransformer(64, 4, 16, depth=2, context_dim=16, use_checkpoint=True)
    x, emb, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 64), torch.randn(2, 3, 16)
    with torch.no_grad():
        ref = tr(res(x, emb), ctx)
    assert calls == []  # training mode (the default) but no grad: plain forward
    out = tr(res(x, emb), ctx)
    assert calls == ["ResBlock", "BasicTransformerBlock", "BasicTransformerBlock"]
    assert torch.equal(out, ref)
    res.eval(), tr.eval()
    tr(res(x, emb), ctx)
    assert len(calls) == 3


def test_per_level_num_res_blocks_layout():
    # Regression: Stability-AI openaimodel.py UNetModel takes num_res_blocks per level (ints are repeated);
    # input level L has num_res_blocks[L] ResBlocks, output level L has num_res_blocks[L] + 1, the Upsample
    # closing each output level but the last. Expected layout for channel_mult (1, 2), counts (1, 2), traced
    # by hand through that constructor: input = [conv, res, down, res, res]; the output ResBlocks take
    # ch + popped skip = 64+64, 64+64, 64+32 (Downsample skip), 64+32, 32+32 input channels.
    cfg = UNetConfig(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=(1, 2),
                     attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, use_spatial_transformer=True,
                     context_dim=8)
    with torch.device("meta"):
        model = UNetModel(cfg)
    assert len(model.input_blocks) == 5 and len(model.output_blocks) == 5
    assert [type(b[0]).__name__ for b in model.input_blocks] == ["Conv2d", "ResBlock", "Downsample", "ResBlock",
                                                                  "ResBlock"]
    assert [b[0].in_layers[2].in_channels for b in model.output_blocks] == [128, 128, 96, 96, 64]
    assert [type(m).__name__ for m in model.output_blocks[2]] == ["ResBlock", "SpatialTransformer", "Upsample"]
    assert [len(b) for b in model.input_blocks[3:]] == [2, 2]  # attention at ds 2 only
    x = torch.zeros(1, 4, 8, 8)
    assert model.to_empty(device="cpu")(x, torch.tensor([1]), torch.zeros(1, 3, 8)).shape == x.shape
    with pytest.raises(ValueError, match="num_res_blocks has 3 entries"):
        UNetModel(dataclasses.replace(cfg, num_res_blocks=(1, 2, 2)))
    with pytest.raises(ValueError, match="num_attention_blocks"):
        UNetModel(dataclasses.replace(cfg, num_attention_blocks=(1, 3)))


def _small(**changes) -> UNetConfig:
    base = dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                attention_resolutions=(1, 2), channel_mult=(1, 2), num_head_channels=16,
                use_spatial_transformer=True, context_dim=8, use_linear_in_transformer=True, legacy=False)
    return UNetConfig(**{**base, **changes})


def test_label_emb_and_per_level_transformer_depth_as_sgm():
    """sgm openaimodel.py: num_classes "sequential" adds label_emb = Sequential(Sequential(Linear(adm, 4 mc),
    SiLU, Linear)) (keys label_emb.0.0 / label_emb.0.2, as in sd_xl_base_1.0), an int num_classes an
    Embedding; transformer_depth per level with the middle block taking the last level's."""
    model = UNetModel(_small(num_classes="sequential", adm_in_channels=12, transformer_depth=(1, 3)))
    keys = model.state_dict()
    assert keys["label_emb.0.0.weight"].shape == (128, 12) and keys["label_emb.0.2.weight"].shape == (128, 128)
    assert [len(b[1].transformer_blocks) for b in model.input_blocks if len(b) > 1] == [1, 3]
    assert len(model.middle_block[1].transformer_blocks) == 3
    x, t, ctx, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 5, 8), torch.randn(2, 12)
    with torch.no_grad():
        out = model(x, t, ctx, y=y)
        # y enters through the embedding: emb = time_embed(t_emb) + label_emb(y)
        emb = model.time_embed(timestep_embedding(t, 32)) + model.label_emb(y)
        assert torch.equal(model.embedding(t, y, 2, x.device), emb)
        assert (model(x, t, ctx, y=y.flip(0)) - out).abs().max() > 1e-3
    classes = UNetModel(_small(num_classes=10))
    assert isinstance(classes.label_emb, nn.Embedding) and classes.label_emb.weight.shape == (10, 128)
    with pytest.raises(NotImplementedError, match="num_classes='continuous'"):
        UNetModel(_small(num_classes="continuous"))


def test_control_residuals_join_the_skips_as_cldm():
    """cldm.py ControlledUnetModel: h += control.pop() after the middle block, and each output block takes
    cat([h, hs.pop() + control.pop()]). Zero residuals change nothing; a residual on one skip changes the output
    exactly as adding it to that skip by hand does."""
    model = UNetModel(_small()).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 8)
    skips = []
    hooks = [b.register_forward_hook(lambda m, a, out: skips.append(out)) for b in model.input_blocks]
    with torch.no_grad():
        plain = model(x, t, ctx)
        for hook in hooks:
            hook.remove()
        zeros = [torch.zeros_like(s) for s in skips] + [torch.zeros(2, 64, 4, 4)]
        assert torch.equal(model(x, t, ctx, control=zeros), plain)
        control = [torch.zeros_like(c) for c in zeros]
        control[1] = torch.randn_like(control[1])  # the skip of input block 1
        control[-1] = torch.randn_like(control[-1])  # the middle block's
        out = model(x, t, ctx, control=control)
        # by hand: the same network with the residuals added where cldm adds them
        emb = model.embedding(t, None, 2, x.device)
        h, hs = x, []
        for block in model.input_blocks:
            h = block(h, emb, ctx)
            hs.append(h)
        h = model.middle_block(h, emb, ctx) + control[-1]
        hs = [s + c for s, c in zip(hs, control[:-1])]
        for block in model.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, ctx)
        torch.testing.assert_close(out, model.out(h), rtol=0, atol=0)
    assert (out - plain).abs().max() > 1e-3


@pytest.mark.parametrize("args, message", [
    (dict(x=torch.zeros(2, 3, 8, 8)), r"x must be \(B, 4, H, W\)"),
    (dict(x=torch.zeros(2, 4, 7, 8)), "multiples of 2"),
    (dict(timesteps=torch.zeros(3)), r"timesteps must be a scalar or of shape \(2,\)"),
    (dict(context=torch.zeros(3, 5, 8)), "context batch 3 does not match x batch 2"),
    (dict(context=torch.zeros(2, 8)), r"context must be \(B, tokens, width\)"),
    (dict(y=torch.zeros(2, 12)), "y must be given exactly when"),
    (dict(control=[torch.zeros(1)]), "control needs 5 residuals, got 1"),  # 4 input blocks + the middle
])
def test_bad_arguments_are_named(args, message):
    model = UNetModel(_small())
    call = {**dict(x=torch.zeros(2, 4, 8, 8), timesteps=torch.zeros(2), context=torch.zeros(2, 5, 8)), **args}
    with pytest.raises(ValueError, match=message):
        model(**call)
