"""Helpers of scripts/bench.py that decide what the benchmark reports (no timing here: speed is judged only by
running the benchmark itself)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from ldm.config import load_config

ROOT = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_unet_flops_of_sd_v1_at_512_px():
    # Source of the expected figure: the speed issue (issue 5) quotes 1.607 TFLOP per CFG step for SD v1.5 at
    # 512x512 (batch 2, 77-token context). Counted here on the meta device, so the full-size model costs
    # nothing; 4 significant figures is the precision of the quoted number.
    cfg = load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    assert round(bench.unet_step_flops(cfg, 64) / 1e12, 3) == 1.607
    # the convolutions and projections scale with the area; attention with its square: between 4x and 16x
    ratio = bench.unet_step_flops(cfg, 64) / bench.unet_step_flops(cfg, 32)
    assert 4 < ratio < 16


def test_unet_flops_of_sdxl_base_at_1024_px():
    # Source: issue 14 (SDXL) quotes 13.5 TFLOP for one guided step of the SDXL base UNet at 1024 px (batch 2,
    # 77-token context of width 2048, the 2816-wide vector); 3 significant figures as quoted.
    cfg = load_config(ROOT / "configs/sgm/sd_xl_base.yaml")
    assert round(bench.unet_step_flops(cfg, 128) / 1e12, 1) == 13.5


def test_sdxl_inputs_are_the_conditioners_vector():
    # diffusers takes (text_embeds, time_ids) and embeds the six numbers itself; ldm's UNet takes sgm's vector:
    # the pooled embedding, then timestep_embedding(v, 256) ([cos, sin]) of each number
    cfg = load_config(ROOT / "configs/sgm/sd_xl_base.yaml")
    inputs = bench.sdxl_inputs(cfg, 2, torch.Generator().manual_seed(0))
    assert inputs["y"].shape == (2, 2816) and torch.equal(inputs["y"][:, :1280], inputs["pooled"])
    # sgm util.py timestep_embedding's expression (its own op order), for the first number (1024)
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=128, dtype=torch.float32) / 128)
    assert torch.equal(inputs["y"][0, 1280:1280 + 128], torch.cos(torch.tensor([1024.0])[:, None] * freqs[None])[0])


def test_seam_ratio_sees_hard_seams_not_smooth_differences():
    edges = bench.tile_edges(16, 8, 0, f=4)
    assert edges == [32]
    smooth = torch.linspace(0, 1, 64).expand(1, 3, 64, 64).clone()  # a gentle ramp: no jump at the edge
    assert abs(bench.seam_ratio(smooth, edges, edges) - 1) < 1e-3
    step = smooth.clone()
    step[..., 32:] += 1.0  # a hard seam between the two tiles along x
    assert bench.seam_ratio(step, edges, edges) > 10
    # 16 latents, tiles of 8 overlapping by >= 2: starts 0, 4, 8, so pixel spans [0,32) [16,48) [32,64)
    assert bench.tile_edges(16, 8, 2, f=4) == [16, 32, 48]


def test_controlnet_flops_are_the_unet_encoder_plus_the_hint_encoder_and_zero_convs():
    # bench_controlnet.control_flops counts a ControlNet forward; independently: the UNet's encoder half (which
    # the ControlNet copies) counted on the UNet's own modules, plus the hint encoder's eight 3x3 convs and the
    # 1x1 zero convs by the formula 2 * C_in * C_out * k^2 * H_out * W_out per sample
    from torch.utils.flop_counter import FlopCounterMode

    control_spec = importlib.util.spec_from_file_location("bench_controlnet", ROOT / "scripts" / "bench_controlnet.py")
    bench_controlnet = importlib.util.module_from_spec(control_spec)
    control_spec.loader.exec_module(bench_controlnet)
    cfg = load_config(ROOT / "configs/controlnet/cldm_v15.yaml")
    side, batch = 32, 2
    unet = bench.build_model(cfg, device="meta", with_control=False).unet
    x = torch.empty(batch, 4, side, side, device="meta")
    context = torch.empty(batch, 77, 768, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        emb = unet.embedding(torch.zeros(batch, dtype=torch.long, device="meta"), None, batch, "meta")
        h, widths = x, []
        for block in unet.input_blocks:
            h = block(h, emb, context)
            widths.append((h.shape[1], h.shape[2]))
        h = unet.middle_block(h, emb, context)
    encoder = counter.get_total_flops()
    hint, size = 0, 8 * side
    for c_in, c_out, stride in zip((3, 16, 16, 32, 32, 96, 96, 256), (16, 16, 32, 32, 96, 96, 256, 320),
                                   (1, 1, 2, 1, 2, 1, 2, 1)):
        size //= stride
        hint += 2 * c_in * c_out * 9 * size * size * batch
    zero = sum(2 * c * c * s * s * batch for c, s in widths + [(h.shape[1], h.shape[2])])
    counted = bench_controlnet.control_flops(cfg.control_stage, 1, side)["control_tflop"] * 1e12
    assert round(counted) == encoder + hint + zero  # (control_tflop is in TFLOP: back to an integer count)
