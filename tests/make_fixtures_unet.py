"""Generate tests/fixtures/unet_<case>.safetensors: UNet parity fixtures from an independent reference.

Run with the reference environment (diffusers is not a dependency of ldm):

    .venv-ref/bin/python tests/make_fixtures_unet.py --stability DIR   (a checkout of Stability-AI/stablediffusion)

Reference: diffusers' UNet2DConditionModel (version recorded in each file's metadata; generated with
diffusers 0.42.1, torch 2.14.1), configured and loaded through diffusers' OWN converter of original
checkpoints (diffusers.loaders.single_file_utils.create_unet_diffusers_config_from_ldm and
convert_ldm_unet_checkpoint), so the original key layout -> network mapping is theirs, not ours.

For each tiny case the weights are drawn from a seeded CPU generator over the sorted (key, shape) list of
the original `model.diffusion_model.*` layout, fan-in scaled (they do not depend on any module's init;
proj_out/out convs are NOT zero, so every path contributes). To keep the files small each weight is
q * scale + offset with integer q in [-7, 7] stored two per byte and one float32 scale/offset per tensor;
the decoded float32 values are what both diffusers and the test use. Inputs: latents x, integer
timesteps, fractional timesteps, a context. Stored outputs: the diffusers UNet output for each timestep set.
The key list comes from ldm's UNetModel built on the meta device; the converter must map every key
one-to-one onto diffusers' parameters and diffusers must load them strictly, which cross-checks the layout.

Structures diffusers' converter cannot express (per-level num_res_blocks, num_attention_blocks,
disable_self_attentions) are referenced by the ORIGINAL code instead: Stability-AI/stablediffusion
ldm/modules/diffusionmodules/openaimodel.py UNetModel, imported from the --stability checkout (its `ldm`
package, with ours set aside) and loaded strictly with the same weights (metadata "reference").
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import diffusers  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ldm.config import UNetConfig  # noqa: E402
from ldm.models.unet import UNetModel  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
PREFIX = "model.diffusion_model."

# Tiny unet_config.params in the original yaml vocabulary, each case exercising different structure:
# v1: num_heads, 1x1-conv projections, attention only at the second level (plain down/up blocks at the
#     first), a channel change (32 -> 64) in input and output blocks;
# v2: num_head_channels (2 heads at 32 channels, 4 in the 64-channel middle), linear projections, depth 2;
# inpaint: 9 input channels, two ResBlocks per level (as SD), attention at the second level.
#     (Not a one-level 32-channel net: with one channel per GroupNorm group the norm after the timestep
#     addition removes the embedding exactly, so the output would not depend on t.)
# tiny_v2: unet_config.params of the shared tests/configs/tiny-v2.yaml (attention at both levels), so the
#     tiny model that the other tests use is itself covered.
_COMMON = dict(image_size=8, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1, 2],
               use_spatial_transformer=True, context_dim=32, use_checkpoint=True, legacy=False)
CASES = {
    "v1": dict(_COMMON, in_channels=4, attention_resolutions=[2], num_heads=2, transformer_depth=1),
    "v2": dict(_COMMON, in_channels=4, attention_resolutions=[1], num_head_channels=16,
               use_linear_in_transformer=True, transformer_depth=2),
    "inpaint": dict(_COMMON, in_channels=9, num_res_blocks=2, attention_resolutions=[2], num_heads=2,
                    transformer_depth=1),
    "tiny_v2": "tests/configs/tiny-v2.yaml",
    # three levels with one, two and one ResBlocks, attention at every level but only in the first ResBlock
    # of each (num_attention_blocks), self-attention replaced by cross-attention at the middle level
    # (disable_self_attentions), channel changes 32 -> 64 -> 64: only the original code builds this
    "multilevel": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 2, 1],
                       channel_mult=[1, 2, 2], attention_resolutions=[1, 2, 4], num_attention_blocks=[1, 1, 1],
                       disable_self_attentions=[False, True, False], num_head_channels=16,
                       use_linear_in_transformer=True, transformer_depth=1, use_spatial_transformer=True,
                       context_dim=24, use_checkpoint=False, legacy=False),
}
ORIGINAL_REFERENCE = ("multilevel",)  # cases referenced by the original openaimodel.py instead of diffusers
BATCH, SIZE, CONTEXT_LEN = 2, 8, 5


def yaml_unet_params(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))["model"]["params"]["unet_config"]["params"]


def original_keys(params: dict) -> list[tuple[str, tuple[int, ...]]]:
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    with torch.device("meta"):
        model = UNetModel(cfg)
    return sorted((PREFIX + k, tuple(v.shape)) for k, v in model.state_dict().items())


def random_weights(keys, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes q in [-7, 7] and per-tensor (scale, offset); weight = q * scale + offset.

    Linear/conv weights: offset 0, scale so that each output has unit variance for unit-variance inputs
    (fan-in scaled; std of q is sqrt(56/3)). Norm scales: around 1. Biases: std about 0.2.
    """
    gen = torch.Generator().manual_seed(seed)
    codes, scales, offsets = [], [], []
    for key, shape in keys:
        codes.append(torch.randint(-7, 8, shape, generator=gen, dtype=torch.int8).flatten())
        unit = 1.0 / math.sqrt(56 / 3)
        if len(shape) >= 2:
            scale, offset = unit / math.sqrt(math.prod(shape[1:])), 0.0
        elif key.endswith(".weight"):
            scale, offset = 0.2 * unit, 1.0
        else:
            scale, offset = 0.2 * unit, 0.0
        scales.append(scale)
        offsets.append(offset)
    return torch.cat(codes), torch.tensor(scales), torch.tensor(offsets)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte (code + 8 in each nibble, low nibble first) to halve the fixture size."""
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def decode_weights(packed, scales, offsets, keys) -> dict[str, torch.Tensor]:
    # The same decoding as tests/test_unet.py: both sides then hold bitwise-identical float32 weights.
    nibbles = torch.stack([packed & 15, packed >> 4], dim=1).flatten()
    codes = nibbles.to(torch.float32) - 8
    out, start = {}, 0
    for i, (key, shape) in enumerate(keys):
        n = math.prod(shape)
        out[key] = codes[start:start + n].reshape(shape) * scales[i] + offsets[i]
        start += n
    return out


def diffusers_unet(params: dict, checkpoint: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    original_config = {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=SIZE * 8)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    assert len(converted) == len(checkpoint), (len(converted), len(checkpoint))
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(converted, strict=True)
    unet.set_attn_processor(AttnProcessor())  # the explicit softmax(QK^T)V path, fp32 here
    return unet.eval()


def original_unet(params: dict, checkpoint: dict[str, torch.Tensor], stability: Path):
    """Stability-AI/stablediffusion's own UNetModel with the checkpoint's weights (strict); its forward takes
    (x, timesteps, context) as ours."""
    from originals import import_original

    (openaimodel,) = import_original(stability, ["ldm.modules.diffusionmodules.openaimodel"])
    unet = openaimodel.UNetModel(**params)
    unet.load_state_dict({k[len(PREFIX):]: v for k, v in checkpoint.items()}, strict=True)
    return lambda x, t, context: unet.eval()(x, t, context=context)


def make_case(name: str, params: dict, seed: int, stability: Path) -> None:
    keys = original_keys(params)
    codes, scales, offsets = random_weights(keys, seed)
    packed = pack_int4(codes)
    ckpt = decode_weights(packed, scales, offsets, keys)
    if name in ORIGINAL_REFERENCE:
        run = original_unet(params, ckpt, stability)
        reference = "Stability-AI/stablediffusion openaimodel.UNetModel (original code), float32 CPU"
    else:
        unet = diffusers_unet(params, ckpt)
        run = lambda x, t, context: unet(x, t, encoder_hidden_states=context).sample  # noqa: E731
        reference = ("diffusers UNet2DConditionModel via single_file_utils.convert_ldm_unet_checkpoint, "
                     "AttnProcessor, float32 CPU")
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, params["in_channels"], SIZE, SIZE, generator=gen)
    context = torch.randn(BATCH, CONTEXT_LEN, params["context_dim"], generator=gen)
    t_int = torch.tensor([999, 1], dtype=torch.int64)
    t_frac = torch.tensor([500.25, 37.5], dtype=torch.float32)
    with torch.no_grad():
        out_int = run(x, t_int, context)
        out_frac = run(x, t_frac, context)
    tensors = dict(weights_packed=packed, weights_scale=scales, weights_offset=offsets, x=x, context=context,
                   t_int=t_int, t_frac=t_frac, out_int=out_int, out_frac=out_frac)
    metadata = {
        "unet_params": json.dumps(params),
        "weights": json.dumps([[k, list(s)] for k, s in keys]),
        "reference": reference,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "seed": str(seed),
    }
    path = FIXTURES / f"unet_{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1024:.0f} KiB, {len(keys)} weights, "
          f"|out| max {out_int.abs().max():.3f} (t int) {out_frac.abs().max():.3f} (t frac)")


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stability", type=Path, required=True, help="checkout of Stability-AI/stablediffusion")
    p.add_argument("--cases", default=",".join(CASES), help="comma list of cases to (re)write")
    args = p.parse_args(argv)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for seed, (name, params) in enumerate(CASES.items()):
        if name not in args.cases.split(","):
            continue
        if isinstance(params, str):
            params = yaml_unet_params(ROOT / params)
        make_case(name, params, seed=1000 + seed, stability=args.stability)


if __name__ == "__main__":
    main()
