"""ControlNet against the ORIGINAL lllyasviel/ControlNet code (ldm/models/controlnet.py, ldm/controlnet_loader.py,
ldm/config_controlnet.py, ldm/cli/control.py).

tests/make_fixtures_controlnet.py ran the original cldm.cldm.ControlLDM and cldm/ddim_hacked.py on tiny random
models as the gradio demos drive them (strength 1 and 0.5, guess mode, a negative prompt, the three file layouts,
two ControlNets summed, img2img, a canny hint) and stored the latents and images; here our command line runs the
recorded flags on the same files. It also stored ControlLDM.apply_model of an SD-shaped tiny net (13 residuals).
Also here: the ControlNet flags' PNG parameters, rerun and errors. Files and configs: test_controlnet_files.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import make_fixtures_controlnet as mf
from ldm import cli, png_info
from ldm.cli import run
from ldm.models.controlnet import Control, control_scales, make_controls
from tiny_models import tiny_config_path, tiny_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture():
    with safe_open(str(mf.FIXTURE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def files(tmp_path_factory, fixture):
    """The tiny checkpoint files the fixture was made from, in the released layouts."""
    states = mf.state_dicts()
    assert mf.state_digest(states) == fixture[1]["checkpoint_digest"], \
        "tests/tiny_models.py now makes other weights: rerun tests/make_fixtures_controlnet.py"
    return mf.write_files(tmp_path_factory.mktemp("controlnet"))


def fill(argv: list[str], files: dict[str, Path], config: Path | None = None) -> list[str]:
    """The recorded flags with their {placeholders} replaced by paths."""
    paths = {"config": config or tiny_config_path(mf.CONFIG), "hint_a": mf.HINTS["a"], "hint_b": mf.HINTS["b"],
             "photo": mf.PHOTO, **files}
    out = []
    for arg in argv:
        if arg.startswith("{"):
            name, rest = arg[1:].split("}", 1)
            arg = f"{paths[name]}{rest}"
        out.append(arg)
    return out


def run_cli(mode: str, argv: list[str], outdir: Path, monkeypatch) -> tuple[torch.Tensor, np.ndarray]:
    """(latents, uint8 images) of one command line; the latents are caught on their way to the decoder."""
    caught = []
    decode = run.decode
    monkeypatch.setattr(run, "decode", lambda opts, model, latents: caught.append(latents) or decode(opts, model,
                                                                                                         latents))
    (cli.txt2img_main if mode == "txt2img" else cli.img2img_main)(argv + ["--outdir", str(outdir)])
    images = np.stack([np.asarray(Image.open(p)) for p in sorted((outdir / "samples").glob("*.png"))])
    return torch.cat(caught), images


class FakeCv2:
    """Stands in for OpenCV (not in the test environment): checks the call the canny preprocessor makes and
    answers with the edges real OpenCV computed in the fixture generator."""

    def __init__(self, edges: np.ndarray):
        self.edges, self.calls = edges, []

    def Canny(self, image, low, high):  # noqa: N802 (OpenCV's name)
        self.calls.append((low, high))
        expected = np.asarray(Image.open(mf.PHOTO).convert("RGB"))
        assert image.dtype == np.uint8 and np.array_equal(image, expected)
        return self.edges.copy()


# Latents (values of magnitude ~5): both sides run float32 on the CPU with different op orders (our VE-form DDIM
# and modules against the VP-form ddim_hacked and the original modules); measured worst differences 1.5e-5 ..
# 1.1e-4 over the cases (guess mode the largest), far below what a wrong hint, scale or branch gives: the fp16
# rounding of the extracted file's weights alone moves them by 1.6e-2. Images: within one uint8 level
# (truncation of values that differ by ~1e-5 can land either side of an integer).
LATENT_ATOL = 5e-4


@pytest.mark.parametrize("case", list(mf.CASES))
def test_cli_matches_the_original(case, files, fixture, tmp_path, monkeypatch, capsys):
    tensors, metadata = fixture
    mode, *argv = json.loads(metadata[f"argv.{case}"])
    fake = FakeCv2(tensors["canny_map"].numpy()[:, :, 0])
    if case == "canny":
        monkeypatch.setitem(sys.modules, "cv2", fake)
    latents, images = run_cli(mode, fill(argv, files), tmp_path, monkeypatch)
    capsys.readouterr()
    expected = tensors[f"images.{case}"].numpy()
    assert images.shape == expected.shape
    assert np.abs(images.astype(np.int16) - expected.astype(np.int16)).max() <= 1
    assert (latents - tensors[f"latents.{case}"]).abs().max() < LATENT_ATOL
    if case == "canny":
        assert fake.calls == [(100, 200)]


def test_a_wrapped_v10_file_and_a_plain_sd_config_give_the_same(files, fixture, tmp_path, monkeypatch, capsys):
    tensors, metadata = fixture
    # the v1.0 file under a Lightning "state_dict" entry
    mode, *argv = json.loads(metadata["argv.v10"])
    argv = fill(argv, {**files, "v10": files["v10_wrapped"]})
    latents, _ = run_cli(mode, argv, tmp_path / "wrapped", monkeypatch)
    assert (latents - tensors["latents.v10"]).abs().max() < LATENT_ATOL
    # a plain Stable Diffusion --config with --control_config: the same model as the ControlLDM yaml's
    text = tiny_config_path(mf.CONFIG).read_text()
    start, end = text.index("    control_stage_config:"), text.index("    unet_config:")
    plain = (text[:start] + text[end:]).replace("cldm.cldm.ControlLDM", "ldm.models.diffusion.ddpm.LatentDiffusion")
    plain = plain.replace("cldm.cldm.ControlledUnetModel", "ldm.modules.diffusionmodules.openaimodel.UNetModel")
    plain = plain.replace('    control_key: "hint"\n', "").replace("    only_mid_control: False\n", "")
    (tmp_path / "sd.yaml").write_text(plain)
    mode, *argv = json.loads(metadata["argv.v11"])
    argv = fill(argv, files, config=tmp_path / "sd.yaml") + ["--control_config", str(tiny_config_path(mf.CONFIG))]
    latents, _ = run_cli(mode, argv, tmp_path / "plain", monkeypatch)
    capsys.readouterr()
    assert (latents - tensors["latents.v11"]).abs().max() < LATENT_ATOL


# ------------------------------------------------------------------------------------------ apply_model
@pytest.fixture(scope="module")
def sd_shaped():
    return tiny_model(tiny_config_path(mf.CONFIG_13), seed=mf.SEED_13)


@pytest.mark.parametrize("case", mf.APPLY_CASES)
def test_apply_model_matches_the_original(case, sd_shaped, fixture):
    """ControlLDM.apply_model with the original's dicts (c_concat = hint), 13 residuals, each scale its own."""
    model, inputs = sd_shaped, mf.apply_inputs()
    model.control_scales = list(control_scales(0.7, guess_mode=True) if case == "guess" else control_scales())
    model.only_mid_control, model.global_average_pooling = case == "only_mid", case == "avg_pool"
    try:
        cond = {"c_crossattn": [inputs["context"]], "c_concat": None if case == "uncond" else [inputs["hint"]]}
        with torch.no_grad():
            eps = model.apply_model(inputs["x"], inputs["t"], cond)
            # the same through our own vocabulary: a Control entry
            ours = {"c_crossattn": [inputs["context"]]}
            if case != "uncond":
                ours["control"] = [Control(model.control_model, inputs["hint"], tuple(model.control_scales))]
            assert torch.equal(model.apply_model(inputs["x"], inputs["t"], ours), eps)
    finally:
        model.only_mid_control = model.global_average_pooling = False
    # float32, different op orders (our UNet and attention vs the original modules): measured 1.7e-6 .. 3.4e-6
    torch.testing.assert_close(eps, fixture[0][f"apply.{case}"], rtol=0, atol=2e-5)


def test_the_controlnet_has_13_residuals_and_guess_mode_scales(sd_shaped):
    inputs = mf.apply_inputs()
    with torch.no_grad():
        outs = sd_shaped.control_model(inputs["x"], inputs["hint"], inputs["t"], inputs["context"])
    assert len(outs) == 13 == len(sd_shaped.model.diffusion_model.input_blocks) + 1
    assert [tuple(o.shape[1:]) for o in outs][::4] == [(32, 16, 16), (32, 8, 8), (64, 4, 4), (64, 2, 2)]
    assert control_scales(0.5) == (0.5,) * 13
    guess = control_scales(1.0, guess_mode=True)
    assert guess[12] == 1.0 and guess[0] == 0.825 ** 12 and all(a < b for a, b in zip(guess, guess[1:]))


def test_two_controlnets_sum_their_scaled_residuals(sd_shaped):
    inputs = mf.apply_inputs()
    net = sd_shaped.control_model
    hint_b = inputs["hint"].flip(-1)
    with torch.no_grad():
        a = net(inputs["x"], inputs["hint"], inputs["t"], inputs["context"])
        b = net(inputs["x"], hint_b, inputs["t"], inputs["context"])
        from ldm.models.controlnet import residuals

        both = residuals(make_controls([net, net], [inputs["hint"], hint_b], [1.0, 0.5]), inputs["x"], inputs["t"],
                         inputs["context"])
    for r, ra, rb in zip(both, a, b):
        assert torch.equal(r, ra * 1.0 + rb * 0.5)


def test_guess_mode_leaves_the_unconditional_branch_without_control_and_runs_two_calls(sd_shaped, monkeypatch):
    from ldm import pipeline

    model, inputs = sd_shaped, mf.apply_inputs()
    calls = []
    apply_model = model.apply_model

    def spy(x, t, cond=None, **more):
        calls.append((x.shape[0], "control" in cond))
        return apply_model(x, t, cond, **more)

    monkeypatch.setattr(model, "apply_model", spy)
    hint = inputs["hint"][:1]
    for guess in (False, True):
        calls.clear()
        pipeline.sample(model, ["a", "b"], steps=2, shape=(2, 4, 16, 16), generator=torch.Generator().manual_seed(0),
                        controls=make_controls([model.control_model], [hint], [1.0], guess), guess_mode=guess,
                        disable=True)
        # ddim_hacked.py: apply_model(x, t, cond) then apply_model(x, t, uncond), each of batch B
        assert calls == [(2, True), (2, not guess)] * 2


# ------------------------------------------------------------------------------------------- command line
def base_argv(files, tmp_path, *extra):
    return ["--config", str(tiny_config_path(mf.CONFIG)), "--ckpt", str(files["sd"]), "--prompt", "a cat",
            "--H", "32", "--W", "32", "--f", "8", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1",
            "--precision", "full", "--device", "cpu", "--outdir", str(tmp_path / "out"), *extra]


def test_png_records_the_controlnets_and_rerun_replays_them(files, tmp_path, capsys):
    argv = base_argv(files, tmp_path, "--control", f"{files['v11']}:0.75", "--control", f"{files['second']}:0.5",
                     "--control_image", str(mf.HINTS["a"]), "--control_image", str(mf.HINTS["b"]), "--guess_mode",
                     "--negative_prompt", "blurry", "--n_iter", "2")
    cli.txt2img_main(argv)
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    fields = png_info.parse_parameters(png_info.read_parameters(samples[3]))
    assert fields["ControlNet 0"] == str(files["v11"]) and fields["ControlNet 1"] == str(files["second"])
    assert fields["ControlNet 0 hash"] == png_info.file_hash(files["v11"])
    assert (fields["ControlNet 0 strength"], fields["ControlNet 1 strength"]) == ("0.75", "0.5")
    assert fields["ControlNet 1 config"] == str(tiny_config_path(mf.CONFIG))
    assert fields["Control image 1"] == str(mf.HINTS["b"])
    assert fields["Control image 1 hash"] == png_info.file_hash(mf.HINTS["b"])
    assert fields["Guess mode"] == "True" and fields["EMA"] == "False"  # the raw UNet, as the original
    from ldm.cli.rerun import main as rerun_main

    base = [str(samples[3]), "--config", str(tiny_config_path(mf.CONFIG)), "--ckpt", str(files["sd"]),
            "--device", "cpu"]
    named = ["--control_config", str(tiny_config_path(mf.CONFIG)), "--control_config", str(tiny_config_path(mf.CONFIG)),
             "--control_image", str(mf.HINTS["a"]), "--control_image", str(mf.HINTS["b"])]
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a path recorded in the PNG is never opened: the files are named again
        rerun_main(base + ["--outdir", str(tmp_path / "rerun")])
    assert "name them with --control" in capsys.readouterr().err
    rerun_main(base + ["--outdir", str(tmp_path / "rerun"), "--control", str(files["v11"]), "--control",
                       str(files["second"])] + named)
    assert "identical to" in capsys.readouterr().out
    # given in another order: checked by hash
    with pytest.raises(SystemExit):
        rerun_main(base + ["--outdir", str(tmp_path / "rerun2"), "--control", str(files["second"]),
                           "--control", str(files["v11"])] + named)
    assert "ControlNet 0 hash" in capsys.readouterr().err


def test_the_v10_usage_records_its_hint_and_replays(files, tmp_path, capsys):
    argv = base_argv(files, tmp_path, "--control_image", str(mf.HINTS["a"]))
    argv[argv.index("--ckpt") + 1] = str(files["v10"])
    cli.txt2img_main(argv)
    sample = sorted((tmp_path / "out" / "samples").glob("*.png"))[1]
    fields = png_info.parse_parameters(png_info.read_parameters(sample))
    assert "ControlNet 0" not in fields and fields["ControlNet 0 strength"] == "1.0" and "Guess mode" not in fields
    from ldm.cli.rerun import main as rerun_main

    rerun_main([str(sample), "--config", str(tiny_config_path(mf.CONFIG)), "--ckpt", str(files["v10"]),
                "--device", "cpu", "--outdir", str(tmp_path / "rerun"), "--control_image", str(mf.HINTS["a"])])
    assert "identical to" in capsys.readouterr().out


def test_offload_is_refused_with_controlnets(files):
    from ldm.cli import control
    from ldm.cli.flags import CLIError, build_parser

    opts = build_parser("txt2img").parse_args(fill(base_argv(files, Path("."), "--control", "{v11}",
                                                            "--control_image", "{hint_a}", "--offload"), files))
    with pytest.raises(CLIError, match="--offload does not move ControlNets"):
        control.validate(opts)


def test_controlnet_flags_parse():
    from ldm.cli.control import split_strength

    assert split_strength("a/b.pth") == ("a/b.pth", 1.0)
    assert split_strength("a/b.pth:0.5") == ("a/b.pth", 0.5)
    assert split_strength("C:/models/b.pth") == ("C:/models/b.pth", 1.0)  # not a number after the colon
    assert split_strength("x:y.pth:2") == ("x:y.pth", 2.0)
    assert split_strength("b.pth:-1e-1") == ("b.pth", -0.1)


BAD = {
    "image without a ControlNet": (["--control_image", "{hint_a}"], "needs a ControlNet", "tiny-v1"),
    "guess mode without a ControlNet": (["--guess_mode"], "--guess_mode needs a ControlNet", "tiny-v1"),
    "no hint": (["--control", "{v11}"], "needs its hint: --control_image", None),
    "hint count": (["--control", "{v11}", "--control", "{second}", "--control_image", "{hint_a}",
                    "--control_image", "{hint_b}", "--control_image", "{hint_a}"], "one per ControlNet (2), got 3",
                   None),
    "no control config": (["--control", "{v11}", "--control_image", "{hint_a}"], "--control needs --control_config",
                          "tiny-v1"),
    "config of a plain model": (["--control", "{v11}", "--control_image", "{hint_a}", "--control_config",
                                 "tiny-v1"], "is not a ControlLDM yaml", None),
    "missing file": (["--control", "nowhere.pth", "--control_image", "{hint_a}"], "ControlNet (--control) not found",
                     None),
    "hint size": (["--control", "{v11}", "--control_image", "{hint_a}", "--H", "64"],
                  "is 32x32, the ControlNet needs 32x64 for a 32x64 image", None),
    "control config alone": (["--control_image", "{hint_a}", "--control_config", "tiny-cldm"],
                             "--control_config applies to --control", None),
    "wrong net for the model": (["--control", "{v11}", "--control_image", "{hint_a}", "--control_config",
                                 "tiny-cldm-13"], "shape mismatch", None),
    "no opencv": (["--control", "{v11}", "--control_image", "{hint_a}", "--control_preprocess", "canny"],
                  "needs OpenCV", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_controlnet_input_is_one_line_and_writes_nothing(case, files, tmp_path, capsys, monkeypatch):
    extra, message, config = BAD[case]
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 fails, as where OpenCV is not installed
    extra = [str(tiny_config_path(a)) if a in ("tiny-v1", "tiny-cldm", "tiny-cldm-13") else a for a in extra]
    argv = fill(base_argv(files, tmp_path, *extra), files)
    if config is not None:
        argv[argv.index("--config") + 1] = str(tiny_config_path(config))
    with pytest.raises(SystemExit) as info:
        cli.txt2img_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
