"""The cost of one ControlNet: part `control` of scripts/bench.py (`--parts control`), against diffusers.

    .venv-ref/bin/python scripts/bench.py --device cpu --size 256 --parts control
    .venv-ref/bin/python scripts/bench.py --device cuda --size 512 --dtype float16 --parts control

A random ControlNet in the ORIGINAL layout (`control_model.*` of lllyasviel/ControlNet's cldm_v15.yaml, or
cldm_v21.yaml for a 1024-wide context) next to bench.py's random Stable Diffusion checkpoint. ldm takes its keys
as they are (ldm.models.controlnet.ControlNet); diffusers' ControlNetModel gets them through diffusers' own
converter of original ControlNet files (single_file_utils create_controlnet_diffusers_config_from_ldm +
convert_controlnet_checkpoint). Both hold the same tensors (load_state_dict(assign=True)).

Parity first: the 13 residuals and the controlled UNet output of ldm against diffusers on the same inputs. Then,
alternating per round, one classifier-free-guidance step (batch 2) of each side's UNet alone and of its ControlNet
+ UNet (diffusers: ControlNetModel, then UNet2DConditionModel with down/mid_block_additional_residual; ldm:
apply_model with a Control entry). Reported per side: the step's median time with and without the ControlNet,
the cost of the ControlNet (with / without), the ControlNet's weights (MB) and the step's peak memory rise;
ldm / diffusers of the controlled step; and the ControlNet's FLOPs against the UNet's, counted.
"""

from __future__ import annotations

import statistics

import torch
import yaml

from ldm.models.controlnet import Control, ControlNet, control_scales

CONFIGS = {768: "configs/controlnet/cldm_v15.yaml", 1024: "configs/controlnet/cldm_v21.yaml"}


def control_config_path(cfg) -> str:
    """The original ControlLDM yaml whose ControlNet fits the Stable Diffusion config `cfg` (by context width)."""
    if cfg.unet.context_dim not in CONFIGS:
        raise SystemExit(f"no ControlNet config for a context of width {cfg.unet.context_dim}")
    return CONFIGS[cfg.unet.context_dim]


def build(root, cfg, device, dtype, seed, random_checkpoint, adopt) -> dict:
    """ldm's and diffusers' ControlNet on the same random original-layout tensors."""
    from diffusers import ControlNetModel
    from diffusers.loaders import single_file_utils
    from diffusers.loaders.single_file_utils import (convert_controlnet_checkpoint,
                                                     create_controlnet_diffusers_config_from_ldm)

    from ldm.config import load_config

    path = control_config_path(cfg)
    control_cfg = load_config(root / path)
    with torch.device("meta"):
        net = ControlNet(control_cfg.control_stage)
    ckpt = random_checkpoint(net.state_dict(), seed + 10)
    ckpt = {k: v.to(device, dtype) for k, v in ckpt.items()}
    original_config = yaml.safe_load((root / path).read_text())
    prefixed = {"control_model." + k: v for k, v in ckpt.items()}
    # diffusers 0.42.1's create_controlnet_diffusers_config_from_ldm calls create_unet_diffusers_config_from_ldm
    # without its `checkpoint` argument (a TypeError, so its from_single_file fails on original ControlNet
    # files too): hand it the checkpoint through a shim, the rest is diffusers' own code
    unet_config_fn = single_file_utils.create_unet_diffusers_config_from_ldm
    single_file_utils.create_unet_diffusers_config_from_ldm = (
        lambda original_config, checkpoint=prefixed, **kwargs: unet_config_fn(original_config, checkpoint, **kwargs))
    try:
        config = create_controlnet_diffusers_config_from_ldm(original_config, prefixed)
    finally:
        single_file_utils.create_unet_diffusers_config_from_ldm = unet_config_fn
    converted = convert_controlnet_checkpoint(prefixed, config)
    assert len(converted) == len(ckpt), (len(converted), len(ckpt))  # one-to-one, nothing dropped
    with torch.device("meta"):
        dnet = ControlNetModel(**config)
    return {"config": path, "ldm": adopt(net, ckpt), "diffusers": adopt(dnet, converted)}


def control_flops(net_cfg, unet_flops: int, latent_side: int, batch: int = 2) -> dict:
    """FLOPs of one ControlNet forward (batch 2, 77-token context, the hint at 8x the latent), counted by torch's
    FlopCounterMode on the meta device as bench.unet_step_flops counts the UNet's, and their ratio."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = ControlNet(net_cfg)
        x = torch.empty(batch, net_cfg.in_channels, latent_side, latent_side)
        hint = torch.empty(batch, net_cfg.hint_channels, 8 * latent_side, 8 * latent_side)
        context = torch.empty(batch, 77, net_cfg.context_dim)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, hint, t, context)
    flops = counter.get_total_flops()
    return {"control_tflop": flops / 1e12, "unet_tflop": unet_flops / 1e12, "flop_ratio": flops / unet_flops}


def bench_control(cfg, model, dparts: dict, nets: dict, args, device, dtype, meter, h: int, alternate,
                  rel_err, unet_flops) -> dict:
    """Parity, then alternating timings of the UNet step alone and with one ControlNet (module docstring)."""
    g = torch.Generator().manual_seed(args.seed + 4)
    x = torch.randn(2, cfg.unet.in_channels, h, h, generator=g).to(device, dtype)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
    hint = torch.rand(2, 3, 8 * h, 8 * h, generator=g).to(device, dtype)  # an image in [0, 1], the image's size
    t = torch.full((2,), 801, device=device)
    control = [Control(nets["ldm"], hint, control_scales(1.0))]

    def ldm_controlled():
        return model.apply_model(x, t, {"c_crossattn": [context], "control": control})

    def diffusers_controlled():
        down, mid = nets["diffusers"](x, t, encoder_hidden_states=context, controlnet_cond=hint,
                                      conditioning_scale=1.0, return_dict=False)
        return dparts["unet"](x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample

    # parity first: the residuals one by one, then the controlled UNet output
    ours = nets["ldm"](x, hint, t, context)
    down, mid = nets["diffusers"](x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    parity = {"residuals": max(rel_err(a, b) for a, b in zip(ours, [*down, mid])), "n_residuals": len(ours)}
    calls = {"ldm": lambda: model.unet(x, t, context), "ldm+control": ldm_controlled,
             "diffusers": lambda: dparts["unet"](x, t, encoder_hidden_states=context).sample,
             "diffusers+control": diffusers_controlled}
    outputs, samples = alternate(calls, args.rounds, meter, warmup=True)
    parity["controlled_unet"] = rel_err(outputs["ldm+control"], outputs["diffusers+control"])
    print(f"  parity ldm vs diffusers (max abs diff / max abs): {parity}", flush=True)
    median = {name: statistics.median(s["wall_ms"] for s in runs) for name, runs in samples.items()}
    # process CPU time: with --threads 1 the compute itself, unlike wall time not stretched by other processes
    cpu = {name: statistics.median(s["cpu_ms"] for s in runs) for name, runs in samples.items()}
    rise = {name: min(s["rise_mb"] for s in runs) for name, runs in samples.items()}
    out = {"config": nets["config"], "parity": parity, "rows": [],
           "flops": control_flops(nets["ldm"].cfg, unet_flops(cfg, h), h)}
    for side in ("ldm", "diffusers"):
        net = nets[side]
        out["rows"].append({
            "variant": side, "step_ms": median[side], "step_control_ms": median[side + "+control"],
            "control_cost": median[side + "+control"] / median[side],
            "step_cpu_ms": cpu[side], "step_control_cpu_ms": cpu[side + "+control"],
            "control_cost_cpu": cpu[side + "+control"] / cpu[side],
            "control_weights_mb": sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20,
            "rise_mb": rise[side], "rise_control_mb": rise[side + "+control"],
            "wall_ms": [round(s["wall_ms"], 1) for s in samples[side + "+control"]]})
    out["ldm_vs_diffusers_controlled"] = median["ldm+control"] / median["diffusers+control"]
    out["ldm_vs_diffusers_controlled_cpu"] = cpu["ldm+control"] / cpu["diffusers+control"]
    return out


def print_rows(control: dict) -> None:
    print(f"\none ControlNet ({control['config']}), CFG step at batch 2; parity {control['parity']}")
    head = f"{'variant':10s} {'step ms':>9s} {'+control ms':>12s} {'cost':>6s} {'cpu ms':>8s} {'+control cpu':>13s} " \
           f"{'cost':>6s} {'weights MB':>11s} {'rise MB':>8s} {'+control rise MB':>17s}"
    print(head)
    print("-" * len(head))
    for r in control["rows"]:
        print(f"{r['variant']:10s} {r['step_ms']:9.0f} {r['step_control_ms']:12.0f} {r['control_cost']:6.3f} "
              f"{r['step_cpu_ms']:8.0f} {r['step_control_cpu_ms']:13.0f} {r['control_cost_cpu']:6.3f} "
              f"{r['control_weights_mb']:11.0f} {r['rise_mb']:8.0f} {r['rise_control_mb']:17.0f}")
    print(f"controlled step, ldm / diffusers: {control['ldm_vs_diffusers_controlled']:.3f} wall, "
          f"{control['ldm_vs_diffusers_controlled_cpu']:.3f} cpu")
    f = control["flops"]
    print(f"FLOPs: ControlNet {f['control_tflop']:.3f} TFLOP, UNet {f['unet_tflop']:.3f} TFLOP per CFG step "
          f"(ControlNet / UNet {f['flop_ratio']:.3f})")
