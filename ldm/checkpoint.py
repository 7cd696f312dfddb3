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

The pickles inside are read by ldm/unpickler.py (an allowlist; nothing in a file ever runs).

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

import io
import mmap
import os
import struct
import zipfile
from pathlib import Path

import torch

from ldm.bounded_pickle import brief, pickle_byte_limit
from ldm.unpickler import CheckpointError, Storage, UnsafeCheckpointError, unpickle

__all__ = ["CheckpointError", "UnsafeCheckpointError", "read_checkpoint", "read_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER


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
            storages[key] = Storage(dtype, numel, _map_region(f, path, offset, nbytes))
        return storages[key]

    return unpickle(io.BytesIO(pickled), path, limit, storage)


def _read_legacy(f, path, limit):
    # Storage bytes follow the main pickle, so a dry run (meta tensors) finds where each one starts, then a
    # second pass maps them; both passes go through the same restricted unpickler. `limit`: bytes all the
    # pickles of the file may span together.
    def skip_header():
        f.seek(0)
        _magic, _protocol, sys_info = (unpickle(f, path, limit) for _ in range(3))
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise CheckpointError(path, "big-endian checkpoints are not supported")

    numels = {}

    def dry_storage(key, dtype, numel):
        numels[key] = (dtype, numel)
        return Storage(dtype, numel, None)

    skip_header()
    unpickle(f, path, limit - f.tell(), dry_storage)
    keys = unpickle(f, path, limit - f.tell())
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
            storages[key] = Storage(dtype, numel, _map_region(f, path, offsets[key], numel * dtype.itemsize))
        return storages[key]

    skip_header()
    return unpickle(f, path, limit - f.tell(), storage)


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
                first = unpickle(f, path, limit)
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
