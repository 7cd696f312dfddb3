"""Where every random number comes from: a `torch.Generator` argument, never the global RNG.

The noise convention (README, "Noise convention"): noise is drawn in float32 on the generator's device (a CPU
generator by default, so a seed gives the same numbers on every device), then moved to where it is used and
cast to its dtype. With a generator seeded like the global RNG, `randn_like(x, generator)` returns what the
originals' `torch.randn_like(x)` returns on the CPU. The samplers, the pipeline and the VAE posterior all draw
through these two functions. Imports only torch.

Per-image noise (README, "Image sets"): `generator` may also be a sequence of generators, one per row of the
batch (dim 0). Row k is then drawn from generator[k] exactly as `randn([1, *shape[1:]], generator[k])` draws
it, so every draw of a sampler (x_T, per-step noise, Brownian increments) gives each image of a batch what a
batch of one with that generator would get, whatever the batch it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# one generator for the whole batch, one per row of the batch, or None (the global CPU generator)
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators = None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`: drawn in float32 on the generator's device, then moved to `device`
    (default: stays there) and cast to `dtype`. A sequence of generators draws row k from generator[k]."""
    if generator is not None and not isinstance(generator, torch.Generator):
        generators = list(generator)
        if not shape or len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for noise of shape {tuple(shape)}: one per row needed")
        rows = [randn((1, *shape[1:]), g) for g in generators]
        noise = torch.cat(rows) if rows else torch.empty(tuple(shape))
    else:
        source = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(tuple(shape), generator=generator, device=source, dtype=torch.float32)
    return noise.to(device=device if device is not None else noise.device, dtype=dtype)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Noise of x's shape on x's device in x's dtype, drawn as `randn` draws it."""
    return randn(x.shape, generator, x.device, x.dtype)
