"""Fast paths for inference; the plain modules stay the library's default and the reference.

None of these changes the model's math; each only changes how or where it is computed:

- `prepack(module)` (ldm/prepack.py): CPU, float32. Every Conv2d and Linear runs oneDNN's inference kernels on
  its weight reordered once into oneDNN's blocked layout, which REPLACES the plain copy (no second copy of the
  weights; `state_dict()` still returns the plain layout). Measured: README, Speed.
- `channels_last(module)`: 4-D weights re-laid out (not duplicated) in channels-last order, so oneDNN / cuDNN
  convolutions run NHWC (activations follow the weights) without per-call layout conversion.
- `compile_module(module)`: torch.compile of the module's forward in place (state_dict keys unchanged).
- `SequentialOffload`: text encoder, UNet and VAE live on an offload device (CPU) and move to the execution
  device only while they run, for accelerators too small to hold all three.

`default_options(device, dtype)` is the command line's choice (`--fast auto`, its default): the one place that
decides, so that scripts/bench.py measures exactly what the CLI runs.

Numerics: the oneDNN kernels sum in a different order than the plain ones; at float32 the results differ in
the last bits (max relative error ~1e-6 per layer; tests/test_fast_paths.py bounds the whole models,
tests/test_fast_default.py the CLI's images on every sampler).
"""

from __future__ import annotations

import torch
from torch import nn

from ldm import prepack as packing
from ldm.prepack import PackedConv2d, PackedLinear, packed_bytes, plain_weight_bytes, prepack_supported, unpack

__all__ = ["configure", "default_options", "prepack", "unpack", "packed_bytes", "plain_weight_bytes",
           "prepack_supported", "PackedConv2d", "PackedLinear", "channels_last", "compile_module",
           "SequentialOffload"]

# ------------------------------------------------------------------------------------------- one entry point


def configure(model: nn.Module, *, attention: str | None = None, slice_size: int | None = None,
              prepack_weights: bool = False, memory_format_cl: bool = False, vae_tile: int | None = None,
              vae_tile_overlap: int = 16, vae_slice: int | None = None, compile_networks: bool = False,
              offload_to: torch.device | str | None = None, device: torch.device | str | None = None):
    """Apply the fast paths a command line asks for to a loaded LatentDiffusion; returns the
    SequentialOffload handle when `offload_to` is given, else None. Every option defaults to off.

    attention: "sdpa" | "sliced" | "math" (ldm.models.attention); vae_tile: latent tile side for
    ldm.tiling (None: plain decode); vae_slice: decode that many samples at a time; compile_networks:
    torch.compile the UNet and the VAE decoder."""
    from ldm.models.attention import set_attention_backend
    from ldm import tiling

    if attention is not None or slice_size is not None:
        set_attention_backend(model, attention or "sliced", slice_size)
    if memory_format_cl:
        channels_last(model)
    if prepack_weights:
        prepack(model)
    networks = model.networks()
    if vae_tile is not None or vae_slice is not None:
        tiling.enable_tiled_decode(networks["vae"], vae_tile, vae_tile_overlap, vae_slice)
    if compile_networks:
        compile_module(networks["unet"])
        compile_module(networks["vae"].decoder)
    if offload_to is not None:
        return SequentialOffload(model, device, offload_to)
    return None


# ------------------------------------------------------------------------------------------- the default


def default_options(device: torch.device | str, dtype: torch.dtype) -> dict:
    """`configure`'s keyword arguments that the command line uses by default (`--fast auto`) on `device` in
    `dtype`; `{}` is the plain path.

    CPU float32: prepacked weights (`prepack`): a UNet step 0.69x and txt2img 0.69x of the plain path's time at
    256 px on 2 cores (README, Speed), with the same peak memory (the packed copy replaces the plain one), and
    images within one uint8 level of the plain path on every sampler (tests/test_fast_default.py). Everything
    else, the plain path: bfloat16 packing is not implemented, channels_last measured slower on the CPU, and the
    accelerator paths (channels_last, compile) are unmeasured until a GPU check runs (scripts/gpu_check.sh)."""
    device = torch.device(device)
    if device.type == "cpu" and dtype == torch.float32 and prepack_supported(dtype):
        return {"prepack_weights": True}
    return {}


# ---------------------------------------------------------------------------------------- prepack


def prepack(module: nn.Module) -> nn.Module:
    """ldm.prepack.prepack, and the outputs of the UNet and the VAE made contiguous (packed convolutions hand
    back channels-last activations). In place; returns `module`."""
    packing.prepack(module)
    _contiguous_outputs(module)
    return module


# ----------------------------------------------------------------------------------------- channels_last


def channels_last(module: nn.Module) -> nn.Module:
    """4-D parameters to channels-last memory layout (in place); activations follow through the convolutions."""
    module.to(memory_format=torch.channels_last)
    _contiguous_outputs(module)
    return module


def _contiguous_outputs(module: nn.Module) -> None:
    # Channels-last activations must not leak out of the UNet or the VAE: callers may .view() them. One copy
    # of the (small) output; installed once per top-level network.
    for part in _parts(module).values():
        if not getattr(part, "_ldm_contiguous_hook", False):
            part.register_forward_hook(lambda m, args, out: out.contiguous() if torch.is_tensor(out) else out)
            part._ldm_contiguous_hook = True


def _parts(module: nn.Module) -> dict[str, nn.Module]:
    # the networks whose outputs reach the caller: a whole model's UNet and VAE halves, or a bare network
    if hasattr(module, "networks"):
        networks = module.networks()
        vae = networks["vae"]
        return {"unet": networks["unet"], "vae.encoder": vae.quant_conv, "vae.decoder": vae.decoder}
    if hasattr(module, "decoder") and hasattr(module, "quant_conv"):
        return {"vae.encoder": module.quant_conv, "vae.decoder": module.decoder}
    return {"module": module}


# ------------------------------------------------------------------------------------------------ compile


def compile_module(module: nn.Module, **kwargs) -> nn.Module:
    """torch.compile the forward of `module` in place (keys unchanged); kwargs go to torch.compile.

    The first call of each new input shape compiles (minutes for a full-size UNet on a small CPU)."""
    module.compile(**kwargs)
    return module


# ---------------------------------------------------------------------------------------- sequential offload


def _move(value, device: torch.device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _first_device(values) -> torch.device | None:
    for v in values:
        if torch.is_tensor(v):
            return v.device
    return None


class SequentialOffload:
    """Keep a LatentDiffusion's text encoder, UNet and VAE on `offload_device` and move each to `device` only
    while it runs (the others go back first), so the accelerator holds one network at a time.

    Inputs are moved to `device` and outputs back to where the caller's first tensor argument was, so the
    pipeline works unchanged: with every part offloaded, `pipeline.model_device` is `offload_device` and the
    sampler's few small tensors live there. Hooks sit on the modules the public calls run: the text encoder
    itself (`encode_text`), the UNet, the VAE's `encoder`..`quant_conv` (`vae.encode`) and
    `post_quant_conv`..`decoder` (`vae.decode`). `remove()` takes the hooks off (the parts stay where they are).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, offload_device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.parts = model.networks()
        vae = self.parts["vae"]
        self.active: str | None = None
        self.log: list[str] = []  # activation order, for tests and logs
        self._caller: dict[str, torch.device | None] = {}
        model.to(self.offload_device)
        spans = {"text": (self.parts["text"], self.parts["text"]), "unet": (self.parts["unet"], self.parts["unet"]),
                 "vae.encode": (vae.encoder, vae.quant_conv),
                 "vae.decode": (vae.post_quant_conv, vae.decoder)}
        self._handles = []
        for span, (first, last) in spans.items():
            part = span.split(".")[0]
            self._handles.append(first.register_forward_pre_hook(self._enter(span, part), with_kwargs=True))
            self._handles.append(last.register_forward_hook(self._leave(span)))

    def activate(self, part: str) -> None:
        if self.active != part:
            for name, module in self.parts.items():
                if name != part:
                    module.to(self.offload_device)
            self.parts[part].to(self.device)
            self.active = part
        self.log.append(part)

    def _enter(self, span: str, part: str):
        def hook(module, args, kwargs):
            self._caller[span] = _first_device(list(args) + list(kwargs.values()))
            self.activate(part)
            return _move(args, self.device), _move(kwargs, self.device)
        return hook

    def _leave(self, span: str):
        def hook(module, args, out):
            caller = self._caller.pop(span, None)
            return out if caller is None else _move(out, caller)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
