"""Generate tests/fixtures/vae_tiny.safetensors: reference outputs of a tiny KL autoencoder.

Run from the repository root with the reference environment:

    .venv-ref/bin/python tests/make_fixtures_vae.py --compvis DIR      (DIR: a checkout of CompVis/stable-diffusion)

Two independent references compute the outputs, both in float32 on CPU:

* diffusers' AutoencoderKL, built and loaded through diffusers' OWN converter for original checkpoints
  (diffusers.loaders.single_file_utils.create_vae_diffusers_config_from_ldm + convert_ldm_vae_checkpoint,
  then load_state_dict(strict=True)). The converter only knows the attention in the middle block, so this
  reference uses `attn_resolutions: []` (as every released Stable Diffusion VAE).
* the original CompVis code itself (ldm/modules/diffusionmodules/model.py Encoder/Decoder and
  ldm/modules/distributions/distributions.py from the --compvis checkout, executed, not copied,
  with its two unused imports stubbed), once with `attn_resolutions: []` and once with attention at
  resolution 16, which diffusers cannot express. AutoencoderKL itself needs pytorch_lightning, so its two
  1x1 convs (quant_conv, post_quant_conv) are built here as its __init__ builds them.

Weights: the key list and shapes come from the original modules' state_dict (the checkpoint layout);
for each (key, shape) in sorted order a seeded generator draws uniform int8 values q, and the weight is
`offset + q * 2**-exponent` (offset 1 for GroupNorm scales, else 0; exponent from the fan-in, so convs are
fan-in scaled). Such values are exact in float32 and the file stores only q (int8) plus the exponents, which
keeps it small. Nothing depends on any module's parameter creation order or init.

Recorded in the file metadata: package versions (diffusers, torch), the sha256 of the two original files,
the configs, seeds and exponents.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "vae_tiny.safetensors"
ORIGINAL_FILES = ("ldm/modules/diffusionmodules/model.py", "ldm/modules/distributions/distributions.py")

EMBED_DIM = 4
# ddconfig in the yaml names; resolution 32 puts level 0 at 32 and level 1 at 16
DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
DDCONFIG_ATTN = dict(DDCONFIG, attn_resolutions=[16])
IMAGE_SHAPE = (2, 3, 24, 32)  # non-square, so a swapped H/W in a reshape shows
LATENT_SHAPE = (2, 4, 12, 16)
WEIGHT_SEED, IMAGE_SEED, LATENT_SEED = 0, 1, 2


def load_original(ref: Path):
    """Import the two original files under private names, stubbing the imports that the VAE never uses."""
    stubs = {name: types.ModuleType(name) for name in ("ldm", "ldm.util", "ldm.modules", "ldm.modules.attention")}
    stubs["ldm.util"].instantiate_from_config = None  # used by model.py only for the unused `Model` classes
    stubs["ldm.modules.attention"].LinearAttention = nn.Module  # attn_type "linear" is not used
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        modules = []
        for i, rel in enumerate(ORIGINAL_FILES):
            spec = importlib.util.spec_from_file_location(f"_compvis_original_{i}", ref / rel)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules.append(module)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return modules


def build_original(model_py, ddconfig):
    # as CompVis ldm/models/autoencoder.py AutoencoderKL.__init__, without the loss and Lightning parts
    vae = nn.Module()
    vae.encoder = model_py.Encoder(**ddconfig)
    vae.decoder = model_py.Decoder(**ddconfig)
    vae.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * EMBED_DIM, 1)
    vae.post_quant_conv = nn.Conv2d(EMBED_DIM, ddconfig["z_channels"], 1)
    return vae.eval()


def lattice_weights(shapes: dict[str, tuple[int, ...]], seed: int):
    """(int8 values, exponents, offsets) per key, drawn in sorted key order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    q, exponents, offsets = {}, {}, {}
    for key in sorted(shapes):
        shape = shapes[key]
        q[key] = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int64).to(torch.int8)
        is_norm = ".norm" in key
        if len(shape) > 1:
            # uniform ints on [-127, 127] have std ~73.3: scale to std ~ fan_in**-0.5, rounded to a power of two
            fan_in = math.prod(shape[1:])
            exponents[key] = round(math.log2(73.3 * math.sqrt(fan_in)))
        else:
            exponents[key] = 9 if is_norm else 10  # GroupNorm scale 1 +- 0.25, shift and biases +- 0.12
        offsets[key] = 1.0 if is_norm and key.endswith(".weight") else 0.0
    return q, exponents, offsets


def dequantize(q, exponents, offsets):
    return {k: offsets[k] + q[k].to(torch.float32) * 2.0 ** -exponents[k] for k in q}


def main(argv=None) -> None:
    import argparse

    import diffusers
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compvis", type=Path, required=True, help="checkout of CompVis/stable-diffusion")
    ref = p.parse_args(argv).compvis
    torch.manual_seed(0)  # the original and diffusers modules draw an init that load_state_dict overwrites
    model_py, distributions_py = load_original(ref)
    original = build_original(model_py, DDCONFIG)
    original_attn = build_original(model_py, DDCONFIG_ATTN)

    shapes = {k: tuple(v.shape) for k, v in original_attn.state_dict().items()}
    q, exponents, offsets = lattice_weights(shapes, WEIGHT_SEED)
    weights_attn = dequantize(q, exponents, offsets)
    keys_no_attn = sorted(original.state_dict())
    assert set(keys_no_attn) < set(weights_attn)
    weights = {k: weights_attn[k] for k in keys_no_attn}
    original.load_state_dict(weights, strict=True)
    original_attn.load_state_dict(weights_attn, strict=True)

    # diffusers, through its single-file converter on an original-layout checkpoint
    checkpoint = {f"first_stage_model.{k}": v.clone() for k, v in weights.items()}
    yaml_like = {"model": {"params": {"first_stage_config": {"params": {"embed_dim": EMBED_DIM,
                                                                        "ddconfig": DDCONFIG}}}}}
    dconfig = create_vae_diffusers_config_from_ldm(yaml_like, checkpoint, image_size=DDCONFIG["resolution"])
    reference = DiffusersAutoencoderKL(**dconfig)
    reference.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, dconfig), strict=True)
    reference.eval()

    image = torch.rand(IMAGE_SHAPE, generator=torch.Generator().manual_seed(IMAGE_SEED)) * 2 - 1
    z = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(LATENT_SEED))
    tensors = {"input.image": image, "input.z": z}
    with torch.no_grad():
        dist = reference.encode(image).latent_dist
        tensors.update({"diffusers.mean": dist.mean, "diffusers.logvar": dist.logvar,
                        "diffusers.decoded": reference.decode(z).sample})
        for name, vae in (("original", original), ("original_attn", original_attn)):
            posterior = distributions_py.DiagonalGaussianDistribution(vae.quant_conv(vae.encoder(image)))
            tensors.update({f"{name}.mean": posterior.mean, f"{name}.logvar": posterior.logvar,
                            f"{name}.decoded": vae.decoder(vae.post_quant_conv(z))})
    for part in ("mean", "logvar", "decoded"):
        a, b = tensors[f"diffusers.{part}"], tensors[f"original.{part}"]
        print(f"diffusers vs original {part}: max abs {(a - b).abs().max():.3e}, scale {b.abs().max():.3f}")
    assert tensors["original_attn.mean"].shape == LATENT_SHAPE
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tensors.update({f"weight.{k}": v.contiguous() for k, v in q.items()})

    metadata = {
        "generator": "tests/make_fixtures_vae.py",
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "original": "CompVis/stable-diffusion " + ", ".join(
            f"{rel} sha256 {hashlib.sha256((ref / rel).read_bytes()).hexdigest()}" for rel in ORIGINAL_FILES),
        "embed_dim": json.dumps(EMBED_DIM),
        "ddconfig": json.dumps(DDCONFIG),
        "ddconfig_attn": json.dumps(DDCONFIG_ATTN),
        "keys_no_attn": json.dumps(keys_no_attn),
        "weight_exponents": json.dumps(exponents),
        "weight_offsets": json.dumps(offsets),
        "seeds": json.dumps(dict(weights=WEIGHT_SEED, image=IMAGE_SEED, latent=LATENT_SEED)),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
