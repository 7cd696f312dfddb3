"""Running AUTOMATIC1111's own functions outside the web UI, for tests/make_fixtures_a1111.py only (nothing here is
imported by the tests).

A1111's modules import the whole application (shared options, devices, the hijacked CompVis model, gradio, ...).
The files we execute (prompt_parser.py, sd_emphasis.py, sd_hijack_clip.py, sd_hijack_open_clip.py,
extra_networks.py, extensions-builtin/Lora/{network,network_lora,networks,lyco_helpers}.py) are imported from a
checkout passed on the command line, UNCHANGED; what they import from the rest of the application is replaced by
small stand-ins holding A1111 1.x's default settings (`OPTS`). The two classes that live in files importing
training or hijack machinery (textual_inversion.py EmbeddingDatabase / Embedding, sd_hijack.py
EmbeddingsWithFixes) are executed from their own source text, cut out of the file with `ast`.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

# modules/shared_options.py defaults (A1111 1.x) that the executed functions read
OPTS = dict(emphasis="Original", comma_padding_backtrack=20, CLIP_stop_at_last_layers=1,
            use_old_emphasis_implementation=False, textual_inversion_add_hashes_to_infotext=True,
            lora_functional=False, sdxl_clip_l_skip=False)


class _Anything(types.ModuleType):
    """A stand-in module: any attribute is a harmless placeholder."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = types.SimpleNamespace()
        setattr(self, name, value)
        return value


def _stub(name: str, **attrs) -> types.ModuleType:
    module = sys.modules.get(name)
    if module is None:
        module = _Anything(name)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(_stub(parent), child, module)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(_stub(parent), child, module)
    spec.loader.exec_module(module)
    return module


def extract(path: Path, names: list[str], namespace: dict) -> dict:
    """Execute the top-level definitions `names` of the file at `path` in `namespace` (returned)."""
    tree = ast.parse(path.read_text())
    nodes = [node for node in tree.body if getattr(node, "name", None) in names]
    missing = set(names) - {node.name for node in nodes}
    if missing:
        raise LookupError(f"{path}: no top-level {sorted(missing)}")
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


class A1111:
    """The executed A1111 modules: `prompt_parser`, `sd_emphasis`, `sd_hijack_clip`, `sd_hijack_open_clip`,
    `extra_networks`, `networks`, `network`, `network_lora`; `EmbeddingDatabase`, `Embedding`,
    `EmbeddingsWithFixes`; `opts` and `shared` (set `shared.sd_model` before loading networks)."""

    def __init__(self, root: Path, lora_dir: Path):
        root = Path(root)
        self.root = root
        self.opts = types.SimpleNamespace(**OPTS)
        self.devices = _stub("modules.devices", device=torch.device("cpu"), cpu=torch.device("cpu"),
                             dtype=torch.float32, torch_npu_set_device=lambda: None,
                             cond_cast_unet=lambda x: x)
        self.hijack = types.SimpleNamespace(fixes=None, extra_generation_params={}, embedding_db=None, comments=[])
        os.makedirs(lora_dir, exist_ok=True)
        self.shared = _stub("modules.shared", opts=self.opts, sd_model=None,
                            cmd_opts=types.SimpleNamespace(lora_dir=str(lora_dir), lyco_dir_backcompat=str(lora_dir)),
                            walk_files=lambda *a, **k: [])
        _stub("modules.sd_hijack", model_hijack=self.hijack)
        _stub("modules.errors", display=lambda e, task: (_ for _ in ()).throw(e), report=print)
        _stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (torch.nn.Module,), {}))
        for name in ("modules.sd_models", "modules.cache", "modules.hashes", "modules.scripts"):
            _stub(name)
        for name in ("network_hada", "network_ia3", "network_lokr", "network_full"):  # other LyCORIS types
            kind = name.split("_")[1].capitalize()
            _stub(name, **{f"ModuleType{kind}": type(kind, (), {"create_module": lambda self, net, w: None})})
        modules = root / "modules"
        lora = root / "extensions-builtin" / "Lora"
        self.prompt_parser = _load("modules.prompt_parser", modules / "prompt_parser.py")
        self.sd_emphasis = _load("modules.sd_emphasis", modules / "sd_emphasis.py")
        self.sd_hijack_clip = _load("modules.sd_hijack_clip", modules / "sd_hijack_clip.py")
        self.sd_hijack_open_clip = _load("modules.sd_hijack_open_clip", modules / "sd_hijack_open_clip.py")
        self.extra_networks = _load("modules.extra_networks", modules / "extra_networks.py")
        self.lyco_helpers = _load("lyco_helpers", lora / "lyco_helpers.py")
        self.network = _load("network", lora / "network.py")
        self.network_lora = _load("network_lora", lora / "network_lora.py")
        self.networks = _load("networks", lora / "networks.py")
        ti = extract(modules / "textual_inversion" / "textual_inversion.py", ["Embedding", "EmbeddingDatabase"],
                     {"torch": torch, "os": os, "shared": self.shared, "devices": self.devices,
                      "hashes": _stub("modules.hashes"), "safetensors": __import__("safetensors.torch")})
        self.Embedding, self.EmbeddingDatabase = ti["Embedding"], ti["EmbeddingDatabase"]
        self.EmbeddingsWithFixes = extract(modules / "sd_hijack.py", ["EmbeddingsWithFixes"],
                                           {"torch": torch, "devices": self.devices})["EmbeddingsWithFixes"]

    def sources(self) -> dict[str, str]:
        import hashlib

        files = ["modules/prompt_parser.py", "modules/sd_emphasis.py", "modules/sd_hijack_clip.py",
                 "modules/sd_hijack_open_clip.py", "modules/extra_networks.py", "modules/sd_hijack.py",
                 "modules/textual_inversion/textual_inversion.py", "extensions-builtin/Lora/networks.py",
                 "extensions-builtin/Lora/network.py", "extensions-builtin/Lora/network_lora.py",
                 "extensions-builtin/Lora/lyco_helpers.py"]
        return {f: hashlib.sha256((self.root / f).read_bytes()).hexdigest() for f in files}
