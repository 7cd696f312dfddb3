"""ldm: a small, numerically faithful reimplementation of latent diffusion (Stable Diffusion v1, v2 and SDXL)."""

from ldm.config import load_config
from ldm.controlnet_loader import load_controlnet
from ldm.loader import build_model, load_model

__version__ = "0.1.0"
__all__ = ["build_model", "load_config", "load_controlnet", "load_model", "__version__"]
