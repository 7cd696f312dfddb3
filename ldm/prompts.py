"""Prompts as AUTOMATIC1111 reads them (`--prompt_syntax a1111`), textual inversion and clip skip.

The original (CompVis / Stability) reads a prompt as plain text: start-of-text, the first 75 BPE ids, end-of-text,
padded to 77 (ldm/models/tokenizer.py); that stays the default, `syntax="plain"`. With `syntax="a1111"` a prompt
goes through A1111 1.x with its default settings (modules/prompt_parser.py, modules/sd_hijack_clip.py,
modules/sd_emphasis.py, modules/extra_networks.py):

1. `<name:args>` extra-network tags are cut out of the prompt (`<lora:NAME[:TE[:UNET]]>` selects a LoRA, the
   tags of the FIRST prompt of a batch count: extra_networks.parse_prompts; the negative prompt is not parsed
   for them, as in A1111's processing.py). `parse_prompt_attention`: `(t)` x1.1, `((t))` x1.21, `(t:1.3)`,
   `[t]` / 1.1, nesting multiplies, `\\( \\) \\[ \\] \\\\` are literal, an unclosed bracket runs to the end,
   `BREAK` separates chunks, neighbours of equal weight merge. Prompt editing `[a:b:N]`, alternation `[a|b]` and
   `AND` (composable diffusion) are NOT implemented: their brackets read as emphasis, as A1111's parser alone
   reads them.
2. Each fragment is tokenized alone (no start/end ids) and packed into chunks of 75 (`split_chunks`): when a
   chunk is full and a comma was among its last 20 tokens (comma_padding_backtrack), what follows the comma moves
   to the next chunk; BREAK closes a chunk; a chunk is start + 75 (end-of-text padded) + end, weight 1 on those.
3. Each chunk is encoded alone (batch of one prompt, as A1111 encodes a prompt at a time), with clip skip; then
   `z *= weights` and `z *= mean(z before) / mean(z after)` over the chunk ("Original" emphasis); the chunks of a
   prompt are concatenated on the token axis (77 k tokens). Prompts of a batch with fewer chunks are padded by
   repeating their last token vector (prompt_parser.stack_conds).

Textual inversion works in both syntaxes: a prompt's BPE ids that spell an embedding's file name are replaced by
its vectors at the token-embedding level (ldm/embeddings.py); in a chunk an embedding that does not fit starts the
next one, and its vectors carry the weight of their fragment. Clip skip N >= 2 (A1111's numbering) is the
transformers hidden_states[-N] of the SD v1 text encoder followed by its final LayerNorm; SD 2 has none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ldm.embeddings import Embedding, EmbeddingDatabase

SYNTAXES = ("plain", "a1111")
CHUNK_LENGTH = 75  # BPE positions of a chunk between its start and end tokens
COMMA_PADDING_BACKTRACK = 20  # A1111's default "comma_padding_backtrack" (modules/shared_options.py)
COMMA = 267  # ",</w>" in the CLIP vocabulary

# ------------------------------------------------------------------------------------------ extra networks
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # extra_networks.py re_extra_net
LORA_TAGS = ("lora", "lyco")  # the Lora extension answers to both names


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:a:b:c>` tag: positional and `key=value` arguments (extra_networks.ExtraNetworkParams)."""

    kind: str
    positional: tuple[str, ...]
    named: tuple[tuple[str, str], ...] = ()

    def lora_multipliers(self) -> tuple[float, float]:
        """(text encoder, UNet) multipliers as extra_networks_lora.py reads them: te = 2nd argument or
        `te=`, default 1; unet = 3rd argument or `unet=`, default te."""
        named = dict(self.named)
        te = float(named.get("te", self.positional[1] if len(self.positional) > 1 else 1.0))
        unet = float(named.get("unet", self.positional[2] if len(self.positional) > 2 else te))
        return te, unet


def parse_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """The prompt without its `<kind:args>` tags, and the tags in order."""
    tags = []

    def found(m: re.Match) -> str:
        positional, named = [], []
        for item in m.group(2).split(":"):
            parts = item.split("=", 2)
            if len(parts) == 2:
                named.append((parts[0], parts[1]))
            else:
                positional.append(item)
        tags.append(ExtraNetwork(m.group(1), tuple(positional), tuple(named)))
        return ""

    return EXTRA_NETWORK.sub(found, prompt), tags


# ------------------------------------------------------------------------------------------------ emphasis
# prompt_parser.py re_attention: escapes, brackets, a closing weight ":1.3)" (spaces allowed around the number),
# runs of ordinary text, and a lone ':'
ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_prompt_attention(text: str) -> list[list]:
    """[[text, weight], ...] of a prompt in A1111's emphasis syntax; ["BREAK", -1] marks a chunk break."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for start in round_open:  # unclosed brackets run to the end
        multiply_from(start, ROUND)
    for start in square_open:
        multiply_from(start, SQUARE)
    if not res:
        res = [["", 1.0]]
    i = 0  # merge neighbours of identical weight
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


# ----------------------------------------------------------------------------------------------- chunking
@dataclass
class Chunk:
    """start + 75 + end token ids, their weights, and (offset after start, embedding) replacements."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


def split_chunks(fragments: Sequence[tuple[list[int] | None, float]], database: EmbeddingDatabase | None,
                 id_start: int, id_end: int, backtrack: int = COMMA_PADDING_BACKTRACK) -> list[Chunk]:
    """Chunks of a prompt's tokenized fragments ((ids, weight); (None, -1) for BREAK), as
    sd_hijack_clip.py TextConditionalModel.tokenize_line."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        pad = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens = [id_start] + chunk.tokens + [id_end] * max(pad, 0) + [id_end]
        chunk.weights = [1.0] + chunk.weights + [1.0] * max(pad, 0) + [1.0]
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for tokens, weight in fragments:
        if tokens is None:
            close()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == COMMA:
                last_comma = len(chunk.tokens)
            elif (backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.tokens) - last_comma <= backtrack):
                # a full chunk with a comma near its end: what follows the comma moves on. As A1111, the
                # embedding replacements stay with the chunk they were first placed in.
                cut = last_comma + 1
                moved_tokens, moved_weights = chunk.tokens[cut:], chunk.weights[cut:]
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                close()
                chunk.tokens, chunk.weights = moved_tokens, moved_weights
            if len(chunk.tokens) == CHUNK_LENGTH:
                close()
            embedding, length = database.find_at(tokens, position) if database else (None, 0)
            if embedding is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            if len(chunk.tokens) + embedding.vectors > CHUNK_LENGTH:
                close()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * embedding.vectors
            chunk.weights += [weight] * embedding.vectors
            position += length
    if chunk.tokens or not chunks:
        close()
    return chunks


def plain_chunk(tokens: list[int], database: EmbeddingDatabase | None, id_start: int, id_end: int,
                id_pad: int) -> tuple[Chunk, bool]:
    """The original's one chunk (start, 75 positions, end, padding) with embeddings expanded; and whether
    the prompt was truncated. An embedding that does not fit is cut (A1111's EmbeddingsWithFixes)."""
    body: list[int] = []
    fixes: list[tuple[int, Embedding]] = []
    position = 0
    while position < len(tokens):
        embedding, length = database.find_at(tokens, position) if database else (None, 0)
        if embedding is None:
            body.append(tokens[position])
            position += 1
            continue
        fixes.append((len(body), embedding))
        body += [0] * embedding.vectors
        position += length
    truncated = len(body) > CHUNK_LENGTH
    body = body[:CHUNK_LENGTH]
    fixes = [(offset, e) for offset, e in fixes if offset < CHUNK_LENGTH]
    row = [id_start] + body + [id_end]
    return Chunk(row + [id_pad] * (CHUNK_LENGTH + 2 - len(row)), [1.0] * (CHUNK_LENGTH + 2), fixes), truncated


def prompt_chunks(text_encoder, prompt: str, database: EmbeddingDatabase | None = None) -> list[Chunk]:
    """A1111's chunks of one prompt (tags already removed) for `text_encoder`'s tokenizer convention."""
    from ldm.models.tokenizer import encode

    parsed = parse_prompt_attention(prompt)
    fragments = [(None, -1.0) if (text == "BREAK" and weight == -1) else (encode(text, text_encoder.convention),
                                                                           weight) for text, weight in parsed]
    return split_chunks(fragments, database, text_encoder.id_start, text_encoder.id_end)


# ---------------------------------------------------------------------------------------------- encoding
def encode_chunk(text_encoder, chunks: Sequence[Chunk], clip_skip: int = 1, emphasis: bool = True) -> torch.Tensor:
    """(B, 77, D): one chunk per batch row through the text encoder, embeddings placed at the token-embedding
    level (sd_hijack.py EmbeddingsWithFixes), then A1111's "Original" emphasis over the whole (B, 77, D)."""
    weight = text_encoder.token_embedding.weight
    ids = torch.tensor([chunk.tokens for chunk in chunks], dtype=torch.int64)
    if text_encoder.id_end != text_encoder.id_pad:
        # SD 2: padding after the first end-of-text (sd_hijack_clip.py process_tokens)
        for row, chunk in zip(ids, chunks):
            row[chunk.tokens.index(text_encoder.id_end) + 1:] = text_encoder.id_pad
    ids = ids.to(weight.device)
    token_embeds = text_encoder.token_embedding(ids)
    for b, chunk in enumerate(chunks):
        for offset, embedding in chunk.fixes:
            n = min(ids.shape[1] - offset - 1, embedding.vectors)
            token_embeds[b, offset + 1:offset + 1 + n] = embedding.vec[:n].to(token_embeds)
    z = text_encoder.encode_embeds(ids, token_embeds, clip_skip)
    if not emphasis:
        return z
    # sd_emphasis.py EmphasisOriginal: restoring the mean "seems to work well to prevent artifacts"
    weights = torch.tensor([chunk.weights for chunk in chunks]).to(z.device)
    original_mean = z.mean()
    z = z * weights.reshape(weights.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def stack_conds(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(B, T, D) from (T_i, D) contexts of different lengths: shorter ones repeat their last vector
    (prompt_parser.py stack_conds)."""
    length = max(t.shape[0] for t in tensors)
    return torch.stack([t if t.shape[0] == length else torch.vstack([t, t[-1:].repeat(length - t.shape[0], 1)])
                        for t in tensors])


@dataclass(frozen=True)
class TextOptions:
    """How prompts become contexts: `syntax` ("plain" = the original, "a1111"), A1111's `clip_skip` (1 = the
    last layer), textual-inversion `embeddings`. The default is the original's encoding, bit for bit."""

    syntax: str = "plain"
    clip_skip: int = 1
    embeddings: EmbeddingDatabase | None = None

    def __post_init__(self):
        if self.syntax not in SYNTAXES:
            raise ValueError(f"unknown prompt syntax {self.syntax!r}; valid: {', '.join(SYNTAXES)}")
        if self.clip_skip < 1:
            raise ValueError(f"clip skip must be at least 1 (A1111's numbering), got {self.clip_skip}")

    @property
    def is_original(self) -> bool:
        return self.syntax == "plain" and self.clip_skip == 1 and not self.embeddings


def encode_prompt(text_encoder, prompt: str, options: TextOptions) -> torch.Tensor:
    """(77 k, D) context of one prompt under `options` (A1111 tags must be removed already)."""
    if options.syntax == "plain":
        from ldm.models.tokenizer import encode

        chunk, _ = plain_chunk(encode(prompt, text_encoder.convention), options.embeddings, text_encoder.id_start,
                               text_encoder.id_end, text_encoder.id_pad)
        return encode_chunk(text_encoder, [chunk], options.clip_skip, emphasis=False)[0]
    chunks = prompt_chunks(text_encoder, prompt, options.embeddings)
    return torch.cat([encode_chunk(text_encoder, [chunk], options.clip_skip)[0] for chunk in chunks])


def encode(text_encoder, prompts: Sequence[str], options: TextOptions, strip_tags: bool = True) -> torch.Tensor:
    """(B, 77 k, D) contexts of `prompts`: each distinct prompt encoded once, alone (A1111 caches by prompt);
    with the a1111 syntax `<...>` tags are removed first (`strip_tags=False` for negative prompts)."""
    if options.syntax == "a1111" and strip_tags:
        prompts = [parse_extra_networks(p)[0] for p in prompts]
    cache: dict[str, torch.Tensor] = {}
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = encode_prompt(text_encoder, prompt, options)
    return stack_conds([cache[p] for p in prompts])


def used_embeddings(text_encoder, prompts: Sequence[str], options: TextOptions,
                    strip_tags: bool = True) -> list[Embedding]:
    """The embeddings the prompts use, in order of first use (A1111's `TI hashes`)."""
    from ldm.models.tokenizer import encode as bpe

    if not options.embeddings:
        return []
    found: dict[str, Embedding] = {}
    for prompt in dict.fromkeys(prompts):
        if options.syntax == "a1111":
            text = parse_extra_networks(prompt)[0] if strip_tags else prompt
            chunks = prompt_chunks(text_encoder, text, options.embeddings)
        else:
            chunks = [plain_chunk(bpe(prompt, text_encoder.convention), options.embeddings, 0, 0, 0)[0]]
        for chunk in chunks:
            for _, embedding in chunk.fixes:
                found.setdefault(embedding.name, embedding)
    return list(found.values())
