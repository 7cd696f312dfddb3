"""The command line's options <-> the `parameters` text of its PNGs (A1111 infotext, ldm/png_info.py).

An image is identified by the run's `Seed` (the same for every image of a run), its `Batch number` (0-based,
counting n_iter x prompt batches) and `Batch pos` (index in the batch), since all batches of a run draw from one
generator in turn; scripts/rerun.py replays the run up to that batch from these fields.
"""

from __future__ import annotations

import json

from ldm import __version__, png_info

# (infotext key, option name, type): the parameters a PNG records and rerun reads back (keys as A1111 where
# it has them)
FIELDS = (
    ("Steps", "ddim_steps", int), ("Sampler", "sampler", str), ("Schedule type", "schedule", str),
    ("CFG scale", "scale", float), ("Eta", "ddim_eta", float), ("Seed", "seed", int),
    ("Latent channels", "C", int), ("Downsampling factor", "f", int),
    ("Denoising strength", "strength", float), ("Batch size", "n_samples", int),
    ("Fixed code", "fixed_code", bool), ("EMA", "no_ema", bool), ("Precision", "precision", str),
)

# (infotext key, option name, type) of the opt-in paths that can change pixels: tiling changes the decode, the
# others the summation order (last-bit rounding, which can flip a uint8 value). Written only when used, so a
# PNG made on the plain path carries none; rerun leaves an absent one at its default (off).
FAST_FIELDS = (
    ("Attention", "attention", str), ("Attention slice", "attention_slice", int), ("Prepack", "prepack", bool),
    ("Channels last", "channels_last", bool), ("Compile", "compile", bool), ("VAE tile", "vae_tile", int),
    ("VAE tile overlap", "vae_tile_overlap", int), ("VAE slice", "vae_slice", int),
)


# (infotext key, option name, type) of the prompt syntax, clip skip, LoRA and embedding flags (ldm/cli/extras.py),
# written only when not at their defaults. `Clip skip` is A1111's key; lists are JSON (paths may hold ", ").
# A1111's own `Lora hashes` / `TI hashes` come with the file hashes (extras.batch_fields).
TEXT_FIELDS = (
    ("Prompt syntax", "prompt_syntax", str), ("Clip skip", "clip_skip", int), ("Lora", "lora", list),
    ("Lora dir", "lora_dir", str), ("Embeddings", "embedding", list),
)
TEXT_DEFAULTS = {"prompt_syntax": "plain", "clip_skip": 1, "lora": [], "lora_dir": None, "embedding": []}
# (infotext key, option name, type) of an SDXL run's conditioning and refiner (ldm/cli/sdxl.py): written when the
# option has a value (SDXL configs resolve them; other configs leave them None), read back when present.
SGM_FIELDS = (
    ("Original height", "orig_height", int), ("Original width", "orig_width", int), ("Crop top", "crop_top", int),
    ("Crop left", "crop_left", int), ("Target height", "target_height", int), ("Target width", "target_width", int),
    ("Aesthetic score", "aesthetic_score", float), ("Negative aesthetic score", "negative_aesthetic_score", float),
    ("Refiner strength", "refiner_strength", float), ("Refiner steps", "refiner_steps", int),
)


def infotext(options: dict, prompt: str, batch: int, pos: int, hashes: dict[str, str]) -> str:
    """The `parameters` text of one image made with the command-line `options` (a dict of option values):
    the prompt, the FIELDS, `hashes` (Model hash, ...), its batch number and position, and the version."""
    fields = {"Prompt": prompt, "Negative prompt": options["negative_prompt"]}
    for key, name, kind in FIELDS:
        if name not in options:
            continue  # txt2img has no strength
        value = options[name]
        if name == "no_ema":
            value = not value
        fields[key] = repr(float(value)) if kind is float else str(value)
        if key == "Seed":
            fields["Size"] = f"{options['W']}x{options['H']}"
    for key, name, kind in FAST_FIELDS:
        value = options.get(name)
        if not (value is None or value is False or value == "sdpa"):  # `is`: an overlap of 0 is recorded
            fields[key] = str(value)
    for key, name, kind in TEXT_FIELDS:
        value = options.get(name, TEXT_DEFAULTS[name])
        if value != TEXT_DEFAULTS[name]:
            fields[key] = json.dumps(value, ensure_ascii=False) if kind is list else str(value)
    for key, name, kind in SGM_FIELDS:
        if options.get(name) is not None:
            fields[key] = repr(float(options[name])) if kind is float else str(options[name])
    fields.update(hashes)
    fields.update({"Batch number": str(batch), "Batch pos": str(pos), "Version": f"ldm {__version__}"})
    return png_info.format_parameters(fields)


def _read(kind: type, text: str):
    if kind is list:
        value = json.loads(text)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"not a list of paths: {text!r}")
        return value
    if kind is bool and text not in ("True", "False"):
        raise ValueError(f"{text[:20]!r} is not True or False")
    return text == "True" if kind is bool else kind(text)


def options_from_infotext(fields: dict[str, str], names) -> tuple[dict, int, int]:
    """The option values recorded in parsed infotext `fields` (inverse of `infotext`) for the option `names`
    the mode has; returns (options, batch number, batch pos). ValueError when a field is missing or unreadable."""
    options, key = {}, "Prompt"  # key: the field being read, named when it is unreadable
    try:
        options["prompt"] = fields["Prompt"]
        options["negative_prompt"] = fields.get("Negative prompt", "")
        for key, name, kind in FIELDS:
            if name not in names:
                continue
            # "EMA: True/False" is recorded for the option --no-ema
            options[name] = not _read(bool, fields[key]) if name == "no_ema" else _read(kind, fields[key])
        for key, name, kind in FAST_FIELDS + TEXT_FIELDS + SGM_FIELDS:
            if key in fields:
                options[name] = _read(kind, fields[key])
        key = "Size"
        width, height = fields["Size"].split("x")  # WIDTHxHEIGHT, digits only
        if not (width.isdigit() and height.isdigit()):
            raise ValueError(f"{fields['Size'][:40]!r} is not WIDTHxHEIGHT")
        options["W"], options["H"] = int(width), int(height)
        key = "Batch number"
        batch = int(fields[key])
        key = "Batch pos"
        pos = int(fields[key])
    except KeyError as e:
        raise ValueError(f"the parameters lack {e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"unreadable parameter {key!r}: {str(e)[:100]}") from None
    return options, batch, pos
