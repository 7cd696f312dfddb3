"""The command line's default fast path (`--fast auto`, ldm.fast.default_options) against the plain path.

Issue 22's rule: the CLI may run a fast path by default only if its images stay within one uint8 level of the
plain path's on every sampler, and the PNG records it. Reference: the same command with `--fast none`.
The bound is one level: the fast kernels sum in another order (float32 last bits, ~1e-6 relative per layer,
tests/test_fast_paths.py), which moves a value across a rounding boundary now and then but never by more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import cli, fast, png_info
from ldm.cli import rerun
from ldm.samplers import SAMPLERS
from tiny_models import make_tiny_checkpoint, tiny_config_path

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not fast.prepack_supported(), reason="torch built without oneDNN")]


def test_default_options_are_the_measured_choice():
    assert fast.default_options("cpu", torch.float32) == {"prepack_weights": True}
    for device, dtype in (("cpu", torch.bfloat16), ("cpu", torch.float16), ("meta", torch.float32)):
        assert fast.default_options(device, dtype) == {}  # the plain path where nothing was measured better


def images(folder) -> list[np.ndarray]:
    out = []
    for path in sorted((folder / "samples").iterdir()):
        with Image.open(path) as image:
            out.append(np.asarray(image.convert("RGB")).astype(int))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: (str(tiny_config_path(name)), str(make_tiny_checkpoint(tiny_config_path(name),
                                                                        root / f"{name}.safetensors")))
            for name in ("tiny-v1", "tiny-v2-v", "tiny-sdxl-base")}


def run(checkpoints, name, sampler, out, *extra):
    config, ckpt = checkpoints[name]
    size = "32" if name == "tiny-sdxl-base" else "16"
    spec = SAMPLERS[sampler]
    cli.txt2img_main(["--config", config, "--ckpt", ckpt, "--f", "2", "--H", size, "--W", size,
                      "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "5", "--device", "cpu", "--seed", "3",
                      "--skip_grid", "--sampler", sampler, "--schedule", spec.valid_schedules[0],
                      "--prompt", "a cat", "--outdir", str(out), *extra])
    return images(out)


@pytest.mark.parametrize("name", ["tiny-v1", "tiny-v2-v"])
def test_every_sampler_within_one_level_of_the_plain_path(checkpoints, name, tmp_path, capsys):
    worst = {}
    for sampler in SAMPLERS:
        plain = run(checkpoints, name, sampler, tmp_path / sampler / "plain", "--fast", "none")
        default = run(checkpoints, name, sampler, tmp_path / sampler / "auto")
        worst[sampler] = max(int(np.abs(a - b).max()) for a, b in zip(plain, default))
    assert max(worst.values()) <= 1, worst
    capsys.readouterr()


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_a"])
def test_sdxl_within_one_level_of_the_plain_path(checkpoints, sampler, tmp_path, capsys):
    plain = run(checkpoints, "tiny-sdxl-base", sampler, tmp_path / "plain", "--fast", "none")
    default = run(checkpoints, "tiny-sdxl-base", sampler, tmp_path / "auto")
    assert max(int(np.abs(a - b).max()) for a, b in zip(plain, default)) <= 1
    capsys.readouterr()


def test_the_png_records_the_default_and_rerun_replays_it(checkpoints, tmp_path, capsys):
    default = tmp_path / "auto"
    run(checkpoints, "tiny-v1", "euler", default)
    run(checkpoints, "tiny-v1", "euler", tmp_path / "plain", "--fast", "none")
    made = sorted((default / "samples").iterdir())
    fields = png_info.parse_parameters(png_info.read_parameters(str(made[1])))
    assert fields["Prepack"] == "True"
    plain_fields = png_info.parse_parameters(png_info.read_parameters(str(sorted((tmp_path / "plain" / "samples")
                                                                                   .iterdir())[0])))
    assert "Prepack" not in plain_fields
    config, ckpt = checkpoints["tiny-v1"]
    # rerun replays what the PNG records, bit-exact, whatever today's default is
    for image, out in ((made[1], tmp_path / "re"), (sorted((tmp_path / "plain" / "samples").iterdir())[1],
                                                     tmp_path / "re-plain")):
        rerun.main([str(image), "--config", config, "--ckpt", ckpt, "--outdir", str(out), "--device", "cpu"])
        with Image.open(out / "00000.png") as a, Image.open(image) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert png_info.read_parameters(str(out / "00000.png")) == png_info.read_parameters(str(image))
    capsys.readouterr()


def test_fast_none_and_compile_keep_the_plain_layers(checkpoints, tmp_path):
    from ldm.cli import build_parser, inputs

    config, ckpt = checkpoints["tiny-v1"]
    base = ["--config", config, "--ckpt", ckpt, "--device", "cpu", "--outdir", str(tmp_path), "--prompt", "x"]
    for extra, expected in (([], True), (["--fast", "none"], False), (["--compile"], False),
                            (["--precision", "bf16"], False), (["--fast", "none", "--prepack"], True)):
        opts = build_parser("txt2img").parse_args(base + extra)
        inputs.validate(opts, "txt2img")
        assert opts.prepack is expected, extra
