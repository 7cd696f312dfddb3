"""Generate tests/fixtures/a1111/lora_diffusers.json: diffusers' merge of the same kohya LoRA / LoCon files, per module.

    .venv-ref/bin/python tests/make_fixtures_lora_diffusers.py      (needs diffusers, transformers and peft)

A cross-check of ldm/lora.py by an independent implementation, where it agrees with A1111 (the reference of
tests/test_a1111.py). The tiny v1 model of tests/make_fixtures_a1111.py (tests/configs/tiny-v1-lora.yaml,
tests/tiny_models.tiny_state_dict, raw weights) is converted to diffusers with diffusers' own single-file
converter (UNet) and loaded into transformers' CLIPTextModel (text encoder); diffusers'
StableDiffusionLoraLoaderMixin.load_lora_weights reads tests/fixtures/a1111/lora_v1.safetensors (every module A1111
maps, rank 2, some modules without `alpha`) and fuse_lora(lora_scale) merges it. For every weight diffusers changed,
the delta (fused - base) is mapped back to the ORIGINAL checkpoint key (the converter's key map, recovered by
converting a checkpoint whose tensors hold their own index) and recorded as its Frobenius norm and its inner
products with two fixed random probes: enough to tell a wrong scale, a wrong module or a transposed update from a
rounding difference, in a few numbers per module. The set of original keys diffusers did NOT change (modules its
kohya converter skips) is recorded too.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
OUT = ROOT / "tests" / "fixtures" / "a1111" / "lora_diffusers.json"
LORA = ROOT / "tests" / "fixtures" / "a1111" / "lora_v1.safetensors"
CONFIG = "tiny-v1-lora"
CKPT_SEED = 0  # as tests/make_fixtures_a1111.py
SCALE = 0.7
UNET, TEXT = "model.diffusion_model.", "cond_stage_model.transformer.text_model."


def probes(key: str, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normal tensors of `shape`, determined by the key (the test draws the same)."""
    import hashlib

    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def summary(key: str, delta: torch.Tensor) -> list[float]:
    delta = delta.double()
    p, q = probes(key, delta.shape)
    return [delta.norm().item(), (delta * p).sum().item(), (delta * q).sum().item()]


def main() -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_models import tiny_config_path, tiny_state_dict

    config_path = tiny_config_path(CONFIG)
    cfg = OmegaConf.to_container(OmegaConf.load(config_path))
    state = tiny_state_dict(config_path, seed=CKPT_SEED, ema=False)
    unet_state = {k: v for k, v in state.items() if k.startswith(UNET)}
    dcfg = create_unet_diffusers_config_from_ldm(cfg, state, image_size=64)
    unet = UNet2DConditionModel(**dcfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, dcfg), strict=True)
    # the converter's key map: convert tensors that hold their own index
    keys = sorted(unet_state)
    tagged = {k: torch.full(unet_state[k].shape, float(i)) for i, k in enumerate(keys)}
    back = {d: keys[int(v.flatten()[0])] for d, v in convert_ldm_unet_checkpoint(tagged, dcfg).items()}
    assert len(back) == len(keys)

    text_cfg = cfg["model"]["params"]["cond_stage_config"]["params"]["text_config"]
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_state = {k[len(TEXT):]: v for k, v in state.items() if k.startswith(TEXT) and "position_ids" not in k}
    text.load_state_dict(text_state, strict=True)

    class Pipe(StableDiffusionLoraLoaderMixin):  # what load_lora_weights / fuse_lora read of a pipeline
        hf_device_map = None

        def __init__(self):
            self.unet, self.text_encoder = unet, text

        @property
        def components(self):
            return {"unet": self.unet, "text_encoder": self.text_encoder}

    base = {("unet", k): v.clone() for k, v in unet.state_dict().items()}
    base.update({("text", k): v.clone() for k, v in text.state_dict().items()})
    pipe = Pipe()
    pipe.load_lora_weights(str(LORA), adapter_name="lora")
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()  # drops the adapters; the fused weights stay
    fused = {("unet", k): v for k, v in unet.state_dict().items()}
    fused.update({("text", k): v for k, v in text.state_dict().items()})
    modules, unchanged = {}, []
    for (part, key), before in base.items():
        original = back[key] if part == "unet" else TEXT + key
        delta = fused[(part, key)] - before
        if delta.abs().max() > 0:
            modules[original] = summary(original, delta.reshape(state[original].shape))
        elif key.endswith("weight") and before.ndim > 1:
            unchanged.append(original)
    meta = {"generator": "tests/make_fixtures_lora_diffusers.py", "lora": str(LORA.relative_to(ROOT)),
            "scale": SCALE, "config": CONFIG, "seed": CKPT_SEED,
            "versions": {p: version(p) for p in ("torch", "diffusers", "transformers", "peft")}}
    OUT.write_text(json.dumps({"meta": meta, "modules": modules, "unchanged": sorted(unchanged)}, indent=1) + "\n")
    print(f"wrote {OUT}: {len(modules)} merged weights, {len(unchanged)} matrices unchanged")


if __name__ == "__main__":
    main()
