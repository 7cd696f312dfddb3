"""ldm: a small, numerically faithful reimplementation of latent diffusion (Stable Diffusion v1 and v2)."""

__version__ = "0.1.0"
