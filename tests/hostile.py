"""Hostile files, built byte by byte, and the worker that runs the hostile cases of tests/test_hostile.py.

Each builder writes one file that attacked an earlier version of the reader or the command line (issue 18);
the docstring says what it did then. The worker (`python tests/hostile.py CASES.json`) runs cases one after
another in one process (one torch import for all), under the address-space limit its parent set, and prints
one JSON line per case as it finishes (so a crash still reports the cases before it):
{"name", "code" (exit status or null), "error" (an exception other than SystemExit, if any), "stderr",
"seconds", "maxrss" (bytes, the process's peak so far), "opened" (watched paths that were opened)}.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np


# ----------------------------------------------------------------------------------------------- pickles
def _binunicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)  # LONG_BINGET


def _put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)  # LONG_BINPUT


def dag_list(depth: int) -> bytes:
    """Opcodes pushing list L_depth where L_0 = [] and L_k = [L_{k-1}, L_{k-1}] through the memo: 2^depth
    leaves in about 16 bytes per level. str() of it never ends."""
    out = bytearray(b"]" + _put(0) + b"0")
    for k in range(1, depth + 1):
        out += b"]" + _put(k) + b"(" + _get(k - 1) + _get(k - 1) + b"e0"  # EMPTY_LIST, MARK, APPENDS, POP
    return bytes(out + _get(depth))


def dag_tuple(depth: int) -> bytes:
    """Opcodes pushing T_depth where T_0 = () and T_k = (T_{k-1}, T_{k-1}): hashing it visits 2^depth tuples."""
    out = bytearray(b")" + _put(0) + b"0")
    for k in range(1, depth + 1):
        out += _get(k - 1) + _get(k - 1) + b"\x86" + _put(k) + b"0"  # TUPLE2
    return bytes(out + _get(depth))


def zip_checkpoint(path: Path, pickled: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch zip checkpoint (archive/data.pkl + stored archive/data/<key> records) around `pickled`."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        for key, data in (records or {"0": bytes(16)}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def dag_persistent_id(path: Path) -> Path:
    """1.4 KB: the persistent id is a list of shared references 60 deep; formatting it for the error message
    (str(pid)) walked 2^60 elements: the reader hung forever."""
    return zip_checkpoint(path, b"\x80\x02" + dag_list(60) + b"Q.")


def dag_dict_key(path: Path) -> Path:
    """The same shape as a dict key (tuples): the unpickler hung in hash()."""
    return zip_checkpoint(path, b"\x80\x02}" + dag_tuple(60) + b"K\x01s.")


def deep_tuple_key(path: Path, depth: int = 200_000) -> Path:
    """200 KB: a 200,000-deep nested tuple used as a dict key; hash() recursed in C until the process
    segfaulted (exit 139, no message)."""
    path.write_bytes(b"\x80\x02}" + b")" + b"\x85" * depth + b"K\x01s.")
    return path


def deep_list(path: Path, depth: int = 100_000) -> Path:
    """Lists nested 100,000 deep (each wrapped by the next: put, pop, new list, get, append): harmless to the
    unpickler, a C stack overflow or RecursionError for the next recursive walk (repr, ==, deepcopy)."""
    out = bytearray(b"\x80\x02]")
    for k in range(depth):
        out += _put(k) + b"0]" + _get(k) + b"a"
    path.write_bytes(bytes(out + b"."))
    return path


def zip_bomb(path: Path, gib: int = 1) -> Path:
    """1 MB: a zip checkpoint whose deflated data.pkl unpacks to `gib` GiB (the reader took 70 s and 2.6 GB
    before refusing it). Built from one 1 MiB deflate block repeated (a full flush makes each block stand
    alone), so writing it takes milliseconds; the CRC is left 0, it is never reached."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(b"\x80\x02X" + b"\0" * ((1 << 20) - 3)) + compressor.flush(zlib.Z_FULL_FLUSH)
    zeros = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero_block = zeros.compress(bytes(1 << 20)) + zeros.flush(zlib.Z_FULL_FLUSH)
    stream = block + zero_block * (1024 * gib - 1) + b"\x03\x00"  # an empty final block ends the stream
    size = (1 << 30) * gib
    name = b"archive/data.pkl"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, 0, len(stream), size, len(name), 0) + name
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, 0, len(stream), size, len(name),
                          0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(stream), 0)
    path.write_bytes(local + stream + central + end)
    return path


def memo_flood(path: Path, n: int = 2_000_000) -> Path:
    """2 MB: two million memo entries (MEMOIZE); with LONG_BINPUT 2^32-1 the C unpickler sized a 32 GB memo."""
    path.write_bytes(b"\x80\x04N" + b"\x94" * n + b".")
    return path


def copy_amplifier(path: Path, n: int = 100_000) -> Path:
    """0.7 MB: a list of 100,000 items copied by REDUCE builtins.list 100,000 times (10^10 element copies)."""
    out = bytearray(b"\x80\x02]" + _put(0) + b"(" + b"N" * n + b"e" + b"cbuiltins\nlist\n" + _put(1) + b"0]")
    for _ in range(n):
        out += _get(1) + _get(0) + b"\x85Ra"  # list(L), appended to the result list
    path.write_bytes(bytes(out + b"."))
    return path


def sized_bytes(path: Path) -> Path:
    """30 bytes: bytes(2**31 - 1), a 2 GB allocation."""
    path.write_bytes(b"\x80\x02cbuiltins\nbytes\nJ\xff\xff\xff\x7f\x85R.")
    return path


def mark_flood(path: Path, n: int = 1_000_000) -> Path:
    """1 MB of MARKs: a million nested stacks."""
    path.write_bytes(b"\x80\x02" + b"(" * n + b"N.")
    return path


def inert_flood(path: Path, n: int = 20_000) -> Path:
    """20,000 distinct classes of a data-only library, each made into a cached placeholder class."""
    path.write_bytes(b"\x80\x02]" + b"".join(f"cnumpy\nC{i}\na".encode() for i in range(n)) + b".")
    return path


def legacy_with_hostile_keys(path: Path) -> Path:
    """The legacy torch format whose storage-key list is a shared-reference bomb (str() of each key hung)."""
    header = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2) + \
        pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    main = pickle.dumps({"a": 1}, protocol=2)
    path.write_bytes(header + main + b"\x80\x02" + dag_list(60) + b"." + bytes(64))
    return path


def safetensors_past_end(path: Path) -> Path:
    """A safetensors file whose header length runs past the end (was reported as "invalid load key")."""
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path.write_bytes(struct.pack("<Q", 10_000_000) + header + bytes(4))
    return path


# ------------------------------------------------------------------------------------------------ images
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, side: int = 30_000) -> Path:
    """A 100-byte PNG declaring 30000 x 30000 pixels (beyond PIL's decompression-bomb limit)."""
    ihdr = struct.pack(">2I5B", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) +
                     png_chunk(b"IEND", b""))
    return path


def grey16(path: Path, height: int = 40, width: int = 48) -> np.ndarray:
    """A 16-bit greyscale PNG (PIL mode I;16), a horizontal ramp over the whole 0..65535 range."""
    from PIL import Image

    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    array = np.tile(ramp, (height, 1))
    Image.fromarray(array).save(path)  # uint16: mode I;16
    return array


# ------------------------------------------------------------------------------------------------ worker
def run_case(case: dict) -> dict:
    from ldm import cli
    from ldm.checkpoint import CheckpointError, read_state_dict
    from ldm.cli import rerun

    stderr = io.StringIO()
    result = {"name": case["name"], "code": None, "error": None}
    start = time.perf_counter()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            if case["kind"] == "read":
                try:
                    read_state_dict(case["path"])
                    result["code"] = 0
                except CheckpointError as e:  # what the command line reports as its one line
                    result["code"] = 1
                    print(f"read: error: {e}", file=sys.stderr)
            else:
                main = {"txt2img": cli.txt2img_main, "img2img": cli.img2img_main, "rerun": rerun.main}[case["kind"]]
                main(case["argv"])
                result["code"] = 0
        except SystemExit as e:
            result["code"] = e.code
        except BaseException as e:  # noqa: BLE001 (reported to the parent, which fails the case)
            result["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    result["seconds"] = time.perf_counter() - start
    result["stderr"] = stderr.getvalue()[-2000:]
    return result


def worker(cases_path: str) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    cases = json.loads(Path(cases_path).read_text())
    opened: set[str] = set()
    watched: set[str] = set()  # the paths the current case must not open

    def audit(event, args):
        if event == "open" and args and isinstance(args[0], str) and args[0] in watched:
            opened.add(args[0])

    sys.addaudithook(audit)
    for case in cases:
        print(json.dumps({"started": case["name"]}), flush=True)
        opened.clear()
        watched.clear()
        watched.update(case.get("watch", ()))
        result = run_case(case)
        result["opened"] = sorted(opened)
        result["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    worker(sys.argv[1])
