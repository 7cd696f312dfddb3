"""The command line's LoRA, textual-inversion, prompt-syntax and clip-skip flags (README, "LoRA, embeddings, A1111
prompts"): the flags, their checks before anything is written, and what each image records of them.

Recorded as A1111's infotext does: `Lora hashes: "name: hash, ..."` (the LoRAs of the image's batch, named as the
prompt tag or the file; kohya's hash of a .safetensors, else the file's sha256, 12 digits), `TI hashes` (the
embeddings the prompt and the negative prompt use, the prompt's first, as sd_hijack_clip.py appends them),
`Clip skip` (when above 1); and what rerun needs to replay them (record.TEXT_FIELDS: the syntax, --lora PATH:SCALE
entries, --lora_dir, --embedding paths).
"""

from __future__ import annotations

import argparse
import os
import warnings

from ldm.cli.flags import CLIError
from ldm.embeddings import EXTENSIONS as EMBEDDING_EXTENSIONS
from ldm.embeddings import EmbeddingError
from ldm.lora import LoraError
from ldm.prompts import SYNTAXES


def add_text_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA, textual inversion, A1111 prompts (see README)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA / LoCon file (kohya / A1111 format) with this scale (default 1.0) into the UNet "
                        "and text encoder; repeatable, several LoRAs add")
    g.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="textual-inversion embedding (.pt, .bin, .safetensors); its token is the file name without "
                        "extension; repeatable")
    g.add_argument("--prompt_syntax", choices=SYNTAXES, default="plain",
                   help="plain: the original (text as is, 77 tokens); a1111: AUTOMATIC1111's (word:1.2) emphasis, "
                        "BREAK, prompts longer than 75 tokens, <lora:NAME:SCALE> tags")
    g.add_argument("--lora_dir", type=str, default=None,
                   help="with --prompt_syntax a1111: where <lora:NAME> tags find NAME.safetensors (.pt, .ckpt)")
    g.add_argument("--clip_skip", type=int, default=1,
                   help="A1111's clip skip: 1 = the last layer (default), N = the N-th layer from the end, then "
                        "the final LayerNorm (diffusers' clip_skip=k is N=k+1); SD v1 only, ignored for SD 2")


def _lora_specs(opts: argparse.Namespace) -> list:
    from ldm.lora import parse_lora_arg

    return [parse_lora_arg(text) for text in opts.lora]


def validate(opts: argparse.Namespace, prompts: list[str]) -> None:
    """Checks that need no model (files exist, flags agree, every prompt tag finds its file); CLIError."""
    from ldm import lora

    if opts.clip_skip < 1:
        raise CLIError(f"--clip_skip must be at least 1 (A1111's numbering; got {opts.clip_skip})")
    for spec in _lora_specs(opts):
        if not os.path.isfile(spec.path):
            raise CLIError(f"LoRA not found: {spec.path}")
    for path in opts.embedding:
        if not os.path.isfile(path):
            raise CLIError(f"embedding not found: {path}")
        if os.path.splitext(path)[1].lower() not in EMBEDDING_EXTENSIONS:
            raise CLIError(f"--embedding {path}: an embedding is a .pt, .bin or .safetensors file")
    if opts.lora_dir is not None:
        if opts.prompt_syntax != "a1111":
            raise CLIError("--lora_dir is for <lora:NAME> prompt tags, which need --prompt_syntax a1111")
        if not os.path.isdir(opts.lora_dir):
            raise CLIError(f"--lora_dir {opts.lora_dir} is not a directory")
    try:
        for prompt in dict.fromkeys(prompts):
            lora.for_prompt(prompt, opts.prompt_syntax, (), opts.lora_dir)
    except LoraError as e:
        raise CLIError(str(e)) from None


def prepare(opts: argparse.Namespace, model, prompts: list[str]):
    """The run's ldm.prompts.TextOptions (None: the original's encoding), after reading every LoRA and embedding
    file against the loaded model; CLIError for a file that does not fit it."""
    from ldm import lora, pipeline

    if not hasattr(model, "cond_stage_model"):  # SDXL (ldm/models/sgm.py): A1111's rules are for SD 1.x / 2.x
        used = [flag for flag, on in (("--lora", opts.lora), ("--embedding", opts.embedding),
                                      ("--prompt_syntax a1111", opts.prompt_syntax != "plain"),
                                      ("--clip_skip", opts.clip_skip != 1)) if on]
        if used:
            raise CLIError(f"{used[0]} applies to SD 1.x / 2.x models (A1111's rules), not to {opts.config}")
        return None
    encoder = model.cond_stage_model
    if opts.clip_skip > 1:
        if encoder.convention == "open_clip":
            warnings.warn("--clip_skip is ignored for SD 2 (OpenCLIP text encoder), as A1111 ignores it", stacklevel=2)
            opts.clip_skip = 1
        elif opts.clip_skip > len(encoder.transformer.text_model.encoder.layers):
            raise CLIError(f"--clip_skip {opts.clip_skip} exceeds the text encoder's "
                           f"{len(encoder.transformer.text_model.encoder.layers)} layers")
    try:
        text = pipeline.text_options(model, opts.prompt_syntax, opts.clip_skip, opts.embedding)
        specs = _lora_specs(opts)
        for prompt in dict.fromkeys(prompts):
            specs += lora.for_prompt(prompt, opts.prompt_syntax, (), opts.lora_dir)
        for spec in specs:
            lora.load_plan(model, spec.path)
    except (LoraError, EmbeddingError) as e:
        raise CLIError(str(e)) from None
    return text


def clean(name: str) -> str:
    return name.replace(":", "").replace(",", "")  # as A1111 writes names into its hash lists


def batch_fields(opts: argparse.Namespace, model, text, chunk: list[str]) -> dict[str, str]:
    """`Lora hashes` and `TI hashes` of the batch whose prompts are `chunk` (A1111's infotext)."""
    from ldm import lora, prompts

    fields = {}
    specs = lora.for_prompt(chunk[0], opts.prompt_syntax, _lora_specs(opts), opts.lora_dir)
    if specs:
        hashes = {clean(spec.label): lora.load_plan(model, spec.path).file.shorthash for spec in specs}
        fields["Lora hashes"] = ", ".join(f"{name}: {value}" for name, value in hashes.items())
    if text is not None and text.embeddings:
        encoder = model.cond_stage_model
        used = prompts.used_embeddings(encoder, chunk, text)
        used += prompts.used_embeddings(encoder, [opts.negative_prompt], text, strip_tags=False)
        if used:
            fields["TI hashes"] = ", ".join(f"{clean(e.name)}: {e.shorthash}" for e in used)
    return fields
