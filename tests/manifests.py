"""The full-size key manifests of real checkpoints (tests/fixtures/manifests/, vendored: see its README).

A missing manifest is an error, never a skip: the coverage tests must run on every clone."""

from __future__ import annotations

import json
from pathlib import Path

MANIFESTS = Path(__file__).resolve().parent / "fixtures" / "manifests"


def load_manifest(name: str) -> dict:
    """The parsed `<name>.keys.json`: {key: shape as a tuple} for checkpoint manifests, the raw JSON for the
    others (the LoRA manifest's {"keys": ..., "target_module_weight": ...})."""
    data = json.loads((MANIFESTS / f"{name}.keys.json").read_text())
    if all(isinstance(v, list) for v in data.values()):
        return {key: tuple(shape) for key, shape in data.items()}
    return data
