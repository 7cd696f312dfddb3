"""Textual-inversion embeddings as AUTOMATIC1111 reads and matches them.

As modules/textual_inversion/textual_inversion.py (EmbeddingDatabase.load_from_file, register_embedding_by_name,
find_embedding_at_position):

- a file's token is its NAME without extension (the `name` stored inside a .pt is not used);
- `.pt` / `.bin`: a dict with `string_to_param = {'*': tensor [n, dim]}` (exactly one entry), or a dict holding
  one tensor under any key (diffusers' concept files: `{'<token>': [dim]}`); `.safetensors`: one tensor (kohya /
  A1111 `emp_params` [n, dim]); a 1-D tensor is one vector; every vector is read as float32;
- the name's BPE ids (no start/end tokens) are looked up in a prompt's token stream; among embeddings sharing a
  first id the longest id sequence is tried first (a stable sort: ties keep the order of registration);
- a match is replaced by the embedding's n vectors at the token-embedding level (ldm/prompts.py);
- the hash A1111 writes (`TI hashes: name: hash`) is the first 12 hex digits of the file's sha256.

.pt files are read with the restricted unpickler of ldm/checkpoint.py (no code runs); SDXL embeddings (`clip_g` /
`clip_l`) are refused, as is a width that is not the text encoder's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch

EXTENSIONS = (".pt", ".bin", ".safetensors")


class EmbeddingError(ValueError):
    """A textual-inversion file that cannot be used (one line: file and reason)."""


@dataclass(eq=False)
class Embedding:
    name: str  # the token: the file name without extension
    vec: torch.Tensor  # (n, dim) float32
    path: str = ""
    hash: str = ""  # sha256 of the file

    @property
    def vectors(self) -> int:
        return self.vec.shape[0]

    @property
    def shorthash(self) -> str:
        return self.hash[:12]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: str):
    # the whole object (string_to_param, name, step, ...): A1111's torch.load(map_location="cpu") or
    # safetensors load_file, through ldm/checkpoint.py's reader (a restricted unpickler: no code runs)
    from ldm.checkpoint import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise EmbeddingError(" ".join(str(e).split())) from None


def load_embedding(path: str | os.PathLike) -> Embedding:
    """The embedding in `path` (.pt / .bin / .safetensors); EmbeddingError when it is not one."""
    path = os.fspath(path)
    name, ext = os.path.splitext(os.path.basename(path))
    if ext.lower() not in EXTENSIONS:
        raise EmbeddingError(f"{path}: an embedding is a .pt, .bin or .safetensors file")
    if not os.path.isfile(path):
        raise EmbeddingError(f"embedding not found: {path}")
    data = _read(path)
    if not isinstance(data, dict) or not data:
        raise EmbeddingError(f"{path}: neither a textual-inversion embedding nor a diffusers concept")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # as A1111: a saved ParameterDict
        if len(params) != 1:
            raise EmbeddingError(f"{path}: embedding file has {len(params)} terms in it (expected 1)")
        vec = next(iter(params.values()))
    elif "clip_g" in data and "clip_l" in data:
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_g / clip_l); this model is SD v1 / v2")
    elif all(isinstance(v, torch.Tensor) for v in data.values()):
        if len(data) != 1:
            raise EmbeddingError(f"{path}: embedding file has {len(data)} tensors in it (expected 1)")
        vec = next(iter(data.values()))
    else:
        raise EmbeddingError(f"{path}: neither a textual-inversion embedding nor a diffusers concept")
    if not isinstance(vec, torch.Tensor) or vec.ndim not in (1, 2) or not vec.is_floating_point():
        raise EmbeddingError(f"{path}: the embedding is not a [n, dim] or [dim] float tensor")
    vec = vec.detach().reshape(-1, vec.shape[-1]).to(torch.float32)
    if vec.shape[0] == 0 or not torch.isfinite(vec).all():
        raise EmbeddingError(f"{path}: the embedding has no vectors or non-finite values")
    return Embedding(name, vec, path, _sha256(path))


@dataclass
class EmbeddingDatabase:
    """Embeddings by token, and the lookup of A1111's find_embedding_at_position."""

    ids_lookup: dict[int, list[tuple[list[int], Embedding]]] = field(default_factory=dict)
    word_embeddings: dict[str, Embedding] = field(default_factory=dict)

    def register(self, embedding: Embedding, ids: list[int]) -> None:
        """Add `embedding` under its token's BPE `ids`; a second file of the same name replaces the first."""
        if not ids:
            raise EmbeddingError(f"{embedding.path}: the file name {embedding.name!r} has no tokens")
        lookup = [item for item in self.ids_lookup.get(ids[0], []) if item[1].name != embedding.name]
        lookup.append((list(ids), embedding))
        self.ids_lookup[ids[0]] = sorted(lookup, key=lambda item: len(item[0]), reverse=True)
        self.word_embeddings[embedding.name] = embedding

    def find_at(self, tokens: list[int], offset: int) -> tuple[Embedding | None, int]:
        """(embedding, number of prompt tokens it replaces) starting at tokens[offset], or (None, 0)."""
        for ids, embedding in self.ids_lookup.get(tokens[offset], ()):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, 0

    def __bool__(self) -> bool:
        return bool(self.word_embeddings)


def load_embeddings(paths, text_encoder) -> EmbeddingDatabase:
    """An EmbeddingDatabase of the files in `paths` for `text_encoder` (ldm/models/clip_text.py or
    openclip_text.py): names tokenized in its convention, widths checked against its token embedding."""
    from ldm.models.tokenizer import encode

    database = EmbeddingDatabase()
    width = text_encoder.token_embedding.weight.shape[1]
    for path in paths:
        embedding = load_embedding(path)
        if embedding.vec.shape[1] != width:
            raise EmbeddingError(f"{embedding.path}: embedding width {embedding.vec.shape[1]} does not match the "
                                 f"text encoder's {width} (an embedding for another model)")
        database.register(embedding, encode(embedding.name, text_encoder.convention))
    return database
