"""ldm/checkpoint.py: reading .ckpt/.pt (zip, legacy, plain pickle) and .safetensors without running code."""

import gc
import os
import pickle
import subprocess
import sys
import types
import uuid
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, UnsafeCheckpointError, read_checkpoint, read_state_dict
from ldm.unpickler import Placeholder


def _tensors():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=generator)
    return OrderedDict([
        ("w", weight),
        ("h", torch.randn(2, 5, generator=generator).half()),
        ("b", torch.randn(3, generator=generator).to(torch.bfloat16)),
        ("i", torch.arange(7, dtype=torch.int64)),
        ("s", torch.tensor(0.5)),
        ("view", weight[1:, ::2]),  # shares w's storage, non-contiguous
    ])


def _assert_same(loaded, expected):
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_torch_formats_round_trip(tmp_path, zipped):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _tensors(), "global_step": 7}, path, _use_new_zipfile_serialization=zipped)
    obj = read_checkpoint(path)
    assert obj["global_step"] == 7
    _assert_same(obj["state_dict"], _tensors())
    # a view keeps sharing its base's storage, as torch.load gives it
    state = obj["state_dict"]
    assert state["view"].untyped_storage().data_ptr() == state["w"].untyped_storage().data_ptr()
    _assert_same(read_state_dict(path), _tensors())


def test_mapped_tensors_are_copy_on_write(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(_tensors(), path)
    first = read_state_dict(path)
    first["w"].add_(1.0)  # must not reach the file
    _assert_same(read_state_dict(path), _tensors())


def test_tensors_are_freed_without_garbage_collection(tmp_path):
    # no reference cycle (unpickler memo, storage cache) may keep memory maps alive after the caller drops
    # them: the loader relies on it to release each source tensor right after converting it
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _tensors()}, path)
    gc.disable()
    try:
        state = read_state_dict(path)
        refs = [weakref.ref(tensor) for tensor in state.values()]
        del state
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_safetensors_round_trip(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items() if k != "view"}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    loaded = read_state_dict(path)
    _assert_same(dict(sorted(loaded.items())), dict(sorted(tensors.items())))


def test_fp16_file_reads_as_stored(tmp_path):
    # the reader never converts; the loader casts (see test_loader.py::test_fp16_file_gives_float32_model)
    half = {"w": torch.randn(3, 3).half()}
    torch.save(half, tmp_path / "half.ckpt")
    save_file(half, str(tmp_path / "half.safetensors"))
    for name in ("half.ckpt", "half.safetensors"):
        loaded = read_state_dict(tmp_path / name)["w"]
        assert loaded.dtype == torch.float16 and torch.equal(loaded, half["w"])


# ---------------------------------------------------------------------------------------------------------
# hostile pickles: refused, never run


class _Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    return {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "builtins.eval": _Payload(eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": _Payload(subprocess.Popen, (["touch", str(marker)],)),
    }


def _global_name(payload):
    # how pickle spells the function (os.system is posix.system on Linux)
    return f"{payload.func.__module__}.{payload.func.__qualname__}"


def test_payload_is_live_under_plain_pickle(tmp_path):
    # control: the same payload does run under the standard unpickler, so the checks below can fail
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    pickle.loads(pickle.dumps(_payloads(marker)["os.system"]))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
@pytest.mark.parametrize("container", ["zip", "legacy", "plain"])
def test_hostile_pickle_is_refused(tmp_path, kind, container):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    payload = _payloads(marker)[kind]
    path = tmp_path / f"evil-{container}.ckpt"
    obj = {"state_dict": {"w": torch.ones(2)}, "callbacks": payload}
    if container == "plain":
        path.write_bytes(pickle.dumps({"callbacks": payload}, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and _global_name(payload) in message and "\n" not in message
    assert isinstance(info.value, CheckpointError)  # the CLI handles one error type
    assert not marker.exists()


def _global_reduce_pickle(module, name, opcode):
    """module.name() as a minimal pickle: GLOBAL (protocol 0-3), STACK_GLOBAL (4+) or INST (protocol 0)."""
    if opcode == "GLOBAL":
        return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    if opcode == "STACK_GLOBAL":
        encode = lambda s: b"\x8c" + bytes([len(s)]) + s.encode()  # SHORT_BINUNICODE
        return b"\x80\x04" + encode(module) + encode(name) + b"\x93)R."
    return b"(i" + f"{module}\n{name}\n".encode() + b"."


@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL", "INST"])
@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"), ("builtins", "exec"),
    ("builtins", "getattr"), ("builtins", "__import__"), ("builtins", "open"), ("__builtin__", "eval"),
    ("subprocess", "Popen"), ("sys", "exit"), ("importlib", "import_module"), ("runpy", "run_path"),
    ("functools", "partial"), ("operator", "attrgetter"), ("torch._ops", "ops"), ("webbrowser", "open"),
    ("shutil", "rmtree"), ("pickle", "loads"), ("copyreg", "_reconstructor"), ("torch", "load"),
    ("torch.storage", "_load_from_bytes"), ("torch._utils", "_rebuild_from_type_v2"), ("collections", "deque"),
])
def test_dangerous_globals_are_refused(tmp_path, module, name, opcode):
    path = tmp_path / "evil.pt"
    path.write_bytes(_global_reduce_pickle(module, name, opcode))
    spelled = "builtins" if module == "__builtin__" else module  # reported under its Python 3 name
    with pytest.raises(UnsafeCheckpointError, match=f"'{spelled}.{name}'"):
        read_checkpoint(path)


def test_placeholder_call_stays_inert(tmp_path):
    # REDUCE on a placeholder class records the arguments instead of calling anything
    path = tmp_path / "inert.pt"
    path.write_bytes(b"\x80\x02cpytorch_lightning.utilities\nrun_me\nX\x04\x00\x00\x00argsq\x00\x85R.")
    obj = read_checkpoint(path)
    assert isinstance(obj, Placeholder)
    assert obj.qualname == "pytorch_lightning.utilities.run_me" and obj.args == ("args",)


def _fake_module(monkeypatch, qualname):
    """Register `qualname` and its parents in sys.modules (undone by monkeypatch)."""
    parts = qualname.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    return sys.modules[qualname]


def test_lightning_callback_becomes_placeholder(tmp_path, monkeypatch):
    # as sd-v1-4.ckpt: {"callbacks": {ModelCheckpoint: {...}}} next to the state_dict, written here with a
    # stand-in class under Lightning's module name (pytorch_lightning is not installed)
    path = tmp_path / "lightning.ckpt"
    with monkeypatch.context() as patch:
        module = _fake_module(patch, "pytorch_lightning.callbacks.model_checkpoint")

        class ModelCheckpoint:
            def __init__(self):
                self.dirpath, self.best_k_models = "/logs", {"a": torch.tensor(1.0)}

            def __setstate__(self, state):  # would run under a normal unpickler
                raise AssertionError("the real class must not be used")

        ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
        module.ModelCheckpoint = ModelCheckpoint
        torch.save({"state_dict": _tensors(), "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
                    "trainer": ModelCheckpoint(), "pytorch-lightning_version": "1.4.2"}, path)
    assert "pytorch_lightning" not in sys.modules
    obj = read_checkpoint(path)
    assert "pytorch_lightning" not in sys.modules  # nothing was imported
    _assert_same(obj["state_dict"], _tensors())
    (callback_class, callback_state), = obj["callbacks"].items()
    assert issubclass(callback_class, Placeholder)
    assert callback_class.qualname == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert torch.equal(callback_state["best_model_score"], torch.tensor(0.5))
    trainer = obj["trainer"]
    assert isinstance(trainer, callback_class) and trainer.state["dirpath"] == "/logs"
    _assert_same(read_state_dict(path), _tensors())


def test_numpy_scalars_load(tmp_path):
    path = tmp_path / "numpy.ckpt"
    torch.save({"state_dict": _tensors(), "best": np.float64(1.5), "step": np.int64(3),
                "array": np.arange(3.0)}, path)
    obj = read_checkpoint(path)
    assert isinstance(obj["best"], Placeholder) and obj["best"].qualname.endswith("multiarray.scalar")
    # the raw bytes are kept; a reader who wants the number can decode them
    assert np.frombuffer(obj["best"].args[1], dtype=np.float64)[0] == 1.5
    _assert_same(read_state_dict(path), _tensors())


# ---------------------------------------------------------------------------------------------------------
# files that are not checkpoints: one-line CheckpointError naming the path


def _bad_files(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": _tensors()}, good)
    legacy = tmp_path / "good-legacy.ckpt"
    torch.save({"state_dict": _tensors()}, legacy, _use_new_zipfile_serialization=False)
    safe = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(safe))
    files = {
        "missing": tmp_path / "does-not-exist.ckpt",
        "directory": tmp_path,
        "empty": tmp_path / "empty.ckpt",
        "random": tmp_path / "random.ckpt",
        "truncated zip": tmp_path / "truncated.ckpt",
        "truncated legacy": tmp_path / "truncated-legacy.ckpt",
        "truncated safetensors": tmp_path / "truncated.safetensors",
        "text": tmp_path / "config.yaml",
        "not a state dict": tmp_path / "list.ckpt",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["truncated zip"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated legacy"].write_bytes(legacy.read_bytes()[:-10])
    files["truncated safetensors"].write_bytes(safe.read_bytes()[:-100])
    files["text"].write_text("model:\n  target: x\n")
    torch.save([torch.ones(1)], files["not a state dict"])
    return files


def test_bad_files_raise_one_line_checkpoint_error(tmp_path):
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            read_state_dict(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, (kind, message)
        assert not isinstance(info.value, UnsafeCheckpointError), kind
