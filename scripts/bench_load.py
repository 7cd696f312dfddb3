"""Load-time and peak-memory benchmark of ldm.load_model on a synthetic FULL-SIZE checkpoint.

Writes a random checkpoint in the original SD layout for a config (default v1-inference: raw UNet +
model_ema.* + VAE + CLIP text encoder + schedule buffers, fp32, ~7.7 GB; `--layout pruned` drops
model_ema.<param> as EMA-only releases do, ~4.3 GB), then loads it in a FRESH subprocess and reports

- load time (ldm.load_model) and the time to touch every weight once afterwards (the parameters are lazily
  memory-mapped, so a first forward pass would pay that),
- peak RSS (VmHWM) against the bytes of the weights the model actually holds (ratio; goal <= 1.3, ideally
  1.1), also with the interpreter + torch baseline subtracted.

`--run SIZE` then runs, in a FRESH subprocess per `--fast` mode, what the command line runs: ldm.load_model, then
ldm.fast.configure with the mode's options (none: the plain path; auto: ldm.fast.default_options(device, dtype),
the CLI's default), then ldm.pipeline.txt2img at SIZE px, batch 1, `--steps` DDIM steps; per mode the peak RSS
(VmHWM) and the wall time, and auto's peak over none's (issue 22's goal: within 5%, i.e. prepacked weights that
replace the plain ones hold no second copy):

    .venv/bin/python scripts/bench_load.py --layout pruned --run 128

SDXL: `--manifest` takes the keys and shapes of a released file (tests/fixtures/manifests/), e.g. the SDXL base
as sd_xl_base_1.0.safetensors holds it (fp16, 6.9 GB, with `denoiser.sigmas` and CLIP's position_ids):

    .venv/bin/python scripts/bench_load.py --config configs/sgm/sd_xl_base.yaml \
        --manifest tests/fixtures/manifests/sd_xl_base_1.0.keys.json --path /tmp/sdxl.safetensors \
        --file-dtype float16 --dtype float16

Not part of the test suite. Heavy: run it once, not in a loop. Example:
    .venv/bin/python scripts/bench_load.py                 # temp dir, deleted afterwards
    .venv/bin/python scripts/bench_load.py --path /tmp/sd-v1-synthetic.ckpt --keep
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
DTYPES = ("float32", "float16", "bfloat16")


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM, RssFile, RssAnon)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _io_read_bytes() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return -1


def write_safetensors(state: dict, path: Path) -> None:
    """The safetensors format written tensor by tensor (safetensors' save_file first builds the whole file in
    memory): an 8-byte little-endian header size, the JSON header (dtype, shape, byte offsets), the bytes."""
    import struct

    import torch

    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}
    codes = {v: k for k, v in names.items()}
    header, offset = {}, 0
    for key, t in state.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": codes[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in state.values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_checkpoint(config: Path, path: Path, layout: str, file_dtype: str, manifest: Path | None = None) -> dict:
    """A random checkpoint with the original keys/shapes (those of test_manifests.py, or of `manifest`). Cheap
    to make: every tensor is its own storage over a window of ONE 160 MB random block (torch.save writes each
    storage separately), so the writer never holds more than that block however large the file."""
    import numpy as np
    import torch

    from ldm.config import load_config
    from ldm.config_sgm import DiffusionEngineConfig
    from ldm.loader import UNET, build_model, ema_key
    from ldm.schedules import ddpm_buffers, make_beta_schedule, sgm_alphas_cumprod, sgm_sigmas

    cfg = load_config(config)
    sgm = isinstance(cfg, DiffusionEngineConfig)
    dtype = getattr(torch, file_dtype)
    if manifest is not None:  # a released file's keys and shapes
        shapes = {key: tuple(shape) for key, shape in json.loads(Path(manifest).read_text()).items()}
    else:
        model = build_model(cfg, device="meta")
        shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
        parameters = {name for name, _ in model.named_parameters()}
        if layout == "full":
            shapes.update({ema_key(k): s for k, s in list(shapes.items()) if k.startswith(UNET) and k in parameters})
    if not sgm and not cfg.cond_stage.is_openclip and not any(k.endswith("position_ids") for k in shapes):
        positions = cfg.cond_stage.text_config.max_position_embeddings
        shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, positions)

    largest = max(int(np.prod(s)) for s in shapes.values())
    block = torch.from_numpy(np.random.default_rng(0).standard_normal(largest + 4096, dtype=np.float32)).to(dtype)
    block_bytes = block.view(torch.uint8).numpy()  # a buffer torch.frombuffer can wrap again and again
    state, start = {}, 0
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
            continue
        if key == "denoiser.sigmas":  # the loader compares it with the config's table
            state[key] = sgm_sigmas(sgm_alphas_cumprod()).to(dtype)
            continue
        numel = int(np.prod(shape))
        start = (start + 4099) % (largest + 4096 - numel + 1)  # a different window for every tensor
        tensor = torch.frombuffer(block_bytes, dtype=dtype, count=numel, offset=start * dtype.itemsize)
        state[key] = tensor.reshape(shape)
    if not sgm:
        betas = make_beta_schedule(cfg.timesteps, cfg.linear_start, cfg.linear_end)
        state.update({k: v.to(dtype) for k, v in ddpm_buffers(betas, cfg.v_posterior).items()})
        state["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        state["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        write_safetensors(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 0, "epoch": 0}, path)
    return {"file_bytes": path.stat().st_size, "file_keys": len(state)}


def drop_page_cache(path: Path) -> None:
    """Evict this file's pages only (others' caches untouched), so the load reads from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(config: str, ckpt: str, dtype: str, ema: bool) -> dict:
    """Runs in the fresh subprocess: load, touch every weight, measure."""
    import torch

    import ldm

    baseline_rss, baseline_hwm = _status("VmRSS"), _status("VmHWM")
    read0 = _io_read_bytes()
    start = time.perf_counter()
    model = ldm.load_model(config, ckpt, dtype=getattr(torch, dtype), ema=ema)
    load_s = time.perf_counter() - start
    rss_after_load = _status("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():  # read every page once, as a forward pass would
        checksum = sum(float(t.sum()) for t in model.state_dict().values())  # no temporaries
    touch_s = time.perf_counter() - start
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    peak = _status("VmHWM")
    return {
        "load_s": load_s, "touch_s": touch_s, "weight_bytes": weight_bytes,
        "baseline_rss": baseline_rss, "baseline_peak": baseline_hwm, "rss_after_load": rss_after_load,
        "rss_after_touch": _status("VmRSS"), "rss_file": _status("RssFile"), "rss_anon": _status("RssAnon"),
        "peak_rss": peak, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "disk_read_bytes": _io_read_bytes() - read0, "checksum_finite": math.isfinite(checksum),
        "ratio": peak / weight_bytes, "ratio_minus_baseline": (peak - baseline_rss) / weight_bytes,
    }


def child_run(config: str, ckpt: str, dtype: str, ema: bool, size: int, mode: str, steps: int) -> dict:
    """Runs in the fresh subprocess: what the CLI runs for one --fast mode (load, configure, txt2img), timed."""
    import torch

    import ldm
    from ldm import fast, pipeline

    baseline_rss = _status("VmRSS")
    start = time.perf_counter()
    model = ldm.load_model(config, ckpt, dtype=getattr(torch, dtype), ema=ema)
    options = fast.default_options("cpu", getattr(torch, dtype)) if mode == "auto" else {}
    fast.configure(model, **options)
    load_s = time.perf_counter() - start
    # the synthetic weights are unscaled random numbers: the image is not looked at, only time and memory
    pipeline.txt2img(model, "a photograph of an astronaut riding a horse", sampler="ddim", steps=steps, H=size,
                     W=size, seed=0, disable=True)
    return {"mode": mode, "options": options, "load_s": load_s, "txt2img_s": time.perf_counter() - start - load_s,
            "wall_s": time.perf_counter() - start, "baseline_rss": baseline_rss, "peak_rss": _status("VmHWM")}


def run_modes(args, path: Path) -> dict:
    """child_run per --fast mode, each in its own process (so each peak RSS is its own), from a warm page cache."""
    out = {}
    for mode in args.fast.split(","):
        command = [sys.executable, __file__, "--child-run", str(args.run), "--fast", mode, "--steps", str(args.steps),
                   "--config", args.config, "--path", str(path), "--dtype", args.dtype] + \
                  (["--no-ema"] if args.no_ema else [])
        text = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        out[mode] = json.loads(text.strip().splitlines()[-1])
    if {"none", "auto"} <= set(out):
        out["auto_over_none_peak_rss"] = out["auto"]["peak_rss"] / out["none"]["peak_rss"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/stable-diffusion/v1-inference.yaml"))
    parser.add_argument("--path", help="checkpoint to write (.ckpt or .safetensors); default: a temp dir")
    parser.add_argument("--layout", choices=["full", "pruned"], default="full")
    parser.add_argument("--manifest", default=None, help="keys and shapes of a released file (SDXL: "
                        "tests/fixtures/manifests/sd_xl_base_1.0.keys.json) instead of the config's model")
    parser.add_argument("--file-dtype", choices=DTYPES, default="float32")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load as")
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="use an existing --path instead of writing it")
    parser.add_argument("--warm", action="store_true", help="keep the file in the page cache before loading")
    parser.add_argument("--keep", action="store_true", help="keep the written file")
    parser.add_argument("--run", type=int, default=None, metavar="SIZE",
                        help="then run load + configure + txt2img at SIZE px per --fast mode (fresh processes)")
    parser.add_argument("--fast", default="none,auto", help="--run's modes, comma list of none, auto")
    parser.add_argument("--steps", type=int, default=2, help="--run's DDIM steps")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-run", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.path, args.dtype, not args.no_ema)))
        return
    if args.child_run is not None:
        print(json.dumps(child_run(args.config, args.path, args.dtype, not args.no_ema, args.child_run, args.fast,
                                   args.steps)))
        return

    tmp = None if args.path else tempfile.TemporaryDirectory(prefix="bench_load-")
    path = Path(args.path) if args.path else Path(tmp.name) / "synthetic.ckpt"
    try:
        result = {"config": args.config, "layout": args.layout, "file_dtype": args.file_dtype,
                  "dtype": args.dtype, "ema": not args.no_ema, "path": str(path)}
        if not (args.reuse and path.exists()):
            start = time.perf_counter()
            result.update(write_checkpoint(Path(args.config), path, args.layout, args.file_dtype,
                                           args.manifest))
            result["write_s"] = time.perf_counter() - start
        else:
            result["file_bytes"] = path.stat().st_size
        if not args.warm:
            drop_page_cache(path)
        result["cache"] = "warm" if args.warm else "cold"
        command = [sys.executable, __file__, "--child", "--config", args.config, "--path", str(path),
                   "--dtype", args.dtype] + (["--no-ema"] if args.no_ema else [])
        out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        result.update(json.loads(out.strip().splitlines()[-1]))
        if args.run is not None:
            result["run"] = run_modes(args, path)
    finally:
        if tmp is not None and not args.keep:
            tmp.cleanup()
        elif not args.keep and not args.reuse and path.exists():
            path.unlink()

    gb = lambda n: f"{n / 1e9:.2f} GB"
    rows = [
        ("file", f"{gb(result['file_bytes'])} ({result['layout']}, {result['file_dtype']}, {result['cache']} cache)"),
        ("weights loaded", gb(result["weight_bytes"])),
        ("load_model time", f"{result['load_s']:.2f} s"),
        ("touch-all time", f"{result['touch_s']:.2f} s"),
        ("baseline RSS (python+torch)", gb(result["baseline_rss"])),
        ("RSS after load_model", gb(result["rss_after_load"])),
        ("peak RSS (VmHWM)", gb(result["peak_rss"])),
        ("peak / weights", f"{result['ratio']:.3f}"),
        ("(peak - baseline) / weights", f"{result['ratio_minus_baseline']:.3f}"),
        ("read from disk", gb(result["disk_read_bytes"])),
    ]
    for mode, run in result.get("run", {}).items():
        if isinstance(run, dict):
            rows.append((f"--run {args.run} px, --fast {mode}", f"peak RSS {gb(run['peak_rss'])}, "
                         f"{run['wall_s']:.1f} s (load {run['load_s']:.1f} s, txt2img {run['txt2img_s']:.1f} s)"))
    if "auto_over_none_peak_rss" in result.get("run", {}):
        rows.append(("peak RSS auto / none", f"{result['run']['auto_over_none_peak_rss']:.3f}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
