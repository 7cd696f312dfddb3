"""Opt-in fast paths (ldm/fast.py, ldm/tiling.py) against the plain path, on the tiny random models.

Reference: the plain modules of the same model (the fast paths change how the same math is computed, not the
math). Tolerances: float32 on CPU. oneDNN's prepacked and channels-last kernels accumulate the same products
in a different order (blocked over channels), a relative rounding difference of order 1e-7 per layer;
through the ~20 layers of the tiny UNet/VAE that stays below 1e-5 of the output scale, so 1e-5 relative to
the largest output magnitude is the bound. Tiling of a pointwise "decoder" is exact up to the float32
rounding of the blend (weights normalised per pixel): 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldm import fast, pipeline, tiling
from ldm.models.attention import SpatialTransformer
from tiny_models import tiny_config_path, tiny_model

needs_prepack = pytest.mark.skipif(not fast.prepack_supported(), reason="torch built without oneDNN")


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_config_path("tiny-v1"), seed=3)


@pytest.fixture(scope="module")
def model_v2():
    return tiny_model(tiny_config_path("tiny-v2"), seed=4)


def unet_inputs(model, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)
    context = torch.randn(2, 77, model.unet.cfg.context_dim, generator=g)
    return x, torch.tensor([999, 3]), context


@torch.no_grad()
def outputs(model, parts=("unet", "decode", "encode", "text")):
    out = {}
    if "unet" in parts:
        out["unet"] = model.unet(*unet_inputs(model))
    if "decode" in parts:
        out["decode"] = model.vae.decode(torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(1)))
    if "encode" in parts:
        image = torch.rand(1, 3, 24, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
        out["encode"] = model.vae.encode(image).mean
    if "text" in parts:
        out["text"] = model.encode_text(["a cat", ""])
    return out


@needs_prepack
@pytest.mark.parametrize("name, parts", [("model", ("unet", "decode", "encode", "text")), ("model_v2", ("unet",))])
def test_prepack_matches_plain(name, parts, request):
    # v1: conv proj_in/proj_out and every network; v2: linear proj_in on a non-contiguous (B, H*W, C) view
    model = request.getfixturevalue(name)
    plain = outputs(model, parts)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast.prepack(model)
    try:
        assert any(isinstance(m, fast.PackedConv2d) for m in model.modules())
        assert any(isinstance(m, fast.PackedLinear) for m in model.modules())
        packed = outputs(model, parts)
        # the packed weights REPLACE the plain ones of every layer that ran: no second copy
        assert fast.packed_bytes(model) > 0
        if name == "model":
            assert fast.plain_weight_bytes(model.unet) == 0 and fast.plain_weight_bytes(model.vae.decoder) == 0
        for part in plain:
            assert packed[part].is_contiguous(), part
            assert rel_err(packed[part], plain[part]) < 1e-5, part
        # state_dict: the same keys in the same order, the plain layout and the very same values; the model
        # stays packed
        packed_state = model.state_dict()
        assert list(packed_state) == list(state)
        assert all(torch.equal(packed_state[k], v) and packed_state[k].layout == torch.strided
                   for k, v in state.items())
        assert fast.packed_bytes(model) > 0
    finally:
        fast.unpack(model)
    assert not any(isinstance(m, fast.PackedConv2d | fast.PackedLinear) for m in model.modules())
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(outputs(model, ("unet",))["unet"], plain["unet"])  # the plain kernels again


@needs_prepack
def test_packed_layer_gives_the_plain_layout_back_when_asked():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(4, 8, 3, padding=1).requires_grad_(False), nn.Linear(8, 6).requires_grad_(False)
    reference = copy.deepcopy(conv)
    layer = fast.PackedConv2d(conv)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        first = layer(x)
        assert "weight" not in layer._parameters and layer._packed is not None  # released, replaced
        assert [n for n, _ in layer.named_parameters()] == ["bias"]
        # deepcopy (and pickle) see the plain layout and leave the original packed
        clone = copy.deepcopy(layer)
        assert layer._packed is not None and torch.equal(clone.weight, reference.weight)
        # reading .weight unpacks (LoRA merging reads it); an in-place change is then seen by the next call
        layer.weight.mul_(2.0)
        assert layer._packed is None and "weight" in layer._parameters
        second = layer(x)
        bias = reference.bias[None, :, None, None]
        assert rel_err(second - bias, 2 * (first - bias)) < 1e-6
        # a new Parameter assigned while packed replaces the packed copy (lora.activate does this)
        layer.weight = nn.Parameter(reference.weight.clone(), requires_grad=False)
        assert rel_err(layer(x), first) < 1e-6
        # a new input size repacks (oneDNN picks the blocked layout per problem size); values must not change
        x2 = torch.randn(2, 4, 6, 10)
        assert rel_err(layer(x2), reference(x2)) < 1e-6 and layer._packed_for == x2.shape
        # load_state_dict into a packed layer, and .to(): the plain layout first
        layer.load_state_dict({"weight": 3 * reference.weight, "bias": reference.bias})
        assert rel_err(layer(x) - bias, 3 * (first - bias)) < 1e-6
        layer.to(torch.float64)
        assert layer.weight.dtype == torch.float64 and layer._packed is None
        # plain kernels in float64, against the float32 `first`: float32 rounding
        assert rel_err(layer(x.double()) - bias, 3 * (first - bias).double()) < 1e-6
        layer.to(torch.float32)
    # with gradients required the plain (autograd-capable) layer runs
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    lin_reference = copy.deepcopy(lin)
    packed_lin = fast.PackedLinear(lin)
    y = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert rel_err(packed_lin(y), lin_reference(y)) < 1e-6 and packed_lin._packed is not None
    assert torch.equal(packed_lin.state_dict()["weight"], lin_reference.weight)


def test_channels_last_matches_plain(model_v2):
    plain = outputs(model_v2, ("unet", "decode"))
    fast.channels_last(model_v2)
    try:
        fast_out = outputs(model_v2, ("unet", "decode"))
    finally:
        model_v2.to(memory_format=torch.contiguous_format)
    for part in plain:
        assert fast_out[part].is_contiguous(), part
        assert rel_err(fast_out[part], plain[part]) < 1e-5, part


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_keeps_input_layout(use_linear):
    # The (B, H*W, C) -> (B, C, H, W) view is channels-last in memory; the block must hand back the input's
    # layout, or NCHW convolutions after it copy their weights on every call (see attention.py).
    block = SpatialTransformer(64, 2, 32, context_dim=16, use_linear=use_linear).eval()
    x = torch.randn(2, 64, 4, 6)
    context = torch.randn(2, 5, 16)
    with torch.no_grad():
        out = block(x, context)
        out_cl = block(x.contiguous(memory_format=torch.channels_last), context)
    assert out.is_contiguous()
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert rel_err(out_cl, out) < 1e-6


# ----------------------------------------------------------------------------------------------- tiling


class PointwiseVAE(nn.Module):
    """A "decoder" with no spatial mixing: each latent pixel becomes an f x f block of pixels. Tiling it must
    reproduce the plain decode exactly, whatever the blend weights, which tests placement and normalisation."""

    def __init__(self, f: int = 4):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.up = nn.ModuleList(nn.Module() for _ in range(f.bit_length()))
        for level in list(self.decoder.up)[1:]:
            level.upsample = nn.Identity()
        self.f = f

    def decode(self, z):
        rgb = z[:, :3] * 0.5 + z[:, 3:4]
        return rgb.repeat_interleave(self.f, dim=2).repeat_interleave(self.f, dim=3)


def test_tile_starts_cover_evenly():
    for size, tile, overlap in [(64, 64, 16), (65, 64, 16), (114, 64, 16), (256, 64, 16), (100, 32, 8)]:
        starts = tiling.tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, size) == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    assert tiling.tile_starts(40, 64, 16) == [0]


def test_blend_weights_sum_to_one_on_overlaps():
    tiles = tiling._axis_tiles(100, 32, 8, f=2)
    total = torch.zeros(200)
    for _, pixels, w in tiles:
        total[pixels] += w
        assert w.min() > 0
    assert (total - 1).abs().max() < 1e-6


@pytest.mark.parametrize("shape", [(2, 4, 20, 33), (1, 4, 8, 8)])
def test_tiled_decode_of_pointwise_decoder_is_exact(shape):
    vae = PointwiseVAE(f=4)
    assert tiling.upsampling_factor(vae) == 4
    z = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    plain = vae.decode(z)
    tiled = tiling.decode_tiled(vae, z, tile=8, overlap=3)
    assert (tiled - plain).abs().max() < 1e-6


def test_tiled_decode_real_vae(model):
    vae = model.vae
    z = torch.randn(2, 4, 24, 20, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = vae.decode(z)
        # one tile covering everything is the plain decode
        assert torch.equal(tiling.decode_tiled(vae, z, tile=24, overlap=4), plain)
        tiled = tiling.decode_tiled(vae, z, tile=12, overlap=4)
        larger = tiling.decode_tiled(vae, z, tile=20, overlap=6)
        sliced = tiling.decode_sliced(vae, z, slice_size=1)
    assert tiled.shape == plain.shape
    # Tiles normalise with their own GroupNorm statistics, so tiled != plain. It must still be a decode of the
    # same latent, far closer than the plain image displaced by one latent pixel (what a misplaced tile
    # gives; 0.61 mean abs here against 0.11 for tile 12), and closer the more each tile sees (0.02 at 20).
    displaced = torch.roll(plain, 2, dims=3)
    error, error_larger = (tiled - plain).abs().mean(), (larger - plain).abs().mean()
    assert error < 0.3 * (displaced - plain).abs().mean()
    assert error_larger < 0.5 * error
    # batch slicing changes nothing but the batch the kernels see
    assert rel_err(sliced, plain) < 1e-5  # oneDNN picks its blocking by batch size: summation order


def test_enable_tiled_decode_survives_deepcopy(model):
    vae = copy.deepcopy(model.vae)
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = tiling.decode_tiled(vae, z, tile=8, overlap=2)
        tiling.enable_tiled_decode(vae, tile=8, overlap=2)
        assert torch.equal(vae.decode(z), expected)
        clone = copy.deepcopy(vae).double()  # as the pipeline's float32 retry copies a half VAE
        assert clone.decode.__self__ is clone
        # float64 against float32: the float32 rounding of the tiny decoder, well under 1e-5
        assert (clone.decode(z.double()).float() - expected).abs().max() < 1e-5
        tiling.disable_tiled_decode(vae)
        assert not torch.equal(vae.decode(z), expected)


# ---------------------------------------------------------------------------------------------- offload


def test_sequential_offload_runs_each_part_in_turn(model):
    kwargs = dict(steps=2, H=16, W=16, seed=11, disable=True)
    plain = pipeline.txt2img(model, "a photo", **kwargs)
    offload = fast.SequentialOffload(model, device="cpu", offload_device="cpu")
    try:
        images = pipeline.txt2img(model, "a photo", **kwargs)
    finally:
        offload.remove()
    assert torch.equal(images, plain)
    # text (cond, uncond), then 2 DDIM steps of one batched CFG call each, then the decoder
    assert offload.log == ["text", "text", "unet", "unet", "vae"]


def test_configure_applies_only_what_is_asked(model):
    from ldm.models.attention import CrossAttention

    vae = model.vae
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        plain = vae.decode(z)
    try:
        assert fast.configure(model) is None
        assert "decode" not in vae.__dict__ and all(m.backend == "sdpa" for m in model.modules()
                                                    if isinstance(m, CrossAttention))
        fast.configure(model, attention="math", vae_slice=1)
        assert all(m.backend == "math" for m in model.modules() if isinstance(m, CrossAttention))
        with torch.no_grad():
            assert rel_err(vae.decode(z), plain) < 1e-5  # slicing only: batch-size blocking, as above
    finally:
        tiling.disable_tiled_decode(vae)
        fast.configure(model, attention="sdpa")
