"""Cross-attention maps of txt2img images (DAAM): one overlay per prompt word, and the per-token maps.

    python scripts/attention_maps.py --config configs/demo/shapes-v1.yaml \
        --ckpt checkpoints/demo/shapes-v1.safetensors --H 64 --W 64 --f 4 --n_samples 1 --n_iter 1 --scale 3 \
        --prompt "a red circle on a blue background, top left"

Takes every flag of scripts/txt2img.py (same defaults, same images, bit for bit: recording reads the attention
layers' inputs and never changes their computation; ldm/attention_maps.py), plus --attn_layers and
--attn_steps. For each image OUTDIR/samples/NNNNN.png (with its parameters, as txt2img) it writes the folder
OUTDIR/samples/NNNNN/ holding

    maps.safetensors   "maps": (tokens, H, W) float32, the DAAM map of each prompt token (start, end and
                       padding tokens left out); metadata: "tokens" (JSON list of the BPE pieces, "</w>" ending
                       a word), "positions" (their context positions), "words", "prompt", "layers", "steps"
    KK-WORD.png        the image with the map of word KK (its pieces' maps averaged, as DAAM merges them),
                       scaled to [0, 1], as a heat overlay; punctuation gets a map but no overlay
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def words(pieces: list[str]) -> list[tuple[str, list[int]]]:
    """(word, indices of its pieces) for BPE pieces, merging pieces until one ends the word ("</w>")."""
    out, current = [], []
    for i, piece in enumerate(pieces):
        current.append(i)
        if piece.endswith("</w>") or i == len(pieces) - 1:
            out.append(("".join(pieces[j] for j in current).removesuffix("</w>"), current))
            current = []
    return out


def heat(values):
    """[0, 1] values (H, W) -> (H, W, 3) uint8 colours of a blue-cyan-yellow-red ramp (matplotlib's "jet")."""
    import numpy as np

    v = np.clip(values, 0, 1)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (255 * np.concatenate([r, g, b], axis=-1)).astype(np.uint8)


def overlay(image, word_map):
    """Half image, half heat map of `word_map` scaled to [0, 1] (negative bicubic undershoot clipped)."""
    import numpy as np

    m = np.clip(word_map, 0, None)
    m = m / m.max() if m.max() > 0 else m
    return (0.5 * image.astype(np.float64) + 0.5 * heat(m)).astype(np.uint8)


def parse_steps(text: str | None):
    """'a-b' (inclusive), 'a,b,c' or None (every step) -> a step filter of ldm.hooks."""
    if text is None:
        return None
    if "-" in text:
        low, high = text.split("-", 1)
        return range(int(low), int(high) + 1)
    return {int(v) for v in text.split(",")}


def write_maps(folder: Path, image, maps, pieces, positions, prompt, layers, steps_text) -> None:
    from safetensors.torch import save_file

    from ldm import png_info

    folder.mkdir(parents=True, exist_ok=False)
    metadata = {"tokens": json.dumps(pieces), "positions": json.dumps(positions), "prompt": prompt,
                "words": json.dumps(words(pieces)), "layers": json.dumps(layers), "steps": steps_text or "all"}
    save_file({"maps": maps.contiguous()}, str(folder / "maps.safetensors"), metadata=metadata)
    for k, (word, indices) in enumerate(words(pieces)):
        if not re.search(r"\w", word):
            continue
        name = re.sub(r"[^\w]+", "_", word)[:40]
        png_info.save_png(overlay(image, maps[indices].mean(0).numpy()), str(folder / f"{k:02d}-{name}.png"))


def prompt_length(model, prompt: str) -> int:
    """How many BPE ids of the prompt the text encoder reads (those before its first end-of-text)."""
    from ldm.models.tokenizer import EOT

    ids = model.cond_stage_model.tokenize([prompt]).ids[0]
    return int((ids == EOT).nonzero()[0]) - 1


def run(opts) -> None:
    import torch

    from ldm import pipeline, png_info
    from ldm.attention_maps import AttentionRecorder, cross_attention_layers
    from ldm.cli import record
    from ldm.cli import run as cli_run
    from ldm.cli.flags import CLIError
    from ldm.models.tokenizer import pieces

    steps_filter = parse_steps(opts.attn_steps)
    model, prompts, _ = cli_run.prepare(opts, "txt2img")
    every = cross_attention_layers(model)
    layers = every if not opts.attn_layers else [
        name for name in every if any(name == p or name.startswith(p + ".") for p in opts.attn_layers.split(","))]
    if not layers:
        raise CLIError(f"--attn_layers {opts.attn_layers} selects no cross-attention layer; "
                       f"they are: {', '.join(every)}")
    lengths = {prompt: prompt_length(model, prompt) for prompt in prompts}
    if max(lengths.values()) == 0:
        raise CLIError("the prompts have no tokens to map")
    positions = list(range(1, max(lengths.values()) + 1))  # the BPE ids after start-of-text
    hashes = cli_run.file_hashes(opts, "txt2img")
    sample_dir = os.path.join(opts.outdir, "samples")
    recorder = AttentionRecorder(model, layers=layers, steps=steps_filter, tokens=positions,
                                 size=(opts.H, opts.W), cfg=opts.scale != 1.0)
    with recorder:
        for batch, chunk, latents in cli_run.generate(opts, model, prompts):
            maps = recorder.maps()[:len(chunk)]
            recorder.reset()
            images = pipeline.to_uint8(cli_run.decode(opts, model, latents))
            for pos, (prompt, image, image_maps) in enumerate(zip(chunk, images, maps)):
                ids = model.cond_stage_model.tokenize([prompt]).ids[0]
                own = positions[:lengths[prompt]]
                info = record.infotext(vars(opts), prompt, batch, pos, hashes)
                os.makedirs(sample_dir, exist_ok=True)
                path = Path(png_info.save_numbered(image, sample_dir, cli_run.SAMPLE_NAME, cli_run.SAMPLE_TEMPLATE,
                                                   info))
                write_maps(path.with_suffix(""), image, image_maps[:len(own)].to(torch.float32),
                           pieces([int(ids[p]) for p in own]), own, prompt, layers, opts.attn_steps)
                print(f"{path}: maps of {len(own)} tokens in {path.with_suffix('')}/")


def main(argv=None) -> None:
    from ldm.cli.flags import build_parser
    from ldm.cli.run import errors_as_one_line

    p = build_parser("txt2img")
    p.prog = "attention_maps.py"
    p.set_defaults(outdir="outputs/attention-maps")
    g = p.add_argument_group("attention maps")
    g.add_argument("--attn_layers", default=None,
                   help="comma list of attn2 layers or blocks holding them, by original name (e.g. "
                        "output_blocks,middle_block.1); default: every cross-attention layer")
    g.add_argument("--attn_steps", default=None,
                   help="steps to record (UNet evaluations of each batch's run, which is the sampler step for "
                        "one-evaluation samplers): a-b (inclusive) or a,b,c; default all")
    opts = p.parse_args(argv)
    errors_as_one_line("attention_maps.py", run, opts)


if __name__ == "__main__":
    main()
