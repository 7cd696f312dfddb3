"""Helpers of scripts/bench.py that decide what the benchmark reports (no timing here: speed is judged only by
running the benchmark itself)."""

from __future__ import annotations

import importlib.util
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
