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
