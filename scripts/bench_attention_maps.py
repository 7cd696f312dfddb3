"""What recording cross-attention maps costs: the full-size SD v1 UNet (configs/stable-diffusion/v1-inference.yaml,
random weights) at 512 px, one guided evaluation (batch 2), with and without an AttentionRecorder on every attn2.

    python scripts/bench_attention_maps.py                      # time ratio, then peak memory, ~5 min on 2 cores
    python scripts/bench_attention_maps.py --tokens 77 --size 256

Time: plain and recorded UNet calls alternate in one process (medians of --rounds); the ratio is the cost.
Memory: each variant runs in a fresh child process and reports its peak resident memory (ru_maxrss) after one
call; the difference is the recorder's peak, next to what the recorder holds between calls (its per-size
sums) and the size of the final maps at the image size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"


def build_unet():
    import torch

    from ldm.config import load_config
    from ldm.models.unet import UNetModel

    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNetModel(load_config(CONFIG).unet)
    unet = unet.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in unet.parameters():  # fan-in scaled random weights keep activations O(1)
            p.normal_(0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.05)
    return unet


def inputs(size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, size // 8, size // 8, generator=g), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, 768, generator=g))


def one_call(mode: str, size: int, tokens: int) -> dict:
    """A child process: one UNet call (recorded or plain), then the peak RSS."""
    import torch

    from ldm.attention_maps import AttentionRecorder

    unet = build_unet()
    x, t, context = inputs(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if mode == "record":
            with AttentionRecorder(unet, tokens=range(1, tokens + 1), size=(size, size)) as recorder:
                unet(x, t, context)
                held = recorder.held_bytes()
                maps = recorder.maps()
            result = {"held_bytes": held, "maps_bytes": maps.numel() * maps.element_size()}
        else:
            unet(x, t, context)
            result = {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "peak_rss_mb": peak / 1024, "weights_rss_mb": before / 1024, **result}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tokens", type=int, default=10, help="recorded token maps (the prompt's words), at most 77")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", choices=["plain", "record"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(one_call(args.child, args.size, args.tokens)))
        return

    from ldm.attention_maps import AttentionRecorder

    unet = build_unet()
    x, t, context = inputs(args.size)
    times = {"plain": [], "record": []}
    with torch.no_grad():
        unet(x, t, context)  # warm-up
        for _ in range(args.rounds):
            for mode in times:
                recorder = AttentionRecorder(unet, tokens=range(1, args.tokens + 1), size=(args.size, args.size))
                start = time.perf_counter()
                if mode == "record":
                    with recorder:
                        out_recorded = unet(x, t, context)
                else:
                    out_plain = unet(x, t, context)
                times[mode].append(time.perf_counter() - start)
    plain, recorded = statistics.median(times["plain"]), statistics.median(times["record"])
    print(f"UNet call at {args.size} px, batch 2, {args.tokens} token maps from all 16 attn2 layers: plain "
          f"{plain:.2f} s, recorded {recorded:.2f} s, ratio {recorded / plain:.3f}; outputs equal: "
          f"{torch.equal(out_plain, out_recorded)}")
    del unet
    child = [sys.executable, __file__, "--size", str(args.size), "--tokens", str(args.tokens)]
    if args.threads:
        child += ["--threads", str(args.threads)]
    runs = {mode: json.loads(subprocess.run(child + ["--child", mode], check=True, capture_output=True,
                                            text=True).stdout.strip().splitlines()[-1]) for mode in ("plain", "record")}
    rec = runs["record"]
    print(f"peak RSS: plain {runs['plain']['peak_rss_mb']:.0f} MB, recorded {rec['peak_rss_mb']:.0f} MB "
          f"(+{rec['peak_rss_mb'] - runs['plain']['peak_rss_mb']:.0f} MB); the recorder holds "
          f"{rec['held_bytes'] / 2**20:.2f} MB between calls, the final maps are {rec['maps_bytes'] / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
