"""Helpers of scripts/bench.py that decide what the benchmark reports (no timing here: speed is judged only by
running the benchmark itself)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
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


def test_part_flops_of_sd_v1_vae_and_text_encoder_by_formula():
    # The roofline's per-part counts (FlopCounterMode: matmuls, convolutions, attention; a multiply-add is 2;
    # norms and activations are not counted), against formulas written out here.
    cfg = load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    assert round(bench.PART_FLOPS["unet"](cfg, 64) / 1e12, 3) == 1.607  # as test_unet_flops_of_sd_v1_at_512_px
    # CLIP ViT-L/14 text tower (width 768, MLP 3072, 12 layers) on the CFG batch, 2 x 77 tokens: per token and
    # layer the q, k, v, out projections and the two MLP matrices; per sequence and layer QK^T and AV
    d, mlp, layers, tokens, batch = 768, 3072, 12, 77, 2
    per_layer = batch * tokens * 2 * (4 * d * d + 2 * d * mlp) + batch * 2 * (2 * tokens * tokens * d)
    assert bench.PART_FLOPS["text"](cfg, 64) == layers * per_layer
    # VAE decode of one 64x64 latent: every convolution by 2 * C_in * C_out * k^2 * H_out * W_out (output shapes
    # recorded by hooks on the meta device), plus the mid-block attention's QK^T and AV over the 64*64 pixels
    vae = bench.bench_model(cfg).vae
    convs = []
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda m, args, out: convs.append(
                2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * out.shape[2] * out.shape[3]))
    vae.decode(torch.empty(1, 4, 64, 64, device="meta"))
    attention = 2 * (2 * 4096 * 4096 * 512)
    assert bench.PART_FLOPS["vae"](cfg, 64) == sum(convs) + attention


def report(runs: list[dict]) -> dict:
    meta = {"device": "cpu", "threads": 2, "torch": "2.0", "command": "scripts/bench.py --size 256"}
    return {"meta": meta, "runs": runs}


def test_markdown_report_has_a_row_per_part_and_columns_per_variant():
    rows = [{"part": "unet", "variant": "ldm", "median_ms": 1000.0, "ratio_vs_diffusers": 0.8},
            {"part": "unet", "variant": "diffusers", "median_ms": 1250.0, "ratio_vs_diffusers": 1.0},
            {"part": "e2e", "variant": "ldm", "median_ms": 30000.04, "ratio_vs_diffusers": 0.75},
            {"part": "e2e", "variant": "diffusers", "median_ms": 40000.0, "ratio_vs_diffusers": 1.0}]
    roof = {"dtype": "float32", "matmul_peak_tflops": 2.0, "matmul_n": 2048,
            "parts": {"unet": {"tflop": 0.5, "ms_at_peak": 250.0,
                               "fraction_of_peak": {"ldm": 0.25, "diffusers": 0.2}}}}
    ok = {"config": "v1.yaml", "size": 256, "dtype": "float32", "peer": "diffusers", "rows": rows, "roofline": roof}
    failed = {"config": "v2.yaml", "size": 768, "dtype": "float16", "error": "OutOfMemoryError: 2 GiB"}
    lines = bench.markdown_report(report([ok, failed])).splitlines()
    assert lines[0] == "cpu, 2 threads, torch 2.0: `scripts/bench.py --size 256`"
    assert lines[2:10] == ["**v1.yaml**, 256 px, float32", "",
                           "| part | ldm ms | ldm / diffusers | ldm % peak | diffusers ms | diffusers % peak |",
                           "|---|---|---|---|---|---|",
                           "| unet | 1000.0 | 0.800 | 25.0 | 1250.0 | 20.0 |",
                           "| e2e | 30000.0 | 0.750 | - | 40000.0 | - |", "",
                           "matmul peak 2.00 TFLOP/s (float32, measured in this run); TFLOP per call: unet 0.5"]
    assert lines[-3:] == ["**v2.yaml**, 768 px, float16", "", "failed: OutOfMemoryError: 2 GiB"]
    # without a peer (--diffusers ""): no ratio columns; without a roofline: no % peak columns
    alone = {**ok, "peer": None, "rows": [r for r in rows if r["variant"] == "ldm"]}
    del alone["roofline"]
    assert bench.markdown_report(report([alone])).splitlines()[4:8] == [
        "| part | ldm ms |", "|---|---|", "| unet | 1000.0 |", "| e2e | 30000.0 |"]


def test_gpu_check_dry_run_writes_json_and_markdown(tmp_path):
    # CI's run of scripts/gpu_check.sh: the GPU check's stages on the CPU with the tiny configs, through this
    # interpreter (.venv has no diffusers: ldm's variants alone)
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = {"parity": {"tiny-v1.yaml": ["unet", "vae", "text", "e2e"]},  # parts per config, in order
                "matrix": {"tiny-v1.yaml": ["unet", "vae", "text"], "tiny-v2.yaml": ["unet", "vae"]}}  # v2: OpenCLIP
    for stage, parts_per_config in expected.items():
        runs = json.loads((tmp_path / f"{stage}.json").read_text())["runs"]
        assert [run["config"].removeprefix("tests/configs/") for run in runs] == list(parts_per_config)
        for run, parts in zip(runs, parts_per_config.values()):
            assert list(dict.fromkeys(row["part"] for row in run["rows"])) == parts
            roof = run["roofline"]["parts"]
            assert list(roof) == [p for p in parts if p != "e2e"]
            assert all(f > 0 for p in roof.values() for f in p["fraction_of_peak"].values())
        assert table_parts((tmp_path / f"{stage}.md").read_text()) == list(parts_per_config.values())
    assert "## matrix" in (tmp_path / "gpu-check.md").read_text()


def table_parts(markdown: str) -> list[list[str]]:
    """The first cells of each markdown table's rows, below its heading row."""
    tables = []
    for line in markdown.splitlines():
        if line.startswith("| part |"):
            tables.append([])
        elif line.startswith("| "):
            tables[-1].append(line.split(" | ")[0].removeprefix("| "))
    return tables
