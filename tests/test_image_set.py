"""Image sets with one generator per image (ldm/noise.py, ldm/image_set.py, scripts/sample_many.py).

On the tiny v1 model (16x16 images, 8x8 latents, 4 steps) on the CPU with one thread: per-row generators draw
as batches of one, image i is txt2img's `--seed S+i --n_samples 1` image, two torchrun processes (gloo) write
the files of one process byte for byte, a run killed mid-way (SIGKILL included) resumes to the same files,
and rerun.py regenerates a set's image.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import cli, image_set, png_info
from ldm.cli import rerun, sample_many
from ldm.noise import randn, randn_like
from ldm.samplers.noise import BrownianNoise
from tiny_models import make_tiny_checkpoint, tiny_config_path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square, top left", "a dog"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    config = tiny_config_path("tiny-v1")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return str(config), str(make_tiny_checkpoint(config, root / "tiny-v1.ckpt")), str(prompts)


def argv(tiny, outdir, *extra) -> list[str]:
    config, ckpt, prompts = tiny
    return ["--config", config, "--ckpt", ckpt, "--from-file", prompts, "--images_per_prompt", "2", "--seed", "7",
            "--n_samples", "2", "--H", "16", "--W", "16", "--f", "2", "--ddim_steps", "4", "--sampler", "euler_a",
            "--device", "cpu", "--outdir", str(outdir), *extra]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted one-process run: 3 prompts x 2 images in batches of 2."""
    out = tmp_path_factory.mktemp("reference") / "set"
    sample_many.main(argv(tiny, out))
    return out


def test_one_generator_per_row_draws_as_batches_of_one():
    seeds = [3, 11, 5]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = randn((3, 4, 5, 5), gens, dtype=torch.float64)
    for k, seed in enumerate(seeds):
        alone = torch.randn((1, 4, 5, 5), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noise[k:k + 1], alone.double())
    # the next draw continues every row's own stream
    follow = randn_like(noise.float(), gens)
    for k, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        torch.randn((1, 4, 5, 5), generator=g)
        assert torch.equal(follow[k:k + 1], torch.randn((1, 4, 5, 5), generator=g))
    with pytest.raises(ValueError, match="one per row"):
        randn((2, 4), gens)
    # the Brownian noise of the SDE samplers, queried as dpmpp_sde does (to the midpoint, then the full step)
    x = torch.zeros(2, 3)
    batch = BrownianNoise(x, [torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = [BrownianNoise(x[:1], torch.Generator().manual_seed(s)) for s in (1, 2)]
    for sigma, sigma_next in ((5.0, 3.0), (5.0, 2.0), (2.0, 1.0)):
        rows = batch(sigma, sigma_next)
        for k, one in enumerate(alone):
            assert torch.equal(rows[k:k + 1], one(sigma, sigma_next))


def test_plan_gives_image_i_the_seed_S_plus_i_and_batches_do_not_depend_on_the_world_size():
    rows = [image_set.Prompt("a"), image_set.Prompt("b", "neg b", seed=100), image_set.Prompt("c")]
    items = image_set.plan(rows, 2, 7, negative_prompt="neg")
    assert [(i.index, i.prompt, i.negative_prompt, i.seed) for i in items] == [
        (0, "a", "neg", 7), (1, "a", "neg", 8), (2, "b", "neg b", 100), (3, "b", "neg b", 101),
        (4, "c", "neg", 11), (5, "c", "neg", 12)]
    chunks = image_set.batches(items, 4)
    assert [[i.index for i in c] for c in chunks] == [[0, 1, 2, 3], [4, 5]]
    for world in (1, 2, 3):
        shards = [image_set.shard(len(chunks), r, world) for r in range(world)]
        assert sorted(j for s in shards for j in s) == [0, 1]  # every batch once, the same batches for any world


def test_image_i_is_txt2img_with_seed_S_plus_i(tiny, tmp_path):
    config, ckpt, prompts = tiny
    out = tmp_path / "set"
    sample_many.main(argv(tiny, out, "--n_samples", "1"))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["index"], r["prompt"], r["seed"], r["file"]) for r in manifest] == [
        (i, PROMPTS[i // 2], 7 + i, f"images/{i:06}.png") for i in range(6)]
    for i in (0, 3, 5):
        cli.txt2img_main(["--config", config, "--ckpt", ckpt, "--prompt", PROMPTS[i // 2], "--seed", str(7 + i),
                          "--n_samples", "1", "--n_iter", "1", "--H", "16", "--W", "16", "--f", "2",
                          "--ddim_steps", "4", "--sampler", "euler_a", "--device", "cpu", "--skip_grid",
                          "--outdir", str(tmp_path / f"t{i}")])
        # euler_a draws noise at every step: bit-identical only if every draw came from image i's own generator
        assert np.array_equal(pixels(out / manifest[i]["file"]), pixels(tmp_path / f"t{i}" / "samples" / "00000.png"))


def test_batch_size_changes_images_by_rounding_only(tiny, reference, tmp_path):
    out = tmp_path / "set"
    sample_many.main(argv(tiny, out, "--n_samples", "1"))
    for i in range(6):
        a, b = (pixels(d / "images" / f"{i:06}.png").astype(int) for d in (reference, out))
        # the same noise; kernels block (and so round) by batch size: measured at most 1 level on the tiny models
        assert np.abs(a - b).max() <= 1


def test_two_processes_write_the_files_of_one(tiny, reference, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "scripts" / "sample_many.py"), *argv(tiny, tmp_path / "set")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # images (PNG parameters included) and manifest: byte for byte; batches 0 and 2 on rank 0, batch 1 on rank 1
    assert files(tmp_path / "set") == files(reference)
    assert "images (2 processes)" in result.stderr


def test_resume_after_a_crash_while_writing(tiny, reference, tmp_path, monkeypatch):
    out = tmp_path / "set"
    real_save, saved = png_info.save_png, []

    def dies_on_the_fourth(image, path, parameters=None):
        if len(saved) == 3:  # as a SIGKILL between writing the temporary file and renaming it
            Path(path).with_name(f".{Path(path).name}.4242.tmp").write_bytes(b"\x89PNG partial")
            raise KeyboardInterrupt
        saved.append(path)
        real_save(image, path, parameters)

    monkeypatch.setattr(png_info, "save_png", dies_on_the_fourth)
    with pytest.raises(SystemExit) as stop:  # Ctrl-C: one line, exit 130 (ldm/cli/interrupt.py)
        sample_many.main(argv(tiny, out))
    assert stop.value.code == 130
    assert len(list((out / "images").glob("*.png"))) == 3 and not (out / "manifest.jsonl").exists()
    monkeypatch.setattr(png_info, "save_png", real_save)
    sample_many.main(argv(tiny, out))
    assert files(out) == files(reference)  # the partial file is gone; batch 1 was recomputed whole


def test_resume_after_sigkill(tiny, reference, tmp_path):
    out = tmp_path / "set"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # the real command, held for a minute after each image it writes, so that the kill lands mid-run
    slowed = ("import sys, time; from ldm import png_info; save = png_info.save_png; "
              "png_info.save_png = lambda *a: (save(*a), time.sleep(60)); "
              "from ldm.cli.sample_many import main; main(sys.argv[1:])")
    process = subprocess.Popen([sys.executable, "-c", slowed, *argv(tiny, out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def written() -> int:
        return len(list((out / "images").glob("*.png"))) if (out / "images").exists() else 0

    try:
        deadline = time.time() + 300
        while written() == 0:
            assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert written() == 1 and not (out / "manifest.jsonl").exists()
    sample_many.main(argv(tiny, out))
    assert files(out) == files(reference)


def test_an_image_of_other_settings_stops_the_run(tiny, reference, tmp_path, capsys):
    out = tmp_path / "set"
    (out / "images").mkdir(parents=True)
    for i in range(2):  # the first images of a run with another step count
        source = str(reference / "images" / f"{i:06}.png")
        png_info.save_png(pixels(source), str(out / "images" / f"{i:06}.png"),
                          png_info.read_parameters(source).replace("Steps: 4", "Steps: 5"))
    before = files(out)
    with pytest.raises(SystemExit) as exit_info:
        sample_many.main(argv(tiny, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1
    assert err[0].startswith("sample_many.py: error: 2 image(s) in") and "give another --outdir" in err[0]
    assert files(out) == before  # nothing written


def test_jsonl_prompts_with_negative_prompts_and_seeds(tiny, tmp_path):
    config, ckpt, _ = tiny
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": "a dog"}) + "\n\n"
                    + json.dumps({"prompt": "a cat", "negative_prompt": "blurry", "seed": 100}) + "\n")
    out = tmp_path / "set"
    sample_many.main(argv(tiny, out, "--from-file", str(rows)))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in manifest] == [("a dog", 7), ("a dog", 8), ("a cat", 100), ("a cat", 101)]
    assert set(manifest[0]) == {"index", "prompt", "seed", "file", "sha256"}
    params = png_info.parse_parameters(png_info.read_parameters(str(out / "images" / "000002.png")))
    assert params["Negative prompt"] == "blurry" and params["Seed"] == "100" and params["Image index"] == "2"
    assert "Negative prompt" not in png_info.parse_parameters(png_info.read_parameters(str(out / "images/000000.png")))


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "steps": 3}', "unknown keys ['steps']"),
    ('{"negative_prompt": "a"}', 'a row needs a "prompt" string'),
    ('{"prompt": "a", "seed": -1}', '"seed" must be a non-negative integer'),
    ("a dog", "not JSON"),
])
def test_bad_jsonl_rows_are_one_line_errors(tiny, tmp_path, capsys, line, message):
    rows = tmp_path / "p.jsonl"
    rows.write_text(line + "\n")
    with pytest.raises(SystemExit):
        sample_many.main(argv(tiny, tmp_path / "set", "--from-file", str(rows)))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sample_many.py: error: {rows}:1: ") and message in err[0], err
    assert not (tmp_path / "set").exists()


def test_rerun_regenerates_an_image_of_a_set(tiny, reference, tmp_path, capsys):
    config, ckpt, _ = tiny
    source = reference / "images" / "000005.png"  # batch 2, row 1
    rerun.main([str(source), "--config", config, "--ckpt", ckpt, "--outdir", str(tmp_path / "re"), "--device", "cpu"])
    again = tmp_path / "re" / "00000.png"
    assert "identical to" in capsys.readouterr().out
    assert np.array_equal(pixels(again), pixels(source))
    assert png_info.read_parameters(str(again)) == png_info.read_parameters(str(source))
