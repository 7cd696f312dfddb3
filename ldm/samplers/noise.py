"""Noise samplers of the k-family: (sigma, sigma_next) -> N(0, I), drawn from a `torch.Generator`.

The draws themselves go through ldm/noise.py (float32 on the generator's device, then moved), the one home
of the noise convention.
"""

from __future__ import annotations

import torch

from ldm.noise import randn_like


def default_noise_sampler(x: torch.Tensor, generator: torch.Generator | None = None):
    """k-diffusion's default_noise_sampler: fresh standard normal noise for every (sigma, sigma_next)."""
    return lambda sigma, sigma_next: randn_like(x, generator)


class BrownianNoise:
    """Generator-driven replacement for k-diffusion's BrownianTreeNoiseSampler (which needs torchsde),
    EQUAL IN DISTRIBUTION to it.

    The tree answers a query (sigma, sigma_next) with (W(sigma_next) - W(sigma)) / sqrt(sigma - sigma_next)
    for one Brownian motion W indexed by sigma. Increments of W over disjoint intervals are independent
    N(0, length), so we draw one standard normal per new interval [lowest level so far -> sigma_next], in
    the order the sampler asks, and answer a query spanning several intervals with their length-weighted
    sum. dpmpp_2m_sde / dpmpp_3m_sde ask once per disjoint step, and get plain randn; dpmpp_sde asks for
    [sigma_i -> sigma_mid] then [sigma_i -> sigma_{i+1}], and gets the two correlated normals of the tree
    (correlation sqrt((sigma_i - sigma_mid) / (sigma_i - sigma_{i+1}))). The values differ from torchsde's:
    only the law is the same. Queries must go down in sigma and start at a level already visited.
    """

    def __init__(self, x: torch.Tensor, generator: torch.Generator | None = None):
        self.x, self.generator = x, generator
        self.levels: list[float] = []  # visited noise levels, descending
        self.draws: list[torch.Tensor] = []  # N(0, 1) increment over [levels[k], levels[k + 1]]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        high, low = float(sigma), float(sigma_next)
        if not high > low:
            raise ValueError(f"Brownian noise is queried downwards in sigma, got {high} -> {low}")
        if not self.levels:
            self.levels.append(high)
        if high not in self.levels:
            raise ValueError(f"noise query must start at a visited level, got {high}")
        start = self.levels.index(high)
        del self.levels[:start], self.draws[:start]  # samplers never look back above a query's start
        if low < self.levels[-1]:
            self.levels.append(low)
            self.draws.append(randn_like(self.x, self.generator))
        elif low not in self.levels:
            raise ValueError(f"noise query must end at a visited level or below all of them, got {low}")
        end = self.levels.index(low)
        if end == 1:
            return self.draws[0]
        w = sum(self.draws[k] * (self.levels[k] - self.levels[k + 1]) ** 0.5 for k in range(end))
        return w / (high - low) ** 0.5
