"""Reading checkpoint files into {key: tensor} without running code from them and without copying weights.

Formats (detected from the first bytes, not the suffix):
- torch's zip format (torch.save default since 1.6; every released SD .ckpt): `<dir>/data.pkl` plus one
  uncompressed record `<dir>/data/<key>` per storage, referenced from the pickle by persistent ids
  ("storage", storage type, key, location, numel) (torch/serialization.py `_load`);
- torch's legacy format (`_use_new_zipfile_serialization=False`): magic, protocol and sys-info pickles, the
  main pickle, a pickled list of storage keys, then per storage an int64 element count and the raw bytes
  (torch/serialization.py `_legacy_load`);
- a plain pickle (no tensors: torch never writes one; read so a hostile one is refused, not run);
- `.safetensors`, through safetensors' `safe_open` (its own memory map).

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

Work: a checkpoint is a file from the internet, so what it can make the reader do is bounded by its size
(ldm/bounded_pickle.py: a pure-Python unpickler in the manner of torch's weights_only loader, which measures
every object before hashing it, charges copies, caps memo, MARK and nesting depth; a pickle may span at most
PICKLE_FLOOR bytes plus PICKLE_PER_DATA_BYTE per byte of tensor data the file holds, and a zip member is
refused by its declared size before it is inflated). Every refusal is a one-line CheckpointError.

Memory: every storage record is memory-mapped on its own (copy-on-write, so in-place edits never reach the
file) and tensors are views of those maps; pages are read when first touched and a map is released when
its last tensor dies, so a loader that converts tensor by tensor never holds the whole file twice.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import mmap
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from ldm.bounded_pickle import (BUILTIN_ARGUMENT_CHECKS, BoundedUnpickler, brief, copy_arguments, dict_arguments,
                                load_bounded, pickle_byte_limit)


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
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """One storage record: its element type and a uint8 view of its bytes (None during the legacy dry run)."""

    def __init__(self, dtype: torch.dtype, numel: int, data: torch.UntypedStorage | None):
        self.dtype, self.numel, self.data = dtype, numel, data


def _map_region(f, path, offset: int, nbytes: int) -> torch.UntypedStorage:
    """A copy-on-write memory map of file bytes [offset, offset + nbytes) as an untyped storage."""
    if offset + nbytes > os.fstat(f.fileno()).st_size:
        raise CheckpointError(path, f"truncated: a storage needs bytes up to {offset + nbytes}")
    if nbytes == 0:
        return torch.UntypedStorage(0)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page aligned
    region = mmap.mmap(f.fileno(), offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
    # frombuffer keeps `region` alive for as long as the storage lives; the map closes with it
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset - start).untyped_storage()


def _encode_latin1(text, encoding="latin1"):
    # protocol-2 pickles spell a bytes object as _codecs.encode(str, "latin1"); allow exactly that
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 text")
    return text.encode("latin1")


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not (isinstance(storage, _Storage) and isinstance(size, tuple) and isinstance(stride, tuple)
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
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
    **{("torch", name): dtype for name, dtype in TORCH_DTYPES.items()},
}


# What REDUCE may call beyond placeholders: the allowlisted callables, each with the check of its arguments
# that keeps its work in proportion to the pickle (ldm/bounded_pickle.py).
ARGUMENT_CHECKS = {**BUILTIN_ARGUMENT_CHECKS, collections.OrderedDict: dict_arguments, torch.Size: copy_arguments,
                   _encode_latin1: copy_arguments}


class RestrictedUnpickler(BoundedUnpickler):
    """A bounded unpickler (ldm/bounded_pickle.py) whose find_class answers from ALLOWED_GLOBALS and
    INERT_MODULES only. `storage` maps (key, dtype, numel) to a _Storage; None for a plain pickle, which may
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
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], (str, bytes))
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


def _unpickle(f, path, limit, storage=None):
    """One pickle from f's position, read within `limit` bytes, through the restricted bounded unpickler."""
    return load_bounded(lambda buffer, n: RestrictedUnpickler(buffer, n, path, storage), f, limit)


MAX_ZIP_ENTRIES = 1 << 18  # records in a zip checkpoint; a full SDXL training checkpoint has ~8,000
MAX_ZIP_DIRECTORY = 16 << 20  # bytes of its central directory (~0.1 KB a record; ZipInfo objects take ~5x)


def _open_zip(f, path) -> zipfile.ZipFile:
    # zipfile reads the whole central directory into ZipInfo objects (~0.5 KB each) before we see a name:
    # bound the entry count from the end record first
    end = zipfile._EndRecData(f)
    if end is None:
        raise CheckpointError(path, "not a checkpoint (a truncated or corrupt zip file: no end record)")
    entries, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > MAX_ZIP_ENTRIES or directory > MAX_ZIP_DIRECTORY:  # zipfile trusts the byte size, not the count
        raise CheckpointError(path, f"not a checkpoint (a zip of {entries} records in a {directory}-byte "
                                    f"directory; at most {MAX_ZIP_ENTRIES} records, {MAX_ZIP_DIRECTORY} bytes)")
    f.seek(0)
    return zipfile.ZipFile(f)


def _read_member(archive, info, limit, path, what) -> bytes:
    """The bytes of an archive member, refused before decompression when it declares more than `limit` (zipfile
    stops at the declared size and checks the CRC, so a member cannot inflate beyond it)."""
    if info.file_size > limit:
        raise CheckpointError(path, f"{what} {info.filename} unpacks to {info.file_size} bytes, more than the "
                                    f"{limit} allowed for it (in proportion to the tensor data the file holds)")
    with archive.open(info) as member:
        return member.read(limit + 1)


def _read_zip(f, path):
    archive = _open_zip(f, path)
    names = archive.namelist()
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        what = "a TorchScript archive" if any(n.endswith("constants.pkl") for n in names) \
            else "a zip file without exactly one <dir>/data.pkl"
        raise CheckpointError(path, f"not a checkpoint ({what})")
    root = pickles[0][: -len("data.pkl")]
    if root + "byteorder" in names and _read_member(archive, archive.getinfo(root + "byteorder"), 16, path,
                                                    "record") != b"little":
        raise CheckpointError(path, "big-endian checkpoints are not supported")
    # the tensor data the archive holds (stored records, as much as the file really has)
    data_bytes = min(os.fstat(f.fileno()).st_size, sum(i.file_size for i in archive.infolist()
                                                         if i.filename.startswith(root + "data/")
                                                         and i.compress_type == zipfile.ZIP_STORED))
    limit = pickle_byte_limit(data_bytes)
    pickled = _read_member(archive, archive.getinfo(pickles[0]), limit, path, "the pickle")
    storages = {}

    def storage(key, dtype, numel):
        if key not in storages:
            try:
                info = archive.getinfo(f"{root}data/{key}")
            except KeyError:
                raise CheckpointError(path, f"the pickle references a storage record {brief(key)} that the "
                                            "archive does not hold") from None
            nbytes = numel * dtype.itemsize
            if info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes:
                raise CheckpointError(path, f"storage record {info.filename} is compressed or too short")
            # data starts after the local header (30 bytes) + name + extra field, whose lengths may differ
            # from the central directory's copy
            f.seek(info.header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                raise CheckpointError(path, f"corrupt zip local header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + name_len + extra_len
            storages[key] = _Storage(dtype, numel, _map_region(f, path, offset, nbytes))
        return storages[key]

    return _unpickle(io.BytesIO(pickled), path, limit, storage)


def _read_legacy(f, path, limit):
    # Storage bytes follow the main pickle, so a dry run (meta tensors) finds where each one starts, then a
    # second pass maps them; both passes go through the same restricted unpickler. `limit`: bytes all the
    # pickles of the file may span together.
    def skip_header():
        f.seek(0)
        _magic, _protocol, sys_info = (_unpickle(f, path, limit) for _ in range(3))
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise CheckpointError(path, "big-endian checkpoints are not supported")

    numels = {}

    def dry_storage(key, dtype, numel):
        numels[key] = (dtype, numel)
        return _Storage(dtype, numel, None)

    skip_header()
    _unpickle(f, path, limit - f.tell(), dry_storage)
    keys = _unpickle(f, path, limit - f.tell())
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise CheckpointError(path, "the storage key list of a legacy checkpoint is not a list of strings")
    offsets, position = {}, f.tell()
    for key in keys:
        f.seek(position)
        (count,) = struct.unpack("<q", f.read(8))
        if key not in numels:
            raise CheckpointError(path, f"storage {brief(key)} is not referenced by the pickle")
        dtype, numel = numels[key]
        if count != numel:
            raise CheckpointError(path, f"storage {brief(key)} holds {count} elements, the pickle says {numel}")
        offsets[key] = position + 8
        position += 8 + numel * dtype.itemsize
    storages = {}

    def storage(key, dtype, numel):
        if key not in storages:
            if key not in offsets:
                raise CheckpointError(path, f"storage {brief(key)} is not in the file")
            storages[key] = _Storage(dtype, numel, _map_region(f, path, offsets[key], numel * dtype.itemsize))
        return storages[key]

    skip_header()
    return _unpickle(f, path, limit - f.tell(), storage)


def _read_safetensors(path, header_len: int, size: int):
    if header_len > size - 8:
        raise CheckpointError(path, f"truncated safetensors file: its header of {header_len} bytes runs past the "
                                    f"end of the file ({size} bytes)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:  # tensors are views of its memory map
        return {key: f.get_tensor(key) for key in f.keys()}


def read_checkpoint(path: str | os.PathLike):
    """The object stored in a checkpoint file (usually a dict), tensors memory-mapped on CPU.

    Raises CheckpointError (one line naming the path) for a missing, truncated, foreign or hostile file, and
    its subclass UnsafeCheckpointError for a pickle that references a global that could run code. The work
    is bounded by the file (ldm/bounded_pickle.py): a pickle may span at most PICKLE_FLOOR bytes plus
    PICKLE_PER_DATA_BYTE per byte of tensor data, and what it makes the reader do is in proportion.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found" if not path.exists() else "not a regular file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            if len(head) < 9:
                raise CheckpointError(path, f"not a checkpoint (only {len(head)} bytes)")
            if head[:4] == b"PK\x03\x04":
                return _read_zip(f, path)
            if head[8:9] == b"{":  # an 8-byte header length, then the JSON header; no pickle starts so
                return _read_safetensors(path, struct.unpack("<Q", head[:8])[0], size)
            f.seek(0)  # else a pickle (protocol 0 and 1 ones have no PROTO opcode to recognise them by)
            limit = pickle_byte_limit(size)  # a legacy file is mostly tensor data after its pickles
            try:
                first = _unpickle(f, path, limit)
            except CheckpointError:
                raise
            except Exception as err:
                if head[:1] == b"\x80":  # PROTO: a pickle, broken
                    raise
                raise CheckpointError(path, f"not a checkpoint: not a torch zip, safetensors or pickle file (it "
                                            f"starts with {head[:8]!r})") from err
            if isinstance(first, int) and first == LEGACY_MAGIC:
                return _read_legacy(f, path, limit)
            return first  # a plain pickle: its single object
    except CheckpointError:
        raise
    except Exception as err:  # truncated zip, bad pickle opcodes, bounds, safetensors header errors, ...
        reason = " ".join(str(err).split())
        if len(reason) > 200:  # messages may quote the file
            reason = reason[:200] + "..."
        raise CheckpointError(path, f"cannot read checkpoint ({type(err).__name__}: {reason})") from err


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat {key: tensor} of a checkpoint: the Lightning `state_dict` entry when present (.ckpt),
    else the top-level dict (safetensors, bare state dicts)."""
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"not a state dict (the file holds a {type(obj).__name__})")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"not a state dict (entry {brief(key)} is a {type(value).__name__})")
    return dict(obj)
