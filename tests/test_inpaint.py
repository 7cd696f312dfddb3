"""scripts/inpaint.py and ldm/inpaint.py against the ORIGINAL inpainting code, plus conventions and bad input.

Parity: tests/make_fixtures_inpaint.py (run with .venv-ref) executed the original demos (runwayml inpaint_st.py,
Stability streamlit/ and gradio/inpainting.py) and the composed DDIMSampler mask/x0 blend on tiny checkpoints
and stored the uint8 images. Here our CLI runs the issue's command line on the same checkpoints and must agree
within one uint8 level: both sides compute in float32 on the CPU with other op orders (the original
openaimodel / VAE / samplers vs ours; measured differences before truncation ~1e-5, so `astype(np.uint8)` can
land on either side of an integer; 0.05% of the values differ, by 1).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import ldm
from ldm import cli, inpaint, pipeline, png_info, samplers
from ldm.cli import rerun
from make_fixtures_inpaint import (CASES, CKPT_SEED, FIXTURE, INIT_IMAGE, MASK, MODELS, N_SAMPLES, PROMPT, SEED,
                                   STEPS, state_digest)
from tiny_models import make_tiny_checkpoint, tiny_config_path

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{model name: (config path, checkpoint path)} of the tiny models the fixtures were made from."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: (str(tiny_config_path(config)),
                   str(make_tiny_checkpoint(tiny_config_path(config), root / f"{config}.ckpt", seed=CKPT_SEED)))
            for name, config in MODELS.items()}


@pytest.fixture(scope="module")
def fixture():
    with safe_open(str(FIXTURE), "pt") as f:
        return f.metadata(), {case: f.get_tensor(case).numpy() for case in CASES}


def read_samples(outdir: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((outdir / "samples").glob("*.png"))])


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def recorded_argv(metadata: dict, case: str) -> list[str]:
    argv = json.loads(metadata[f"argv.{case}"])
    for flag in ("--init-img", "--mask"):  # recorded relative to the repository root
        argv[argv.index(flag) + 1] = str(ROOT / argv[argv.index(flag) + 1])
    return argv


def test_fixture_inputs_and_checkpoints_are_those_of_the_fixtures(fixture, checkpoints):
    metadata, _ = fixture
    assert hashlib.sha256(INIT_IMAGE.read_bytes()).hexdigest() == metadata["init_image_sha256"]
    assert hashlib.sha256(MASK.read_bytes()).hexdigest() == metadata["mask_sha256"]
    for name, (_, ckpt) in checkpoints.items():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert state_digest(state) == metadata[f"checkpoint_digest.{name}"], \
            "tests/tiny_models.py now makes other weights: rerun tests/make_fixtures_inpaint.py"


@pytest.mark.parametrize("model_name", list(MODELS))
def test_cli_matches_the_original_code(model_name, fixture, checkpoints, tmp_path, capsys):
    metadata, expected = fixture
    config, ckpt = checkpoints[model_name]
    worst = {}
    for case in [case for case, spec in CASES.items() if spec[0] == model_name]:
        outdir = tmp_path / case
        cli.inpaint_main(recorded_argv(metadata, case) + ["--config", config, "--ckpt", ckpt, "--outdir", str(outdir)])
        got = read_samples(outdir)
        assert got.shape == expected[case].shape == (N_SAMPLES, 64, 64, 3), case
        worst[case] = max_difference(got, expected[case])
    capsys.readouterr()
    print(f"{model_name}: max uint8 difference per case {worst}")
    assert max(worst.values()) <= 1, worst


# ------------------------------------------------------------------------------------------- library level
@pytest.fixture(scope="module")
def models(checkpoints):
    # the raw UNet weights: the demos never enter ema_scope (inpaint.py's default, --ema to change)
    return {name: ldm.load_model(*checkpoints[name], ema=False) for name in ("v1-inpainting", "v1")}


@pytest.fixture(scope="module")
def inputs():
    image = inpaint.image_from_uint8(np.asarray(Image.open(INIT_IMAGE).convert("RGB")))
    return image, inpaint.mask_from_uint8(np.asarray(Image.open(MASK).convert("L")))


@pytest.mark.parametrize("case", ["v1-inpainting-negative", "v1-s0.6-eta1"])
def test_library_matches_the_original_code(case, models, inputs, fixture):
    name, _, strength, eta, scale, negative = CASES[case]
    images = pipeline.inpaint(models[name], *inputs, PROMPT, negative_prompt=negative, steps=STEPS, scale=scale,
                              eta=eta, strength=strength, seed=SEED, n_samples=N_SAMPLES, disable=True)
    assert max_difference(pipeline.to_uint8(images), fixture[1][case]) <= 1


def test_text_options_reach_inpainting(models, inputs):
    """The A1111 text options of the command line (--clip_skip, --prompt_syntax, --embedding) and --lora go into
    inpainting runs as into txt2img's: clip skip 2 changes the context, hence the image; the plain options are the
    run without them, bit for bit."""
    from ldm.prompts import TextOptions

    def run(text):
        (_, _, latents), = inpaint.generate(models["v1-inpainting"], [PROMPT], *inputs, n_samples=1, seed=SEED,
                                            steps=4, progress=False, text=text)
        return latents
    plain = run(None)
    assert torch.equal(run(TextOptions("plain", 1, None)), plain)
    assert (run(TextOptions("plain", 2, None)) - plain).abs().max() > 1e-3


def test_mask_convention():
    # make_batch_sd: L / 255 thresholded at 0.5, >= repaints: 127 keeps, 128 repaints
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    assert inpaint.mask_from_uint8(values).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    # uint8 -> [-1, 1] as x / 127.5 - 1 (not img2img.py's 2 * (x / 255) - 1, which rounds differently)
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    image = inpaint.image_from_uint8(pixels)
    assert torch.equal(image, torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0)
    assert image.dtype == torch.float32 and image.shape == (1, 3, 16, 16)


def test_the_unet_sees_latent_mask_and_masked_latent_in_both_branches(models, inputs, monkeypatch):
    """A: c_concat = [nearest-downsampled mask, latent of image * (mask < 0.5)], the same for [uncond, cond]."""
    model = models["v1-inpainting"]
    image, mask = inputs
    calls = []
    original = model.apply_model
    monkeypatch.setattr(model, "apply_model", lambda x, t, cond: calls.append(cond) or original(x, t, cond))
    list(inpaint.generate(model, [PROMPT] * 2, image, mask, n_samples=2, seed=5, steps=2, scale=3.0,
                          progress=False))
    c_concat = torch.cat(calls[0]["c_concat"], dim=1)  # the CFG batch of the demos' {"c_concat": [c_cat]}
    assert c_concat.shape == (4, 5, 8, 8)  # [uncond, cond] x (mask, 4 latent channels); 64 px / f = 8
    assert torch.equal(c_concat[:2], c_concat[2:])
    # the latent mask is the top-left pixel of each 8x8 block of the thresholded mask
    assert torch.equal(c_concat[0, 0], mask[0, 0, ::8, ::8])
    # the masked-image latent: the posterior SAMPLE of image * (mask < 0.5) (hole 0, not -1), the generator's
    # first draw, times scale_factor
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        masked = pipeline.encode_image(model, (image * (mask < 0.5)).expand(2, -1, -1, -1), generator)
    assert torch.equal(c_concat[:2, 1:], masked)


def test_inpainting_start_code_is_numpys(models, inputs, monkeypatch):
    """The documented exception to the noise convention: x_T = RandomState(seed).randn(n, 4, H/f, W/f), float32,
    one draw per batch in turn."""
    starts = []
    monkeypatch.setattr(samplers, "sample", lambda denoiser, x_T, **kw: starts.append(x_T) or x_T)
    runs = inpaint.generate(models["v1-inpainting"], [PROMPT], *inputs, n_samples=1, seed=77, n_iter=2,
                            progress=False)
    assert len(list(runs)) == 2
    state = np.random.RandomState(77)
    for start in starts:
        assert torch.equal(start, torch.from_numpy(state.randn(1, 4, 8, 8)).float())


def test_strength_zero_masked_img2img_keeps_the_blended_start(models, inputs):
    """B at strength 0: t_enc = 0 steps, nothing blends or denoises; the result is img2img's stochastic_encode of
    the init latent at DDIM index 0, the same with any mask."""
    image, mask = inputs
    runs = [pipeline.inpaint(models["v1"], image, m, PROMPT, strength=0.0, steps=4, seed=3, disable=True)
            for m in (mask, torch.ones_like(mask))]
    assert torch.equal(runs[0], runs[1])


# --------------------------------------------------------------------------------------- per-step hooks
@pytest.mark.parametrize("sampler", [name for name, spec in samplers.SAMPLERS.items() if spec.stepwise])
def test_stepwise_run_with_an_identity_hook_is_the_same_run(sampler):
    """A stepwise sampler cut between steps (the hook's place) computes exactly the uncut run."""
    from test_samplers_api import denoiser, x_T

    seen = []

    def hook(x, i, sigma):
        seen.append((i, float(sigma)))
        return x

    options = {"eta": 0.5} if sampler == "ddim" else None
    runs = [samplers.sample(denoiser(), x_T(), sampler=sampler, steps=4, options=options, disable=True,
                            generator=torch.Generator().manual_seed(1), before_step=before)
            for before in (None, hook)]
    assert torch.equal(runs[0], runs[1])
    full = samplers.sigma_list(samplers.SAMPLERS[sampler], denoiser().sigmas, 4, "uniform")
    assert seen == [(i, float(s)) for i, s in enumerate(full[:-1])]


def test_hooks_refuse_samplers_that_carry_state():
    from test_samplers_api import denoiser, x_T

    for sampler in ("plms", "dpmpp_2m", "unipc", "lms"):
        with pytest.raises(ValueError, match="carries state"):
            samplers.sample(denoiser(), x_T(), sampler=sampler, steps=4, disable=True, before_step=lambda x, i, s: x)
    with pytest.raises(ValueError, match="churn"):
        samplers.sample(denoiser(), x_T(), sampler="euler", steps=4, options={"s_churn": 1.0}, disable=True,
                        generator=torch.Generator(), before_step=lambda x, i, s: x)


# ---------------------------------------------------------------------------------------- command line
def small_args(checkpoints, name, outdir, *extra, mask=MASK, image=INIT_IMAGE):
    config, ckpt = checkpoints[name]
    return ["--init-img", str(image), "--mask", str(mask), "--prompt", PROMPT, "--config", config, "--ckpt", ckpt,
            "--outdir", str(outdir), "--ddim_steps", "2", "--n_samples", "2", "--seed", "9", "--device", "cpu",
            *extra]


@pytest.mark.parametrize("name, extra", [("v1-inpainting", ["--ddim_eta", "1", "--n_iter", "2"]),
                                         ("v1", ["--strength", "0.5", "--n_iter", "2", "--sampler", "euler_a"])])
def test_outputs_parameters_and_bit_exact_rerun(name, extra, checkpoints, tmp_path, capsys):
    outdir = tmp_path / "out"
    cli.inpaint_main(small_args(checkpoints, name, outdir, *extra))
    samples = sorted((outdir / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [p.name for p in outdir.glob("grid-*.png")] == ["grid-0000.png"]
    with Image.open(samples[3]) as image:
        assert image.mode == "RGB" and image.size == (64, 64)
    fields = png_info.parse_parameters(png_info.read_parameters(samples[3]))
    assert fields["Mask hash"] == png_info.file_hash(str(MASK)) and fields["Mask"] == str(MASK)
    assert fields["Init image hash"] == png_info.file_hash(str(INIT_IMAGE))
    assert (fields["Batch number"], fields["Batch pos"], fields["EMA"]) == ("1", "1", "False")
    config, ckpt = checkpoints[name]
    with pytest.raises(SystemExit):  # a path recorded in the PNG is never opened: the files must be named
        rerun.main([str(samples[3]), "--config", config, "--ckpt", ckpt, "--outdir", str(tmp_path / "rerun")])
    assert "name that file with --init-img" in capsys.readouterr().err
    rerun.main([str(samples[3]), "--config", config, "--ckpt", ckpt, "--init-img", str(INIT_IMAGE), "--mask",
                str(MASK), "--outdir", str(tmp_path / "rerun")])
    assert "identical to" in capsys.readouterr().out


def test_rerun_checks_the_mask(checkpoints, tmp_path, capsys):
    outdir = tmp_path / "out"
    cli.inpaint_main(small_args(checkpoints, "v1-inpainting", outdir, "--ddim_steps", "1", "--skip_grid"))
    other = tmp_path / "other.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(other)
    config, ckpt = checkpoints["v1-inpainting"]
    with pytest.raises(SystemExit):
        rerun.main([str(outdir / "samples" / "00000.png"), "--config", config, "--ckpt", ckpt, "--mask", str(other),
                    "--init-img", str(INIT_IMAGE), "--outdir", str(tmp_path / "rerun")])
    assert "Mask hash" in capsys.readouterr().err and not (tmp_path / "rerun").exists()


def test_defaults():
    opts = cli.build_parser("inpaint").parse_args([])
    assert (opts.strength, opts.ddim_eta, opts.n_iter, opts.n_samples, opts.scale, opts.no_ema) == (
        1.0, 0.0, 1, 1, 7.5, True)
    assert opts.config == "configs/stable-diffusion/v1-inpainting-inference.yaml"
    assert opts.outdir == "outputs/inpaint-samples" and opts.mask is None
    assert not any(hasattr(opts, name) for name in ("H", "W", "C", "f", "laion400m"))
    assert cli.build_parser("inpaint").parse_args(["--ema"]).no_ema is False


def _bad_inputs(tmp_path):
    small, black, grey = tmp_path / "small.png", tmp_path / "black.png", tmp_path / "grey.png"
    Image.fromarray(np.full((32, 64), 255, np.uint8)).save(small)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(black)
    Image.fromarray(np.full((64, 64), 127, np.uint8)).save(grey)
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(odd)
    odd_mask = tmp_path / "odd_mask.png"
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(odd_mask)
    return {"small": small, "black": black, "grey": grey, "odd": odd, "odd_mask": odd_mask}


BAD = {  # name: (model, flags, message)
    "mask of another size": ("v1-inpainting", dict(mask="small"), "is 64x32 but the init image"),
    "all-black mask": ("v1-inpainting", dict(mask="black"), "all black: nothing to repaint"),
    "mask grey 127 is black": ("v1", dict(mask="grey"), "all black: nothing to repaint"),
    "no mask": ("v1", dict(extra=["--mask", ""]), "mask (--mask) not given"),
    "unreadable mask": ("v1", dict(extra=["--mask", __file__]), "cannot read mask"),
    "size the UNet cannot take": ("v1-inpainting", dict(image="odd", mask="odd_mask"), "needs a multiple of 16"),
    "strength with an inpainting model": ("v1-inpainting", dict(extra=["--strength", "0.5"]),
                                          "an inpainting model starts from noise"),
    "strength out of range": ("v1", dict(extra=["--strength", "1.5"]), "--strength must be in [0, 1]"),
    "a sampler with history for masked img2img": ("v1", dict(extra=["--sampler", "plms"]),
                                                  "--sampler plms cannot blend"),
    "inpainting yaml, 4-channel checkpoint": ("v1", dict(config="tiny-v1-inpainting"),
                                              "the config is an inpainting model's"),
    "4-channel yaml, inpainting checkpoint": ("v1-inpainting f=2", dict(config="tiny-v1"),
                                              "the checkpoint is an inpainting model's"),
}


@pytest.fixture(scope="module")
def with_f2_inpainting(checkpoints, tmp_path_factory):
    """The checkpoints and the tiny f = 2 inpainting model's, whose VAE is tiny-v1's: yaml and checkpoint of the
    two kinds then differ in the UNet's input channels alone."""
    config = tiny_config_path("tiny-v1-inpainting")
    ckpt = make_tiny_checkpoint(config, tmp_path_factory.mktemp("f2") / "inpainting.ckpt")
    return {**checkpoints, "v1-inpainting f=2": (str(config), str(ckpt))}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_no_files(case, with_f2_inpainting, tmp_path, capsys):
    name, spec, message = BAD[case]
    files = _bad_inputs(tmp_path)
    outdir = tmp_path / "out"
    argv = small_args(with_f2_inpainting, name, outdir, *spec.get("extra", []),
                      mask=files.get(spec.get("mask"), MASK), image=files.get(spec.get("image"), INIT_IMAGE))
    if "config" in spec:  # the other kind's yaml with this checkpoint
        argv[argv.index("--config") + 1] = str(tiny_config_path(spec["config"]))
    with pytest.raises(SystemExit) as exit_info:
        cli.inpaint_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("inpaint.py: error: ") and message in err and "Traceback" not in err, err
    assert not outdir.exists()


def test_txt2img_points_inpainting_models_to_inpaint(checkpoints, tmp_path, capsys):
    config, ckpt = checkpoints["v1-inpainting"]
    with pytest.raises(SystemExit):
        cli.txt2img_main(["--config", config, "--ckpt", ckpt, "--outdir", str(tmp_path / "out"), "--H", "64",
                          "--W", "64", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "is an inpainting model" in err and "scripts/inpaint.py" in err and not (tmp_path / "out").exists()
