"""CLIP byte-level BPE tokenization in the two conventions of Stable Diffusion v1 and v2.

Both text encoders use the same 49408-entry CLIP vocabulary (open_clip ships its BPE merges as
bpe_simple_vocab_16e6.txt.gz; transformers' vocab.json/merges.txt for openai/clip-vit-large-patch14 hold the
same table), so the BPE itself comes from open_clip's SimpleTokenizer. What differs is the text cleaning, the
spelling of the special tokens a prompt may contain, and the padding id:

- "transformers" (SD v1, CompVis ldm/modules/encoders/modules.py FrozenCLIPEmbedder): transformers'
  slow CLIPTokenizer (transformers < 5, models/clip/tokenization_clip.py `_tokenize`) with
  `truncation=True, max_length=77, padding="max_length"`. Cleaning is ftfy.fix_text, whitespace runs to one
  space, strip, lower case; no HTML unescaping beyond ftfy's own. Literal "<|startoftext|>" / "<|endoftext|>"
  in a prompt become the special ids. Padding is <|endoftext|> = 49407 (its pad_token).
- "open_clip" (SD v2, Stability-AI ldm/modules/encoders/modules.py FrozenOpenCLIPEmbedder calling
  open_clip.tokenize): open_clip's own SimpleTokenizer.encode (ftfy.fix_text, html.unescape twice, whitespace,
  lower case; literal "<start_of_text>" / "<end_of_text>" become the special ids). Padding is 0.

Both truncate the same way: start-of-text, the first context_length - 2 BPE ids, end-of-text, so that
end-of-text stays the last token of a truncated prompt.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch

SOT = 49406  # <|startoftext|>, the second-to-last entry of the CLIP vocabulary
EOT = 49407  # <|endoftext|>, the last entry
CONTEXT_LENGTH = 77  # CLIP's text context (open_clip DEFAULT_CONTEXT_LENGTH, FrozenCLIPEmbedder max_length)
PAD = {"transformers": EOT, "open_clip": 0}

# transformers' CLIPTokenizer pre-tokenizer; its special tokens are spelled <|...|> (open_clip's are <...>).
# Matched with the `regex` module because \p{L} / \p{N} need Unicode property classes.
_HF_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_HF_SPECIAL = {"<|startoftext|>": SOT, "<|endoftext|>": EOT}


class Tokens(NamedTuple):
    """Token ids of a batch of prompts and what truncation removed (so callers can warn)."""

    ids: torch.Tensor  # (B, context_length) int64
    truncated: list[bool]  # per prompt: did its BPE ids not fit into context_length - 2?
    dropped: list[str]  # per prompt: decoded text of the ids that were cut off ("" if none)


@functools.lru_cache(maxsize=1)
def _open_clip_tokenizer():
    # open_clip's tokenizer module has no package-relative imports, so it is loaded by itself: importing the
    # open_clip package would also import torchvision and timm (several seconds per process) for nothing.
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open-clip-torch is required for tokenization (pip install open-clip-torch)")
    path = next(iter(spec.submodule_search_locations)) + "/tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_ldm_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    tokenizer = module.SimpleTokenizer()
    if (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.vocab_size) != (SOT, EOT, 49408):
        raise RuntimeError("open_clip's bundled BPE vocabulary is not the 49408-entry CLIP vocabulary")
    return tokenizer


@functools.lru_cache(maxsize=1)
def _hf_pattern():
    import regex  # a dependency of open_clip (and of transformers); the stdlib `re` lacks \p{...}

    return regex.compile(_HF_PATTERN, regex.IGNORECASE)


def _encode_transformers(text: str) -> list[int]:
    """BPE ids of one prompt, as transformers' slow CLIPTokenizer (with ftfy installed) produces them."""
    import ftfy  # a dependency of open_clip

    tokenizer = _open_clip_tokenizer()
    ids = []
    # PreTrainedTokenizer.tokenize first splits the raw text at the literal special tokens (case-sensitive, no
    # cleaning), then _tokenize cleans and splits each remaining chunk; so "!!<|endoftext|>" is "!!" + EOT, not
    # one punctuation run "!!<|" followed by "endoftext" and "|>".
    for chunk in re.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text):
        if chunk in _HF_SPECIAL:
            ids.append(_HF_SPECIAL[chunk])
            continue
        chunk = re.sub(r"\s+", " ", ftfy.fix_text(chunk)).strip().lower()
        for piece in _hf_pattern().findall(chunk):
            if piece in _HF_SPECIAL:  # e.g. "<|ENDOFTEXT|>" after lower(): bpe()'s cache maps it to the id
                ids.append(_HF_SPECIAL[piece])
                continue
            # bytes -> printable unicode stand-ins, the alphabet the BPE merges are written in
            word = "".join(tokenizer.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(tokenizer.encoder[t] for t in tokenizer.bpe(word).split(" "))
    return ids


def encode(text: str, convention: str = "open_clip") -> list[int]:
    """BPE ids of one prompt without start/end tokens."""
    if convention == "transformers":
        return _encode_transformers(text)
    if convention == "open_clip":
        return _open_clip_tokenizer().encode(text)
    raise ValueError(f"unknown tokenizer convention {convention!r} (expected one of {sorted(PAD)})")


def decode(ids: Sequence[int]) -> str:
    """Text of BPE ids (end-of-word markers become spaces), for messages about truncated prompts."""
    return _open_clip_tokenizer().decode(list(ids)).strip()


def pieces(ids: Sequence[int]) -> list[str]:
    """The vocabulary entries of BPE ids as text, "</w>" marking a word's last piece ("astronaut</w>"; a word
    split in two is "astro", "naut</w>"), e.g. to label per-token attention maps and merge them into words."""
    tokenizer = _open_clip_tokenizer()
    return [bytearray(tokenizer.byte_decoder[c] for c in tokenizer.decoder[int(i)]).decode("utf-8", "replace")
            for i in ids]


def tokenize(prompts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, pad_id: int | None = None,
             convention: str = "open_clip") -> Tokens:
    """Token ids (B, context_length): start-of-text, BPE ids, end-of-text, then pad_id.

    pad_id defaults to the convention's padding (49407 for "transformers", 0 for "open_clip").
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings; prompts[{i}] is of type {type(prompt).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must leave room for start and end tokens, got {context_length}")
    if convention not in PAD:
        raise ValueError(f"unknown tokenizer convention {convention!r} (expected one of {sorted(PAD)})")
    if pad_id is None:
        pad_id = PAD[convention]
    ids = torch.full((len(prompts), context_length), pad_id, dtype=torch.int64)
    truncated, dropped = [], []
    for i, prompt in enumerate(prompts):
        body = encode(prompt, convention)
        keep = context_length - 2
        truncated.append(len(body) > keep)
        dropped.append(decode(body[keep:]) if len(body) > keep else "")
        row = [SOT, *body[:keep], EOT]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return Tokens(ids, truncated, dropped)
