"""Generation parameters in PNG files, and numbered, atomic PNG writing.

Each PNG we write carries one tEXt chunk named `parameters` in the layout AUTOMATIC1111's web UI writes
and reads (modules/infotext_utils.py, "infotext"), so existing tools can show and parse it:

    <prompt>
    Negative prompt: <negative prompt>          (line left out when the negative prompt is empty)
    Steps: 50, Sampler: ddim, Schedule type: uniform, CFG scale: 7.5, Seed: 42, Size: 512x512, ...

The last line is `Key: value` pairs separated by ", "; a value holding ",", ":" or a newline is written
as a JSON string (A1111's `quote`). `format_parameters` and `parse_parameters` are inverse functions on
the dict `{"Prompt": ..., "Negative prompt": ..., <key>: <value>, ...}` (all values are strings). Unlike
A1111 we do not strip the prompt, so leading and trailing whitespace survive the round trip.

Which options become which fields is the command line's business (ldm/cli/record.py); this module knows only
the text format, the PNG chunk, file hashes and numbered writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt: "

# One `Key: value` pair of the last line; as A1111's re_param (keys start with a word character and may
# hold spaces, "-" and "/"; a value is a JSON string or runs to the next comma).
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def quote(value: str) -> str:
    """A1111's quoting: JSON-encode values that the `, `-separated line could not hold verbatim."""
    if any(c in value for c in ",:\n") or value.startswith('"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def format_parameters(fields: dict[str, str]) -> str:
    """The infotext for `fields` ({"Prompt", "Negative prompt" (optional), then ordered key/values})."""
    prompt = fields.get("Prompt", "")
    negative = fields.get("Negative prompt", "")
    pairs = []
    for key, value in fields.items():
        if key in ("Prompt", "Negative prompt"):
            continue
        if not re.fullmatch(r"\w[\w \-/]*", key) or key != key.strip():
            raise ValueError(f"parameter name {key!r} cannot be written in the infotext line")
        pairs.append(f"{key}: {quote(str(value))}")
    if not pairs:
        raise ValueError("the infotext needs at least one `Key: value` parameter")
    lines = [prompt]
    if negative:
        lines.append(NEGATIVE_PREFIX + negative)
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """Inverse of `format_parameters`; also reads A1111's own infotexts (values stay strings)."""
    head, _, last = text.rpartition("\n")
    pairs, pos = [], 0
    while pos < len(last):
        match = _PAIR.match(last, pos)
        if match is None or match.end() == pos:
            raise ValueError("no `Key: value, ...` parameter line at the end of the infotext")
        pairs.append(match.groups())
        pos = match.end()
    if not pairs:
        raise ValueError("no `Key: value, ...` parameter line at the end of the infotext")
    # The negative prompt starts at the first line that carries the prefix (A1111 reads it the same way).
    lines = head.split("\n")
    prompt_lines, negative_lines = lines, []
    for i, line in enumerate(lines):
        if line.startswith(NEGATIVE_PREFIX):
            prompt_lines = lines[:i]
            negative_lines = [line[len(NEGATIVE_PREFIX):]] + lines[i + 1:]
            break
    fields = {"Prompt": "\n".join(prompt_lines)}
    if negative_lines:
        fields["Negative prompt"] = "\n".join(negative_lines)
    for key, value in pairs:
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return fields


def read_parameters(path: str) -> str:
    """The `parameters` text chunk of a PNG file (ValueError when it has none)."""
    with Image.open(path) as image:
        image.load()
        text = image.info.get(PARAMETERS_KEY)
    if text is None:
        raise ValueError(f"{path} has no '{PARAMETERS_KEY}' text chunk")
    return text


def file_hash(path: str, length: int = 10) -> str:
    """First `length` hex digits of the file's sha256 (A1111's "Model hash" since 2023)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def next_index(directory: str, pattern: str) -> int:
    """One past the largest number among the files named `pattern` (a regex with one group), else 0.

    The originals count the directory entries (`len(os.listdir(...))`), which gives the same number
    when the directory holds only their own files; taking the largest index never overwrites a file
    when others are present or some were deleted.
    """
    if not os.path.isdir(directory):
        return 0
    numbers = [int(m.group(1)) for name in os.listdir(directory) if (m := re.fullmatch(pattern, name))]
    return max(numbers, default=-1) + 1


def _write_png(image: np.ndarray, path: str, parameters: str | None) -> None:
    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)
    Image.fromarray(image).save(path, format="PNG", pnginfo=info)


def _temporary_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}.tmp")


def save_png(image: np.ndarray, path: str, parameters: str | None = None) -> None:
    """Write a uint8 (H, W, 3) array as PNG: to a temporary name first, then os.replace.

    So an interrupted run never leaves a truncated PNG under a final name.
    """
    tmp = _temporary_name(path)
    try:
        _write_png(image, tmp, parameters)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _claim(tmp: str, path: str) -> bool:
    """Give the complete file `tmp` the name `path` unless that name exists, atomically: a hard link fails
    when the name is taken, where os.replace would overwrite it. Where hard links are not supported, the
    name is claimed with O_CREAT | O_EXCL (empty until the replace that follows)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system (FAT, some network shares)
        pass
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    os.replace(tmp, path)
    return True


def save_numbered(image: np.ndarray, directory: str, pattern: str, template: str,
                  parameters: str | None = None) -> str:
    """Save under the next free number in `directory` (e.g. template "{:05}.png"); returns the path.

    The number is claimed atomically (`_claim`), so runs writing into one folder at once never overwrite
    each other's files: a number taken in the meantime is skipped. The PNG is complete before it gets its name."""
    index = next_index(directory, pattern)
    tmp = _temporary_name(os.path.join(directory, template.format(index)))
    try:
        _write_png(image, tmp, parameters)
        while not _claim(tmp, path := os.path.join(directory, template.format(index))):
            index += 1  # taken since we looked (another process writing to the same folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
