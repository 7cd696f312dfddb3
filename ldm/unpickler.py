"""What a torch pickle may build: the allowlist, the inert placeholders and the restricted unpickler that
ldm/checkpoint.py reads every pickle through.

Why our own unpickler (pickle.Unpickler with find_class overridden, as the Python docs' "Restricting
Globals") rather than `torch.load(weights_only=True, mmap=True)`: real SD checkpoints pickle a
pytorch_lightning class and sometimes numpy scalars next to the weights. weights_only refuses those unless
every such global is registered in advance under its exact name (add_safe_globals), which cannot cover the
next Lightning or omegaconf class, and its refusal is a multi-paragraph message. Our allowlist is one table
(ALLOWED_GLOBALS) that can be read end to end: `find_class` is the only way a pickle reaches Python objects,
and ours returns only (a) our own tensor-rebuild functions, (b) plain containers and number types, (c) torch
dtypes and storage-type markers, or (d) inert `Placeholder` classes for globals of data-only libraries
(INERT_MODULES). Anything else, e.g. os.system, builtins.eval, subprocess.Popen, functools.partial, is
refused by name before it exists; nothing is ever imported from a name found in a file.

Storages: a persistent id names a storage record by key, element type and count; the file-format reader
(ldm/checkpoint.py) answers it with a `Storage` (a memory map of the record), and the tensor rebuilders make
views of it after checking the view stays inside the record.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import os
import pickle

import torch

from ldm.bounded_pickle import (
    BUILTIN_ARGUMENT_CHECKS,
    BoundedUnpickler,
    copy_arguments,
    dict_arguments,
    load_bounded,
)


class CheckpointError(Exception):
    """A file that cannot be read as a checkpoint; the message is one line naming the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        super().__init__(f"{path}: {' '.join(str(reason).split())}")


class UnsafeCheckpointError(CheckpointError):
    """The pickle references a global that could run code; it was refused and never called."""

class Placeholder:
    """Inert stand-in for an object of a class we do not import (e.g. a Lightning callback, a numpy scalar).

    The unpickler may call the class (REDUCE, NEWOBJ), set its state (BUILD) and fill it (APPENDS, SETITEMS);
    all of that is only recorded here, nothing of the original class is imported or run.
    """

    qualname = "?"  # "module.Name" of the original; set on each generated subclass

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args, **kwargs):  # arguments were recorded by __new__
        pass

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def __repr__(self):
        return f"<inert {self.qualname}>"


_PLACEHOLDERS: dict[str, type] = {}


def placeholder_class(qualname: str) -> type:
    """The (cached) inert class standing for `qualname`; it is hashable, so it can be a dict key as
    Lightning's `callbacks` dict uses the callback class."""
    if qualname not in _PLACEHOLDERS:
        _PLACEHOLDERS[qualname] = type(qualname.rsplit(".", 1)[-1], (Placeholder,), {"qualname": qualname})
    return _PLACEHOLDERS[qualname]


# Modules whose globals become inert placeholders: libraries of data classes that training checkpoints
# pickle next to the weights (Lightning callbacks/hparams, numpy scalars and dtypes, omegaconf configs,
# argparse Namespaces, paths). Nothing is imported from them, so even a function name there stays inert.
INERT_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "numpy", "omegaconf", "argparse",
                 "pathlib", "typing")

# torch.save names a storage's element type by its legacy class, e.g. GLOBAL 'torch FloatStorage'.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in STORAGE_DTYPES.values()}
class StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class Storage:
    """One storage record: its element type and a uint8 view of its bytes (None during the legacy dry run)."""

    def __init__(self, dtype: torch.dtype, numel: int, data: torch.UntypedStorage | None):
        self.dtype, self.numel, self.data = dtype, numel, data

def _encode_latin1(text, encoding="latin1"):
    # protocol-2 pickles spell a bytes object as _codecs.encode(str, "latin1"); allow exactly that
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 text")
    return text.encode("latin1")


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not (isinstance(storage, Storage) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride))):
        raise pickle.UnpicklingError("malformed tensor record")
    # index of the last element + 1 must lie inside the storage
    needed = 0 if 0 in size else storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if needed > storage.numel:
        raise pickle.UnpicklingError(f"tensor of size {list(size)} overruns its storage ({storage.numel})")
    if storage.data is None:
        return torch.empty_strided(size, stride, dtype=storage.dtype, device="meta")
    return torch.empty(0, dtype=storage.dtype).set_(storage.data, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    # requires_grad, hooks and python attributes are training state: dropped, the loader sets its own
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("malformed parameter record")
    return data  # a plain tensor: the loader assigns it into the model's own Parameter


# The allowlist: (module, name) as the pickle spells it -> what the unpickler gets. Everything here only
# builds values from data: our tensor rebuilders, containers and number types (never eval, getattr, open),
# dtypes and storage-type markers.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("_codecs", "encode"): _encode_latin1,
    **{("builtins", name): getattr(builtins, name)
       for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "bytes")},
    **{("torch", name): StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): StorageType(torch.uint8),
    **{("torch", name): dtype for name, dtype in TORCH_DTYPES.items()},
}


# What REDUCE may call beyond placeholders: the allowlisted callables, each with the check of its arguments
# that keeps its work in proportion to the pickle (ldm/bounded_pickle.py).
ARGUMENT_CHECKS = {**BUILTIN_ARGUMENT_CHECKS, collections.OrderedDict: dict_arguments, torch.Size: copy_arguments,
                   _encode_latin1: copy_arguments}


class RestrictedUnpickler(BoundedUnpickler):
    """A bounded unpickler (ldm/bounded_pickle.py) whose find_class answers from ALLOWED_GLOBALS and
    INERT_MODULES only. `storage` maps (key, dtype, numel) to a Storage; None for a plain pickle, which may
    not reference storages."""

    def __init__(self, file, n_bytes, path, storage=None):
        super().__init__(file, n_bytes)
        self.path, self.storage = path, storage
        self._inert = set()

    def find_class(self, module, name):
        if len(module) + len(name) > MAX_GLOBAL_NAME:
            raise pickle.UnpicklingError(f"global name longer than {MAX_GLOBAL_NAME} characters")
        # protocols < 3 spell some globals by their Python 2 names (__builtin__.eval, commands.Popen);
        # translate as pickle's own find_class does, so the allowlist and the messages use Python 3 names
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module.split(".")[0] in INERT_MODULES:
            qualname = f"{module}.{name}"
            self._inert.add(qualname)
            if len(self._inert) > MAX_INERT_GLOBALS:  # each is a class, cached for the process
                raise pickle.UnpicklingError(f"the pickle names more than {MAX_INERT_GLOBALS} classes of "
                                             "data-only libraries")
            return placeholder_class(qualname)
        raise UnsafeCheckpointError(
            self.path, f"refusing to load: the pickle references the global '{module}.{name}', which is not "
            "on the allowlist and could run code; it was not called")

    def call(self, func, args):
        if isinstance(func, type) and issubclass(func, Placeholder):
            return func(*args)
        if _CALLABLE.get(id(func)) is not func:  # by identity: never hash an object from the file
            raise pickle.UnpicklingError(f"the pickle calls a {type(func).__name__}, which is not an allowed function")
        check = ARGUMENT_CHECKS.get(func)
        if check is not None:
            check(self, args)
        return func(*args)

    def new(self, cls, args, kwargs):
        if not (isinstance(cls, type) and issubclass(cls, Placeholder)):
            raise pickle.UnpicklingError(f"the pickle instantiates a {type(cls).__name__} with NEWOBJ")
        return cls.__new__(cls, *args, **kwargs)

    def check_build(self, inst, state):
        # placeholders record their state; an OrderedDict state_dict() carries its `_metadata` attribute
        if isinstance(inst, Placeholder):
            return
        if type(inst) is collections.OrderedDict and isinstance(state, dict) and \
                all(type(k) is str for k in state):
            return
        raise pickle.UnpicklingError(f"the pickle sets the state of a {type(inst).__name__}")

    def fillable(self, obj, kind):
        return isinstance(obj, kind) or (kind is not set and isinstance(obj, Placeholder))

    container_kinds = (*BoundedUnpickler.container_kinds, Placeholder)

    def contents(self, obj):
        if isinstance(obj, Placeholder):
            return [obj.args, obj.kwargs, obj.state, obj.items]
        return super().contents(obj)

    def persistent_load(self, pid):
        if self.storage is None:
            raise pickle.UnpicklingError("a plain pickle cannot reference tensor storages")
        # only types are checked and reported: formatting a persistent id could walk a shared-reference bomb
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")
                and isinstance(pid[1], StorageType) and isinstance(pid[2], (str, bytes))
                and isinstance(pid[4], int) and pid[4] >= 0):
            what = f"a tuple of {len(pid)}" if isinstance(pid, tuple) else f"a {type(pid).__name__}"
            raise pickle.UnpicklingError(f"unsupported persistent id ({what})")
        if len(pid) > 5 and pid[5] is not None:  # legacy storage views (torch < 0.4)
            raise pickle.UnpicklingError("legacy storage views are not supported")
        key = pid[2].decode("ascii") if isinstance(pid[2], bytes) else pid[2]
        if len(key) > MAX_GLOBAL_NAME:
            raise pickle.UnpicklingError(f"storage key longer than {MAX_GLOBAL_NAME} characters")
        return self.storage(key, pid[1].dtype, pid[4])


MAX_GLOBAL_NAME = 500  # characters of a module + name or a storage key; real ones are < 100
MAX_INERT_GLOBALS = 1000  # distinct data-only classes one pickle may name; real ones name < 50
_CALLABLE = {id(v): v for v in ALLOWED_GLOBALS.values() if callable(v)}


def unpickle(f, path, limit, storage=None):
    """One pickle from f's position, read within `limit` bytes, through the restricted bounded unpickler."""
    return load_bounded(lambda buffer, n: RestrictedUnpickler(buffer, n, path, storage), f, limit)
