"""ldm: a small, numerically faithful reimplementation of latent diffusion (Stable Diffusion v1 and v2)."""

from ldm.controlnet_loader import load_controlnet
from ldm.loader import load_model

__version__ = "0.1.0"
__all__ = ["load_controlnet", "load_model", "__version__"]
