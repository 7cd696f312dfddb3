"""Prepacked weights: convolutions and linear layers on oneDNN's blocked weight layout (CPU inference).

Why: the plain `F.conv2d` / `F.linear` on the CPU reorder the weight into oneDNN's blocked layout on EVERY
call; at 256 px a full-size UNet step moves more weight bytes than activation bytes, so doing it once pays
most in the low-resolution levels (1280-channel 3x3 convs at 4x4: about 3x). inductor's `freezing` does the
same reordering for torch.compile on the CPU. Measured: README, Speed.

How, without a second copy of the weights: `prepack(module)` swaps every Conv2d / Linear for a PackedConv2d /
PackedLinear at the same attribute path (so `state_dict()` keys do not change). At its first inference call
a packed layer reorders its weight for that input size and RELEASES the plain tensor: the blocked copy
replaces it. The input size matters: oneDNN picks the blocked layout per problem size, and a weight packed
for another size is reordered again inside every call by a generic, 10x slower reorder; as inductor does, a
packed layer repacks when the size changes (a run at one resolution and batch size packs once).

The plain layout comes back whenever something asks for it, so the module still behaves as the plain one:
- `state_dict()` returns the plain layout (a dense copy made for the caller);
- reading `layer.weight` (LoRA merging, user code) unpacks: the plain Parameter is back, the blocked copy is
  dropped, and the next inference call packs again (from whatever Parameter `weight` is then);
- `.to()` / `.half()` / `load_state_dict()` / `copy.deepcopy` / pickling see the plain weight;
- calls that need autograd, or run another dtype or device, use the plain kernels on the plain weight.
An inference transform: the packed layers' weights are frozen (requires_grad False, as `ldm.load_model` gives
them anyway). While a layer is packed, `parameters()` lists its bias only. `unpack(module)` puts the plain layers back.

Numerics: oneDNN's inference kernels sum in another order than the plain path; float32 results differ in the
last bits (~1e-6 relative per layer; tests/test_fast_paths.py bounds whole models, tests/test_fast_default.py
the CLI's images: within one uint8 level on every sampler).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def prepack_supported(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has the oneDNN inference ops that `prepack` uses, for `dtype` (float32 only)."""
    ops = torch.ops.mkldnn
    return (dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and all(hasattr(ops, name) for name in ("_reorder_convolution_weight", "_convolution_pointwise",
                                                    "_reorder_linear_weight", "_linear_pointwise")))


class _Packed(nn.Module):
    """A Conv2d / Linear whose weight lives either as the plain Parameter `weight` or, after an inference call,
    as `_packed` (oneDNN blocked layout for the input size `_packed_for`), never both for long."""

    def __init__(self, plain: nn.Module):
        super().__init__()
        # an inference transform: the packed layers' weights are frozen (oneDNN's packed ops have no autograd)
        self.weight, self.bias = plain.weight.requires_grad_(False), plain.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # the hyper-parameters come from the plain layer, kept as a template without its weight (a tuple: not
        # a submodule, so no duplicate keys; the bias Parameter is shared); unpack() gives it the weight back
        plain._parameters["weight"] = None
        self._plain = (plain,)
        self._packed: torch.Tensor | None = None
        self._packed_for: torch.Size | None = None

    @property
    def plain(self) -> nn.Module:
        return self._plain[0]

    # -- the two layouts
    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("_packed") is not None:
            self._unpack()
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and self.__dict__.get("_packed") is not None:
            self._packed = self._packed_for = None  # a new weight (a LoRA merged, say) replaces the packed one
        super().__setattr__(name, value)

    def _unpack(self) -> None:
        dense = nn.Parameter(self._packed.to_dense(), requires_grad=False)
        self._packed = self._packed_for = None
        self._parameters = {"weight": dense, **self._parameters}  # weight before bias, as the plain layer

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and self._packed_for == x.shape:
            return self._packed
        dense = self.weight.detach()  # unpacks a copy packed for another size
        del self._parameters["weight"]
        self._packed = self._pack(dense, x.shape)
        self._packed_for = x.shape
        return self._packed

    def _usable(self, x: torch.Tensor) -> bool:
        # oneDNN's packed ops are inference-only (no autograd) and float32 here; anything else runs plain
        dense = self._parameters.get("weight")
        weight = self._packed if dense is None else dense
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # unfrozen by a user
        return (x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
                and torch.backends.mkldnn.enabled and not needs_grad)

    # -- everything that must see the plain layout
    def _apply(self, fn, recurse=True):
        if self._packed is not None:
            self._unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._packed is not None:  # a dense copy for the caller; the module stays packed
            destination[prefix + "weight"] = self._packed.to_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._packed is not None:
            self._unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):  # copy.deepcopy and pickle: the plain layout, this module left as it is
        state = self.__dict__.copy()
        if self._packed is not None:
            dense = nn.Parameter(self._packed.to_dense(), requires_grad=False)
            state.update(_parameters={"weight": dense, **self._parameters}, _packed=None, _packed_for=None)
        return state

    def extra_repr(self) -> str:
        return f"prepacked {self.plain!r}"


class PackedConv2d(_Packed):
    def __init__(self, plain: nn.Conv2d):
        super().__init__(plain)
        # padding, stride, dilation as the oneDNN ops take them, built once (forward runs every step)
        self._geometry = (list(plain.padding), list(plain.stride), list(plain.dilation))

    def _pack(self, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_convolution_weight(weight, *self._geometry, self.plain.groups,
                                                           list(input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not self._usable(x):
            return self.plain._conv_forward(x, self.weight, self.bias)
        return torch.ops.mkldnn._convolution_pointwise(x, self._weight_for(x), self.bias, *self._geometry,
                                                       self.plain.groups, "none", [], "")


class PackedLinear(_Packed):
    def _pack(self, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        rows = math.prod(input_shape[:-1])  # the GEMM's M, oneDNN's blocking hint
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or not self._usable(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._weight_for(x), self.bias, "none", [], "")


def _packable(m: nn.Module) -> bool:
    # string padding ("same") and non-zero padding modes have no oneDNN equivalent here; none in SD uses them
    if type(m) is nn.Conv2d:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return type(m) is nn.Linear and m.weight is not None


def _replace_children(module: nn.Module, swap) -> int:
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not child:
                setattr(parent, name, new)
                count += 1
    return count


def prepack(module: nn.Module) -> nn.Module:
    """Run every Conv2d / Linear of `module` on oneDNN-prepacked weights that replace the plain ones (CPU,
    float32; see the module docstring). In place; returns `module`."""
    if not prepack_supported():
        raise RuntimeError("prepack needs a torch build with oneDNN (mkldnn) inference ops")

    def swap(m):
        if not _packable(m):
            return m
        return PackedConv2d(m) if isinstance(m, nn.Conv2d) else PackedLinear(m)

    _replace_children(module, swap)
    return module


def unpack(module: nn.Module) -> nn.Module:
    """Undo `prepack`: the plain layers back at their paths, with the current weights in the plain layout."""
    def swap(m):
        if not isinstance(m, _Packed):
            return m
        plain = m.plain
        plain.weight, plain.bias = m.weight, m.bias  # reading m.weight unpacks it
        return plain

    _replace_children(module, swap)
    return module


def packed_bytes(module: nn.Module) -> int:
    """Memory held by the packed weights now (each layer packs at its first inference call)."""
    return sum(m._packed.numel() * m._packed.element_size() for m in module.modules()
               if isinstance(m, _Packed) and m._packed is not None)


def plain_weight_bytes(module: nn.Module) -> int:
    """Memory held by the plain weights of the packed layers now: 0 once every one of them has run packed."""
    return sum(m._parameters["weight"].numel() * m._parameters["weight"].element_size() for m in module.modules()
               if isinstance(m, _Packed) and "weight" in m._parameters)
