"""SDXL sampling and the txt2img / img2img command line against generative-models' own demo.

Fixture: tests/make_fixtures_sdxl.py ran the ORIGINAL demo (scripts/demo/sampling.py run_txt2img, run_img2img,
apply_refiner with streamlit_helpers' samplers, discretizations and guidance) on the tiny SDXL base and refiner
and stored its latents and images for every case of CASES, with the command line each stands for. Here our CLI
runs those command lines on the same tiny checkpoints and must write the same images within one uint8 level
(float32 rounding of other op orders in CLIP's attention and the UNet, ~1e-6 relative, can land 255 * x on the
other side of an integer), and the library (ldm.pipeline.generate, as the CLI calls it) must give the same
latents within 2e-5 relative (5e-6 measured: the latents reach |x| ~ 100 after the start x_T * sqrt(1 + 14.6^2)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import ldm
from ldm import cli, pipeline, png_info
from ldm.cli import rerun
from ldm.refiner import refine
from make_fixtures_sdxl import CASES, CKPT_SEED, CONFIGS, INIT_IMAGE, N_SAMPLES, SEED, state_digest
from tiny_models import make_tiny_checkpoint, tiny_config_path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sdxl_pipeline.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture():
    with safe_open(str(FIXTURE), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, fixture):
    root = tmp_path_factory.mktemp("sdxl")
    out = {}
    for name, config in CONFIGS.items():
        path = make_tiny_checkpoint(tiny_config_path(config), root / f"{config}.safetensors", seed=CKPT_SEED)
        from safetensors.torch import load_file

        assert state_digest(load_file(str(path))) == fixture[1][f"checkpoint_digest.{name}"], \
            "tests/tiny_models.py now makes other weights: rerun tests/make_fixtures_sdxl.py"
        out[name] = (str(tiny_config_path(config)), str(path))
    return out


def case_argv(fixture, checkpoints, case: str, outdir: Path) -> tuple[str, list[str]]:
    mode, model, argv = json.loads(fixture[1][f"argv.{case}"])
    if "--init-img" in argv:  # recorded relative to the repository root
        i = argv.index("--init-img") + 1
        argv[i] = str(ROOT / argv[i])
    argv += ["--config", checkpoints[model][0], "--ckpt", checkpoints[model][1], "--outdir", str(outdir)]
    if "--refiner_strength" in argv:
        argv += ["--refiner_config", checkpoints["refiner"][0], "--refiner_ckpt", checkpoints["refiner"][1]]
    return mode, argv


def read_samples(outdir: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((outdir / "samples").glob("*.png"))])


def run_cli(mode: str, argv: list[str]) -> None:
    (cli.txt2img_main if mode == "txt2img" else cli.img2img_main)(argv)


def test_cli_matches_the_demo(fixture, checkpoints, tmp_path, capsys):
    worst = {}
    for case in CASES:
        mode, argv = case_argv(fixture, checkpoints, case, tmp_path / case)
        run_cli(mode, argv)
        got, expected = read_samples(tmp_path / case), fixture[0][f"{case}.images"].numpy()
        assert got.shape == expected.shape, case
        worst[case] = int(np.abs(got.astype(np.int16) - expected.astype(np.int16)).max())
    capsys.readouterr()
    print(f"max uint8 difference per case {worst}")
    assert max(worst.values()) <= 1, worst


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: ldm.load_model(*paths) for name, paths in checkpoints.items()}


def relative_error(got, expected):
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("case", ["euler", "euler_a_n_iter2", "size_crop", "negative", "karras"])
def test_library_latents_match_the_demo(fixture, models, case):
    """pipeline.generate as the CLI calls it: the demo's latents (before the VAE), tightly."""
    from make_fixtures_sdxl import cli_args, flag

    _, model, argv = cli_args(case)
    values = pipeline.size_values(32, 32)
    for name, key in (("--orig_height", "orig_height"), ("--orig_width", "orig_width"),
                      ("--crop_top", "crop_coords_top"), ("--crop_left", "crop_coords_left")):
        if name in argv:
            values[key] = int(flag(argv, name))
    batches = pipeline.generate(models[model], [flag(argv, "--prompt")] * N_SAMPLES, n_samples=N_SAMPLES,
                                latent_shape=(4, 16, 16), seed=SEED, n_iter=int(flag(argv, "--n_iter")),
                                progress=False, sampler=flag(argv, "--sampler"), steps=int(flag(argv, "--ddim_steps")),
                                schedule=flag(argv, "--schedule"), negative_prompt=flag(argv, "--negative_prompt", ""),
                                value_dict=values)
    latents = torch.cat([latents for _, _, latents in batches])
    assert relative_error(latents, fixture[0][f"{case}.latents"]) < 2e-5


def test_handoff_latents_match_the_demo(fixture, models):
    """txt2img of the base stopped by Txt2NoisyDiscretizationWrapper, the refiner finishing without noise."""
    for case in ("handoff_euler", "handoff_euler_a"):
        from make_fixtures_sdxl import cli_args, flag

        _, _, argv = cli_args(case)
        steps, strength = int(flag(argv, "--ddim_steps")), float(flag(argv, "--refiner_strength"))
        refiner_steps = int(flag(argv, "--refiner_steps", steps))
        generator = torch.Generator().manual_seed(SEED)
        prompts = [flag(argv, "--prompt")] * N_SAMPLES
        base = pipeline.sample(models["base"], prompts, sampler=flag(argv, "--sampler"), steps=steps,
                               shape=(N_SAMPLES, 4, 16, 16), generator=generator, handoff=strength,
                               value_dict=pipeline.size_values(32, 32), disable=True)
        latents = refine(models["refiner"], base, prompts, generator, strength=strength, steps=refiner_steps,
                         sampler=flag(argv, "--sampler"))
        assert relative_error(latents, fixture[0][f"{case}.latents"]) < 2e-5, case
        images = pipeline.txt2img(models["base"], prompts, sampler=flag(argv, "--sampler"), steps=steps, H=32, W=32,
                                  f=2, seed=SEED, refiner=models["refiner"], refiner_strength=strength,
                                  refiner_steps=refiner_steps, disable=True)
        expected = fixture[0][f"{case}.images"].numpy()
        assert np.abs(pipeline.to_uint8(images).astype(np.int16) - expected.astype(np.int16)).max() <= 1


def test_png_records_the_sdxl_conditioning_and_rerun_replays_it(checkpoints, fixture, tmp_path, capsys):
    mode, argv = case_argv(fixture, checkpoints, "handoff_euler_a", tmp_path / "run")
    argv += ["--orig_height", "40", "--crop_left", "8", "--aesthetic_score", "7.5"]
    run_cli(mode, argv)
    first = sorted((tmp_path / "run" / "samples").glob("*.png"))[1]
    fields = png_info.parse_parameters(png_info.read_parameters(str(first)))
    assert (fields["Original height"], fields["Original width"], fields["Crop top"], fields["Crop left"]) == \
        ("40", "32", "0", "8")
    assert (fields["Target height"], fields["Aesthetic score"], fields["Negative aesthetic score"]) == \
        ("32", "7.5", "2.5")
    assert (fields["Refiner strength"], fields["Refiner steps"], fields["Sampler"]) == ("0.4", "4", "sgm_euler_a")
    assert fields["Refiner hash"] == png_info.file_hash(checkpoints["refiner"][1])
    assert fields["CFG scale"] == "5.0" and fields["Size"] == "32x32"
    rerun.main([str(first), "--config", checkpoints["base"][0], "--ckpt", checkpoints["base"][1],
                "--refiner_config", checkpoints["refiner"][0], "--refiner_ckpt", checkpoints["refiner"][1],
                "--device", "cpu", "--outdir", str(tmp_path / "rerun")])
    assert "identical to" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the refiner is part of the image
        rerun.main([str(first), "--config", checkpoints["base"][0], "--ckpt", checkpoints["base"][1],
                    "--device", "cpu", "--outdir", str(tmp_path / "rerun")])
    assert "made with the refiner" in capsys.readouterr().err


def test_sdxl_img2img_rerun_is_identical(checkpoints, fixture, tmp_path, capsys):
    mode, argv = case_argv(fixture, checkpoints, "refiner_img2img", tmp_path / "run")
    run_cli(mode, argv)
    image = sorted((tmp_path / "run" / "samples").glob("*.png"))[0]
    fields = png_info.parse_parameters(png_info.read_parameters(str(image)))
    assert (fields["Size"], fields["Original height"], fields["Aesthetic score"]) == ("64x64", "64", "6.0")
    # the init image is named again (a path a PNG records is never opened); its hash is checked
    rerun.main([str(image), "--config", checkpoints["refiner"][0], "--ckpt", checkpoints["refiner"][1],
                "--device", "cpu", "--outdir", str(tmp_path / "rerun"), "--init-img", fields["Init image"]])
    assert "identical to" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "ddim"], "sampler 'ddim' is not one of generative-models'"),
    (["--plms"], "sampler 'plms' is not one of generative-models'"),
    (["--dpm_solver"], "sampler 'dpm_solver' is not one of"),
    (["--sampler", "dpm2"], "sampler 'dpm2' is not one of"),
    (["--schedule", "exponential"], "schedule 'exponential' does not apply"),
    (["--aesthetic_score", "7"], "--aesthetic_score applies to a model conditioned on it"),
    (["--refiner_ckpt", "x.safetensors"], "needs both --refiner_config and --refiner_ckpt"),
    (["--refiner_strength", "0.3"], "needs both --refiner_config and --refiner_ckpt"),
    (["--ddim_steps", "1001"], "steps must be an integer in [1, 1000]"),
])
def test_sdxl_refusals_are_one_line(checkpoints, tmp_path, capsys, extra, message):
    argv = ["--config", checkpoints["base"][0], "--ckpt", checkpoints["base"][1], "--H", "32", "--W", "32", "--f",
            "2", "--n_samples", "1", "--n_iter", "1", "--device", "cpu", "--outdir", str(tmp_path / "out")] + extra
    with pytest.raises(SystemExit) as info:
        cli.txt2img_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.startswith("txt2img.py: error: ") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_sdxl_flags_are_refused_for_sd_configs(tmp_path, capsys):
    config = tiny_config_path("tiny-v1")
    ckpt = make_tiny_checkpoint(config, tmp_path / "v1.ckpt")
    with pytest.raises(SystemExit):
        cli.txt2img_main(["--config", str(config), "--ckpt", str(ckpt), "--crop_top", "8", "--device", "cpu",
                          "--outdir", str(tmp_path / "out")])
    assert "--crop_top applies to SDXL (generative-models) configs only" in capsys.readouterr().err


def test_sdxl_defaults(checkpoints):
    from ldm.cli import build_parser, inputs

    opts = build_parser("txt2img").parse_args(["--config", checkpoints["base"][0], "--ckpt", checkpoints["base"][1],
                                               "--device", "cpu"])
    inputs.validate(opts, "txt2img")
    assert (opts.H, opts.W, opts.scale, opts.sampler, opts.crop_top) == (1024, 1024, 5.0, "sgm_euler", 0)
    assert opts.aesthetic_score is None  # the base has no aesthetic embedder
    opts = build_parser("txt2img").parse_args(["--config", checkpoints["base"][0], "--ckpt", checkpoints["base"][1],
                                               "--device", "cpu", "--refiner_config", checkpoints["refiner"][0],
                                               "--refiner_ckpt", checkpoints["refiner"][1], "--ddim_steps", "30"])
    inputs.validate(opts, "txt2img")
    assert (opts.refiner_strength, opts.refiner_steps, opts.aesthetic_score, opts.negative_aesthetic_score) == \
        (0.15, 30, 6.0, 2.5)
    opts = build_parser("txt2img").parse_args(["--config", str(ROOT / "configs/stable-diffusion/v1-inference.yaml"),
                                               "--device", "cpu"])
    inputs.sdxl.resolve(opts, "txt2img")
    assert (opts.H, opts.W, opts.scale, opts.sgm) == (512, 512, 7.5, False)
    opts = build_parser("img2img").parse_args(["--config", checkpoints["base"][0], "--scale", "7.5"])
    inputs.sdxl.resolve(opts, "img2img")
    assert (opts.H, opts.scale) == (None, 7.5)  # given flags stay; img2img's size is the init image's


def test_sdxl_init_image_is_read_as_the_demo(tmp_path):
    """load_img: multiples of 64, PIL's default (bicubic) resize, x / 127.5 - 1."""
    from ldm.cli import sdxl

    image = sdxl.load_init_image(str(INIT_IMAGE))
    with Image.open(INIT_IMAGE) as source:
        expected = np.array(source.convert("RGB").resize((64, 64), Image.BICUBIC)).astype(np.float32) / 127.5 - 1.0
    assert image.shape == (1, 3, 64, 64)
    assert torch.equal(image[0].permute(1, 2, 0), torch.from_numpy(expected))


def test_sdxl_half_precision_vae_overflow_is_decoded_again_in_float32():
    """SDXL's VAE overflows in float16 (diffusers #4325): the decode guard of ldm.pipeline covers sgm models."""
    from test_pipeline import _HalfOverflowVAE
    from tiny_models import tiny_model

    model = tiny_model(tiny_config_path("tiny-sdxl-base"))
    model.first_stage_model = _HalfOverflowVAE().to(torch.float16)
    model.scale_factor = 0.5
    images = pipeline.decode(model, torch.ones(1, 4, 2, 2))
    assert torch.equal(images, torch.full((1, 4, 2, 2), 2.0))
    assert model.vae.weight.dtype == torch.float16
