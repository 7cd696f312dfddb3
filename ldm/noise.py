"""Where every random number comes from: a `torch.Generator` argument, never the global RNG.

The noise convention (README, "Noise convention"): noise is drawn in float32 on the generator's device (a CPU
generator by default, so a seed gives the same numbers on every device), then moved to where it is used and
cast to its dtype. With a generator seeded like the global RNG, `randn_like(x, generator)` returns what the
originals' `torch.randn_like(x)` returns on the CPU. The samplers, the pipeline and the VAE posterior all draw
through these two functions. Imports only torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def randn(shape: Sequence[int], generator: torch.Generator | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`: drawn in float32 on the generator's device, then moved to `device`
    (default: stays there) and cast to `dtype`."""
    source = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=source, dtype=torch.float32)
    return noise.to(device=device if device is not None else source, dtype=dtype)


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise of x's shape on x's device in x's dtype, drawn as `randn` draws it."""
    return randn(x.shape, generator, x.device, x.dtype)
