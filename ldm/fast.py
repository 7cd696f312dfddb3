"""Opt-in fast paths for inference; the plain modules stay the default and the reference.

None of these changes the model's math; each only changes how or where it is computed:

- `prepack(module)`: CPU, float32. Every Conv2d and Linear keeps a copy of its weight reordered once into
  oneDNN's blocked layout and runs oneDNN's inference kernels on it. The plain `F.conv2d`/`F.linear`
  reorder the weight on EVERY call; at 256 px a full-size UNet step moves more weight bytes than activation
  bytes, so this pays most in the low-resolution levels (1280-channel 3x3 convs at 4x4: about 3x). The same
  reordering is what torch.compile does with inductor's `freezing` on CPU. Measured: README, Speed (the
  tables come from scripts/bench.py runs, with the command that made them). Costs one
  extra copy of the weights (`packed_bytes`: +3.3 GB for the SD v1 UNet). Packed convolutions output
  channels-last activations.
- `channels_last(module)`: 4-D weights re-laid out (not duplicated) in channels-last order, so oneDNN / cuDNN
  convolutions run NHWC (activations follow the weights) without per-call layout conversion.
- `compile_module(module)`: torch.compile of the module's forward in place (state_dict keys unchanged).
- `SequentialOffload`: text encoder, UNet and VAE live on an offload device (CPU) and move to the execution
  device only while they run, for accelerators too small to hold all three.

Numerics: the oneDNN kernels sum in a different order than the plain ones; at float32 the results differ in
the last bits (max relative error ~1e-6 per layer; tests/test_fast_paths.py bounds the whole models).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------- one entry point


def configure(model: nn.Module, *, attention: str | None = None, slice_size: int | None = None,
              prepack_weights: bool = False, memory_format_cl: bool = False, vae_tile: int | None = None,
              vae_tile_overlap: int = 16, vae_slice: int | None = None, compile_networks: bool = False,
              offload_to: torch.device | str | None = None, device: torch.device | str | None = None):
    """Apply the opt-in paths a command line asks for to a loaded LatentDiffusion; returns the
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


# ---------------------------------------------------------------------------------------------- prepack


def prepack_supported() -> bool:
    """Whether this torch build has the oneDNN inference ops that `prepack` uses."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available()
            and all(hasattr(ops, name) for name in ("_reorder_convolution_weight", "_convolution_pointwise",
                                                    "_reorder_linear_weight", "_linear_pointwise")))


def _use_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # The oneDNN ops are inference-only (no autograd) and, on CPUs without AVX-512 or AMX, float32-only;
    # everything else takes the plain path.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and torch.backends.mkldnn.enabled and not needs_grad)


class _Packed(nn.Module):
    """Holds the SAME weight/bias Parameters as the wrapped module (so state_dict keys, storage and `.to()`
    behave as before) plus a packed copy, built on first use and rebuilt when the weight or the input shape
    changes. The input shape matters: oneDNN chooses the weight's blocked layout for the problem size, and a
    weight packed for another size gets reordered again inside EVERY call by a generic (slow) reorder,
    measured 10x slower than the plain layer for a 1920->1280 3x3 conv at 8x8. As inductor does, pack for
    the actual input size; a model run at one resolution and batch size packs once."""

    def __init__(self, plain: nn.Module):
        super().__init__()
        self.weight = plain.weight
        self.bias = plain.bias
        self._plain = (plain,)  # a tuple: not registered as a submodule, so no duplicate keys; see unpack()
        self._packed, self._packed_for = None, None

    @property
    def plain(self) -> nn.Module:
        return self._plain[0]

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version, self.weight.shape, x.shape)
        if self._packed_for != key:
            self._packed = None  # free the old copy before building the new one
            self._packed = self._pack(self.weight.detach(), x.shape)
            self._packed_for = key
        return self._packed

    def extra_repr(self) -> str:
        return f"prepacked {self.plain!r}"


class PackedConv2d(_Packed):
    def _pack(self, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        conv = self.plain
        return torch.ops.mkldnn._reorder_convolution_weight(weight, list(conv.padding), list(conv.stride),
                                                           list(conv.dilation), conv.groups, list(input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.plain
        if x.dim() != 4 or not _use_packed(x, self.weight):
            return conv(x)
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed_weight(x), self.bias, list(conv.padding),
                                                       list(conv.stride), list(conv.dilation), conv.groups,
                                                       "none", [], "")


class PackedLinear(_Packed):
    def _pack(self, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        rows = math.prod(input_shape[:-1])  # the GEMM's M, oneDNN's blocking hint
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or not _use_packed(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(x), self.bias, "none", [], "")


def _packable(m: nn.Module) -> bool:
    # string padding ("same") and non-zero padding modes have no oneDNN equivalent here; none in SD uses them
    if type(m) is nn.Conv2d:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return type(m) is nn.Linear


def _replace_children(module: nn.Module, swap) -> int:
    count = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not child:
                setattr(parent, name, new)
                count += 1
    return count


def prepack(module: nn.Module) -> nn.Module:
    """Run every Conv2d/Linear of `module` on oneDNN-prepacked weights on CPU (float32); see the module
    docstring. In place; returns `module`. Other devices and dtypes fall through to the plain layers."""
    if not prepack_supported():
        raise RuntimeError("prepack needs a torch build with oneDNN (mkldnn) inference ops")

    def swap(m):
        if not _packable(m):
            return m
        return PackedConv2d(m) if isinstance(m, nn.Conv2d) else PackedLinear(m)

    _replace_children(module, swap)
    _contiguous_outputs(module)
    return module


def unpack(module: nn.Module) -> nn.Module:
    """Undo `prepack`: put the plain layers back and drop the packed copies."""
    _replace_children(module, lambda m: m.plain if isinstance(m, _Packed) else m)
    return module


def packed_bytes(module: nn.Module) -> int:
    """Memory held by the packed weight copies (built on first use)."""
    return sum(m._packed.numel() * m._packed.element_size() for m in module.modules()
               if isinstance(m, _Packed) and m._packed is not None)


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
