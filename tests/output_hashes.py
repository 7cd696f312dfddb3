"""Hashes of txt2img / img2img outputs on the tiny models, for showing that a refactor changes no pixel.

Not a test (pytest collects test_*.py only): run it before and after a change and compare the JSON.

    python tests/output_hashes.py OUT.json [--quick] [--arrays OUT.npz]

Every sampler of the registry with each of its schedules, on tiny-v1 / tiny-v2 / tiny-v2-v, through the command
line in-process (txt2img with two batches, img2img at strength 0.6), then the sha256 of every sample's pixels.
Pixels only: the PNG text holds the version and file hashes, which are not what a refactor must keep.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import make_tiny_checkpoint, tiny_config_path  # noqa: E402

from ldm import cli  # noqa: E402
from ldm.samplers import SAMPLERS  # noqa: E402


def pixels(folder: Path) -> list[np.ndarray]:
    out = []
    for path in sorted((folder / "samples").iterdir()):
        with Image.open(path) as image:
            out.append(np.asarray(image.convert("RGB")))
    return out


def pixel_hashes(images: list[np.ndarray]) -> list[str]:
    return [hashlib.sha256(image.tobytes()).hexdigest()[:16] for image in images]


def main(argv: list[str]) -> None:
    out_json = Path(argv[0])
    quick = "--quick" in argv
    arrays_path = argv[argv.index("--arrays") + 1] if "--arrays" in argv else None
    torch.set_num_threads(1)
    results, arrays = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init = tmp / "init.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
        for name in ("tiny-v1", "tiny-v2", "tiny-v2-v"):
            config = str(tiny_config_path(name))
            ckpt = str(make_tiny_checkpoint(config, tmp / f"{name}.ckpt"))
            for sampler, spec in SAMPLERS.items():
                for schedule in spec.valid_schedules[:1] if quick else spec.valid_schedules:
                    common = ["--config", config, "--ckpt", ckpt, "--f", "2", "--n_samples", "2",
                              "--ddim_steps", "5", "--device", "cpu", "--seed", "3", "--skip_grid",
                              "--sampler", sampler, "--schedule", schedule, "--negative_prompt", "bad"]
                    if sampler == "ddim":
                        common += ["--ddim_eta", "0.5"]
                    key = f"{name}/{sampler}/{schedule}"
                    out = tmp / key.replace("/", "_")
                    cli.txt2img_main(common + ["--outdir", str(out / "t"), "--H", "16", "--W", "16",
                                               "--n_iter", "2", "--prompt", "a cat"])
                    cli.img2img_main(common + ["--outdir", str(out / "i"), "--init-img", str(init),
                                               "--strength", "0.6", "--prompt", "a dog"])
                    for mode, folder in (("txt2img", out / "t"), ("img2img", out / "i")):
                        images = pixels(folder)
                        results.setdefault(key, {})[mode] = pixel_hashes(images)
                        arrays[f"{key}/{mode}"] = np.stack(images)
    out_json.write_text(json.dumps(results, indent=1, sort_keys=True))
    if arrays_path:
        np.savez_compressed(arrays_path, **arrays)
    print(f"{len(results)} runs -> {out_json}")


if __name__ == "__main__":
    main(sys.argv[1:])
