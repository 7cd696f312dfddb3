"""The ranges of the command line's numbers and the memory a run needs, checked before anything is loaded.

A value is refused with one line naming it, whether it came from a flag or from a PNG's parameters
(scripts/rerun.py names the PNG field): every float must be finite (`nan` and `inf` parse as floats and would
give an all-black image), every count must lie in its range (NUMBERS, one table: a new flag adds a line), and
the sizes that drive allocations (H, W, the batch, the images a grid keeps) must fit the device's memory by
a lower-bound estimate of the largest tensors of the run (`check_memory`), and the image must not hold more
latent positions than a self-attention can compare in reasonable time (`check_attention`): so `--H 100000` is
refused in a second with the estimate instead of being killed by the kernel, or running for days.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import torch

from ldm.cli.flags import PRECISIONS, CLIError

MAX_STEPS = 10_000  # ten times the training schedule's 1000 steps; a k-sampler grid has no other limit
MAX_REPLAY_BATCHES = 10_000  # rerun samples every earlier batch of the run in full before the image's own
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
MAX_ATTENTION_TOKENS = 1 << 18  # latent positions in one self-attention: 4096 x 4096 px at f = 8 (SD v1's 512 px: 4096)

# option name -> (low, high): inclusive bounds, None for unbounded; every float must also be finite.
NUMBERS: dict[str, tuple] = {
    "ddim_steps": (1, MAX_STEPS), "n_iter": (1, None), "n_samples": (1, None), "n_rows": (0, None),
    "C": (1, None), "f": (1, None), "H": (1, None), "W": (1, None), "seed": SEED_RANGE,
    "scale": (None, None), "ddim_eta": (None, None), "strength": (0.0, 1.0),
    "attention_slice": (1, None), "vae_tile": (1, None), "vae_tile_overlap": (0, None), "vae_slice": (1, None),
    "clip_skip": (1, None),
}


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_numbers(values: Mapping, label: Callable[[str], str] = lambda name: f"--{name}",
                  table: Mapping[str, tuple] = NUMBERS) -> None:
    """Raise CLIError for the first value of `values` (option name -> value; None = not given) that is not
    finite or outside its range in `table`. `label(name)` spells the option in the message."""
    for name, (low, high) in table.items():
        value = values.get(name)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise CLIError(f"{label(name)} must be a finite number (got {value})")
        if low is not None and high is not None and not low <= value <= high:
            if name == "seed":
                raise CLIError(f"{label(name)} must be between {low} and {high} (got {value})")
            raise CLIError(f"{label(name)} must be in [{_number(low)}, {_number(high)}] (got {_number(value)})")
        if low is not None and value < low:
            raise CLIError(f"{label(name)} must be at least {_number(low)} (got {_number(value)})")
        if high is not None and value > high:
            raise CLIError(f"{label(name)} must be at most {_number(high)} (got {_number(value)})")


# ------------------------------------------------------------------------------------------------ memory
def available_memory(device: torch.device) -> int | None:
    """Bytes a run may still allocate on `device`: free accelerator memory, or on the CPU what the kernel
    reports available (MemAvailable) within the cgroup's limit. None when unknown."""
    if device.type != "cpu":  # an accelerator's backend module (torch.cuda, ...) reports its free memory
        backend = getattr(torch, device.type, None)
        return backend.mem_get_info(device)[0] if hasattr(backend, "mem_get_info") else None
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:  # cgroup v2: the container's limit minus what it uses
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                room = int(limit) - int(g.read())
                available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pass
    return available


def _gib(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / (1 << 20):.2f} MiB"


def memory_needs(opts, cfg, n_images: int) -> list[tuple[str, int]]:
    """Lower bounds, in bytes, of the largest allocations of a run (what, bytes): each must fit by itself.

    From the config alone (nothing loaded): the VAE decoder's full-resolution activation (its first level's
    channels at H x W, input and output of a convolution, for the images decoded together), the UNet's first
    level at the latent size for the guided batch, and the float32 images a grid keeps until the end."""
    compute = PRECISIONS[opts.precision]
    if opts.precision == "autocast" and opts.device.type != "cpu":
        compute = torch.float16
    size = torch.empty((), dtype=compute).element_size()
    height, width, f = opts.H, opts.W, latent_factor(opts, cfg)
    ddconfig, unet = cfg.first_stage.ddconfig, cfg.unet
    decoded = opts.vae_slice or opts.n_samples
    tile_h = tile_w = None
    if opts.vae_tile:  # tiles of vae_tile latents: the activation of one tile, the image whole
        tile_h, tile_w = min(height, opts.vae_tile * f), min(width, opts.vae_tile * f)
    decode_h, decode_w = (tile_h, tile_w) if tile_h else (height, width)
    guided = 2 if opts.scale != 1.0 else 1
    needs = [
        (f"the VAE decode ({decoded} x {ddconfig.ch * ddconfig.ch_mult[0]} x {decode_h} x {decode_w}, twice)",
         2 * decoded * ddconfig.ch * ddconfig.ch_mult[0] * decode_h * decode_w * size),
        (f"the UNet ({guided * opts.n_samples} x {unet.model_channels} x {height // f} x {width // f}, "
         "twice)", 2 * guided * opts.n_samples * unet.model_channels * (height // f) * (width // f) * size),
        (f"the decoded batch ({opts.n_samples} x 3 x {height} x {width} float32)",
         opts.n_samples * 3 * height * width * 4),
    ]
    if not opts.skip_grid:
        needs.append((f"the grid's {n_images} images (float32, kept until the end)",
                      2 * n_images * 3 * height * width * 4))
    return needs


def latent_factor(opts, cfg) -> int:
    """--f, or the config's own factor where the script has no --f (inpaint.py: the model's)."""
    return getattr(opts, "f", None) or 2 ** (len(cfg.first_stage.ddconfig.ch_mult) - 1)


def check_sizes(opts, cfg, n_images: int) -> None:
    """The run's sizes against the work (check_attention) and the memory (check_memory) they need."""
    check_attention(opts, cfg)
    check_memory(opts, cfg, n_images)


def check_attention(opts, cfg) -> None:
    """Raise CLIError when the UNet's first attention level holds more than MAX_ATTENTION_TOKENS latent
    positions: its self-attention compares each with every other at every step, so time grows with their
    square (memory need not: fused kernels do not keep the scores), and beyond this a step takes hours."""
    levels = cfg.unet.attention_resolutions
    if not levels:
        return
    ds = min(levels)  # the downsampling of the highest-resolution level with attention
    f = latent_factor(opts, cfg)
    tokens = (opts.H // f // ds) * (opts.W // f // ds)
    if tokens > MAX_ATTENTION_TOKENS:
        raise CLIError(f"a {opts.W}x{opts.H} image has {tokens} latent positions at the UNet's first attention "
                       f"level, whose self-attention compares each with every other ({float(tokens) ** 2:.2g} pairs "
                       f"per head and step); at most {MAX_ATTENTION_TOKENS} (e.g. 4096x4096 at f = 8)")


def check_memory(opts, cfg, n_images: int, available: int | None = None) -> None:
    """Raise CLIError when one of the run's largest allocations (memory_needs) exceeds the memory available on
    opts.device; the message gives the estimate."""
    if available is None:
        available = available_memory(opts.device)
    if available is None:
        return
    what, need = max(memory_needs(opts, cfg, n_images), key=lambda item: item[1])
    if need > available:
        raise CLIError(f"a {opts.W}x{opts.H} run needs at least {_gib(need)} for {what}, more than the "
                       f"{_gib(available)} available on {opts.device}; make the image or the batch smaller"
                       f"{' or decode in tiles (--vae_tile)' if 'VAE' in what else ''}")
