"""scripts/txt2img.py, scripts/img2img.py, scripts/rerun.py and ldm/png_info.py: flags, files, metadata, errors.

The CLI runs in-process (`txt2img_main(argv)`) on tiny random checkpoints with 16x16 images (tiny VAE f=2,
8x8 latents) and few steps; two bad-input cases run as real subprocesses of the scripts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import cli, fast, png_info
from ldm.cli import record, rerun
from ldm.config import load_config
from tiny_models import make_tiny_checkpoint, tiny_config_path

ROOT = Path(__file__).resolve().parents[1]

# Defaults of the original scripts: CompVis/stable-diffusion scripts/txt2img.py and scripts/img2img.py
# (argparse definitions in main()); --steps is Stability-AI/stablediffusion's name for --ddim_steps.
ORIGINAL_DEFAULTS = {
    "txt2img": dict(prompt="a painting of a virus monster playing guitar", outdir="outputs/txt2img-samples",
                    skip_grid=False, skip_save=False, ddim_steps=50, plms=False, dpm_solver=False,
                    fixed_code=False, ddim_eta=0.0, n_iter=2, H=512, W=512, C=4, f=8, n_samples=3, n_rows=0,
                    scale=7.5, from_file=None, config="configs/stable-diffusion/v1-inference.yaml",
                    ckpt="models/ldm/stable-diffusion-v1/model.ckpt", seed=42, precision="autocast"),
    "img2img": dict(prompt="a painting of a virus monster playing guitar", init_img=None,
                    outdir="outputs/img2img-samples", skip_grid=False, skip_save=False, ddim_steps=50,
                    plms=False, fixed_code=False, ddim_eta=0.0, n_iter=1, C=4, f=8, n_samples=2, n_rows=0,
                    scale=5.0, strength=0.75, from_file=None, config="configs/stable-diffusion/v1-inference.yaml",
                    ckpt="models/ldm/stable-diffusion-v1/model.ckpt", seed=42, precision="autocast"),
}
# ours: sampler None = ddim unless --plms / --dpm_solver; device None = CUDA if available, else cpu
OUR_DEFAULTS = dict(sampler=None, schedule="uniform", negative_prompt="", vae=None, no_ema=False, device=None)
# the opt-in speed and memory paths: all off
SPEED_DEFAULTS = dict(attention=None, attention_slice=None, prepack=False, channels_last=False, compile=False,
                      vae_tile=None, vae_tile_overlap=None, vae_slice=None, offload=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, checkpoint) of the tiny v1 model."""
    config = tiny_config_path("tiny-v1")
    return str(config), str(make_tiny_checkpoint(config, tmp_path_factory.mktemp("ckpt") / "tiny-v1.ckpt"))


def small(tiny, outdir, *extra) -> list[str]:
    config, ckpt = tiny
    return ["--config", config, "--ckpt", ckpt, "--outdir", str(outdir), "--H", "16", "--W", "16", "--f", "2",
            "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "4", "--device", "cpu", "--seed", "5", *extra]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_defaults_are_the_originals(mode):
    opts = vars(cli.build_parser(mode).parse_args([]))
    for name, value in {**ORIGINAL_DEFAULTS[mode], **OUR_DEFAULTS, **SPEED_DEFAULTS}.items():
        assert opts[name] == value, name


def test_sampler_flags_and_steps_alias():
    parse = cli.build_parser("txt2img").parse_args
    assert cli.sampler_name(parse([])) == "ddim"
    assert cli.sampler_name(parse(["--plms"])) == "plms"
    assert cli.sampler_name(parse(["--dpm_solver"])) == "dpm_solver"
    assert cli.sampler_name(parse(["--plms", "--dpm_solver"])) == "dpm_solver"  # txt2img.py checks dpm first
    assert cli.sampler_name(parse(["--sampler", "euler_a"])) == "euler_a"
    assert parse(["--steps", "7"]).ddim_steps == 7 and parse(["--ddim_steps", "9"]).ddim_steps == 9
    with pytest.raises(cli.CLIError, match="contradicts"):
        cli.sampler_name(parse(["--plms", "--sampler", "euler"]))


def test_help_mentions_no_safety_checker_or_watermark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.txt2img_main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "no NSFW safety checker and no invisible watermark" in text


# ------------------------------------------------------------------------------------------- png metadata
def test_parameters_round_trip_through_a_png(tmp_path):
    fields = {"Prompt": " a cat, sitting:\non a mat ", "Negative prompt": "blurry, \"ugly\"",
              "Steps": "20", "Sampler": "euler_a", "CFG scale": "7.5", "Size": "64x32", "Note": "", "Version": "ldm 0"}
    text = png_info.format_parameters(fields)
    path = tmp_path / "x.png"
    png_info.save_png(np.zeros((2, 3, 3), np.uint8), str(path), text)
    assert png_info.read_parameters(str(path)) == text
    assert png_info.parse_parameters(text) == fields
    assert os.listdir(tmp_path) == ["x.png"]  # the temporary file is gone


def test_parse_reads_a1111_infotext():
    # the layout AUTOMATIC1111 writes (modules/processing.py create_infotext), incl. a quoted value
    text = ("a cat\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
            'Seed: 1, Size: 512x768, Model hash: 6ce0161689, Lora hashes: "a: 1, b: 2", Version: v1.9.4')
    fields = png_info.parse_parameters(text)
    assert fields["Prompt"] == "a cat" and fields["Negative prompt"] == "ugly"
    assert fields["Lora hashes"] == "a: 1, b: 2" and fields["Size"] == "512x768" and fields["Version"] == "v1.9.4"
    assert png_info.parse_parameters(png_info.format_parameters(fields)) == fields


def test_options_round_trip_through_the_infotext():
    opts = cli.build_parser("img2img").parse_args(["--prompt", "x, y", "--negative_prompt", "z", "--scale", "0.1",
                                                   "--strength", "0.3", "--no-ema", "--fixed_code"])
    opts.sampler, opts.H, opts.W = "dpmpp_2m", 48, 80
    text = record.infotext(vars(opts), opts.prompt, 3, 1, {"Model hash": "abc"})
    back, batch, pos = record.options_from_infotext(png_info.parse_parameters(text), vars(opts))
    assert (batch, pos) == (3, 1)
    for key, name, _ in record.FIELDS:
        assert back[name] == getattr(opts, name), key
    assert (back["prompt"], back["negative_prompt"], back["H"], back["W"]) == ("x, y", "z", 48, 80)


# -------------------------------------------------------------------------------------- files and reruns
def test_numbering_continues_and_never_overwrites(tiny, tmp_path, capsys):
    samples = tmp_path / "samples"
    samples.mkdir()
    old = {}
    for name in ("00000.png", "00001.png", "00002.png"):
        png_info.save_png(np.full((2, 2, 3), 7, np.uint8), str(samples / name))
        old[name] = (samples / name).read_bytes()
    png_info.save_png(np.full((2, 2, 3), 9, np.uint8), str(tmp_path / "grid-0000.png"))
    old_grid = (tmp_path / "grid-0000.png").read_bytes()
    cli.txt2img_main(small(tiny, tmp_path))
    assert sorted(os.listdir(samples)) == [f"{i:05}.png" for i in range(5)]
    assert all((samples / name).read_bytes() == data for name, data in old.items())
    assert sorted(p.name for p in tmp_path.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    assert (tmp_path / "grid-0000.png").read_bytes() == old_grid
    # grid: 2 images in a row, 2 px padding (make_grid), as the original
    assert pixels(tmp_path / "grid-0001.png").shape == (16 + 4, 2 * 16 + 6, 3)
    fields = png_info.parse_parameters(png_info.read_parameters(str(samples / "00004.png")))
    assert fields["Batch pos"] == "1" and fields["Seed"] == "5" and fields["Size"] == "16x16"
    assert fields["Model hash"] == png_info.file_hash(tiny[1]) and fields["Version"].startswith("ldm ")
    capsys.readouterr()


def test_same_seed_same_png_and_rerun_is_bit_exact(tiny, tmp_path, capsys):
    # euler_a draws noise at every step and n_iter 2 makes the second batch depend on the first's draws
    argv = small(tiny, tmp_path / "a", "--sampler", "euler_a", "--n_iter", "2", "--skip_grid")
    cli.txt2img_main(argv)
    cli.txt2img_main(argv[:argv.index("--outdir") + 1] + [str(tmp_path / "b")] + argv[argv.index("--outdir") + 2:])
    a, b = sorted((tmp_path / "a" / "samples").iterdir()), sorted((tmp_path / "b" / "samples").iterdir())
    assert len(a) == 4 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert not np.array_equal(pixels(a[0]), pixels(a[2]))  # batch 1 got fresh noise
    rerun.main([str(a[3]), "--config", tiny[0], "--ckpt", tiny[1], "--outdir", str(tmp_path / "re"),
                "--device", "cpu"])
    again = tmp_path / "re" / "00000.png"
    assert np.array_equal(pixels(again), pixels(a[3]))
    assert png_info.read_parameters(str(again)) == png_info.read_parameters(str(a[3]))
    assert "identical to" in capsys.readouterr().out


def test_img2img_writes_and_reruns(tiny, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 35, 3), dtype=np.uint8)).save(init)
    config, ckpt = tiny
    argv = ["--config", config, "--ckpt", ckpt, "--outdir", str(tmp_path / "out"), "--init-img", str(init),
            "--f", "2", "--ddim_steps", "4", "--device", "cpu", "--strength", "0.5", "--skip_grid"]
    cli.img2img_main(argv)
    outputs = sorted((tmp_path / "out" / "samples").iterdir())
    assert len(outputs) == 2 and pixels(outputs[0]).shape == (32, 32, 3)  # 40x35 rounded down to 32x32
    fields = png_info.parse_parameters(png_info.read_parameters(str(outputs[1])))
    assert fields["Denoising strength"] == "0.5" and fields["CFG scale"] == "5.0"
    # the init image is named again (a path recorded in the PNG is never opened: tests/test_hostile.py)
    rerun.main([str(outputs[1]), "--config", config, "--ckpt", ckpt, "--outdir", str(tmp_path / "re"),
                "--device", "cpu", "--init-img", str(init)])
    assert np.array_equal(pixels(tmp_path / "re" / "00000.png"), pixels(outputs[1]))
    capsys.readouterr()


def test_fixed_code_reuses_the_start_code(tiny, tmp_path, capsys):
    # as txt2img.py --fixed_code: one start code for every batch; deterministic DDIM (eta 0) then gives
    # the same images in every iteration, while without it the second iteration draws fresh noise
    for name, extra in (("fixed", ["--fixed_code"]), ("fresh", [])):
        cli.txt2img_main(small(tiny, tmp_path / name, "--n_iter", "2", "--ddim_steps", "2", "--skip_grid", *extra))
    fixed = [pixels(p) for p in sorted((tmp_path / "fixed" / "samples").iterdir())]
    fresh = [pixels(p) for p in sorted((tmp_path / "fresh" / "samples").iterdir())]
    assert np.array_equal(fixed[0], fixed[2]) and np.array_equal(fixed[1], fixed[3])
    assert not np.array_equal(fixed[0], fixed[1])  # images within a batch still differ
    assert not np.array_equal(fresh[0], fresh[2])
    capsys.readouterr()


def test_vae_flag_replaces_the_decoder_and_is_recorded(tiny, tmp_path, capsys):
    state = torch.load(tiny[1], map_location="cpu", weights_only=True)["state_dict"]
    prefix = "first_stage_model."
    vae = {k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}
    vae["decoder.conv_out.bias"] += 0.5  # a visibly different decoder: brighter images
    torch.save({"state_dict": vae}, tmp_path / "vae.ckpt")
    for name, extra in (("plain", []), ("vae", ["--vae", str(tmp_path / "vae.ckpt")])):
        cli.txt2img_main(small(tiny, tmp_path / name, "--ddim_steps", "2", "--n_samples", "1", "--skip_grid", *extra))
    plain, with_vae = (tmp_path / "plain" / "samples" / "00000.png"), (tmp_path / "vae" / "samples" / "00000.png")
    assert pixels(with_vae).astype(float).mean() > pixels(plain).astype(float).mean() + 10
    fields = png_info.parse_parameters(png_info.read_parameters(str(with_vae)))
    assert fields["VAE hash"] == png_info.file_hash(str(tmp_path / "vae.ckpt")) and fields["VAE"] == "vae.ckpt"
    with pytest.raises(SystemExit):  # rerun needs the same VAE
        rerun.main([str(with_vae), "--config", tiny[0], "--ckpt", tiny[1], "--outdir", str(tmp_path / "re")])
    assert "made with --vae vae.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "re").exists()


def test_from_file_batches_prompts(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    cli.txt2img_main(small(tiny, tmp_path / "out", "--from-file", str(prompts), "--skip_grid", "--sampler", "euler_a"))
    outputs = sorted((tmp_path / "out" / "samples").iterdir())
    got = [png_info.parse_parameters(png_info.read_parameters(str(p))) for p in outputs]
    # chunks of n_samples=2: [one, two], [three] (padded to the batch size, the padding not saved)
    assert [(f["Prompt"], f["Batch number"], f["Batch pos"]) for f in got] == \
        [("one", "0", "0"), ("two", "0", "1"), ("three", "1", "0")]
    # rerun replays batch 0 with "three" instead of [one, two]: the noise it draws does not depend on the
    # prompts, so the image of batch 1 comes out the same. Bit-exact on AVX2 and AMX CPUs; with oneDNN's AVX-512
    # kernels (an AMD EPYC) a replay whose EARLIER batches held other prompts measured 1 uint8 level on 0.13% of
    # the values (ONEDNN_MAX_CPU_ISA=AVX2 there: bit-exact), so one level is the bound, and few values may move
    rerun.main([str(outputs[2]), "--config", tiny[0], "--ckpt", tiny[1], "--outdir", str(tmp_path / "re"),
                "--device", "cpu"])
    replayed, original = pixels(tmp_path / "re" / "00000.png").astype(int), pixels(outputs[2]).astype(int)
    assert np.abs(replayed - original).max() <= 1 and (replayed != original).mean() < 0.01
    capsys.readouterr()


def test_long_prompt_warns_and_continues(tiny, tmp_path, capsys):
    cli.txt2img_main(small(tiny, tmp_path, "--prompt", "word " * 100, "--ddim_steps", "2", "--n_samples", "1",
                           "--skip_grid"))
    err = capsys.readouterr().err
    assert "warning: prompt longer than 77 tokens, truncated" in err
    assert len(os.listdir(tmp_path / "samples")) == 1


# ---------------------------------------------------------------------------------------- speed and memory
def test_speed_flags_keep_the_images_and_are_replayed(tiny, tmp_path, capsys):
    # The opt-in paths change how the same math is computed (tests/test_fast_paths.py bounds the models at 1e-5
    # relative), so the uint8 images agree within one level; those that can flip a level are recorded and
    # rerun.py replays them bit-exactly.
    speed = ["--attention", "sliced", "--attention_slice", "7", "--channels_last", "--vae_slice", "1"]
    if fast.prepack_supported():
        speed.append("--prepack")
    for name, extra in (("plain", ["--fast", "none"]), ("fast", speed)):
        cli.txt2img_main(small(tiny, tmp_path / name, "--skip_grid", *extra))
    plain, fast_path = (sorted((tmp_path / name / "samples").iterdir()) for name in ("plain", "fast"))
    for a, b in zip(plain, fast_path):
        assert np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max() <= 1
    fields = png_info.parse_parameters(png_info.read_parameters(str(fast_path[1])))
    assert (fields["Attention"], fields["Attention slice"], fields["Channels last"], fields["VAE slice"]) == \
        ("sliced", "7", "True", "1")
    assert fields.get("Prepack") == ("True" if "--prepack" in speed else None)
    assert not {"Attention", "Prepack", "VAE tile"} & set(png_info.parse_parameters(
        png_info.read_parameters(str(plain[0]))))  # the plain path records none
    rerun.main([str(fast_path[1]), "--config", tiny[0], "--ckpt", tiny[1], "--outdir", str(tmp_path / "re"),
                "--device", "cpu"])
    assert np.array_equal(pixels(tmp_path / "re" / "00000.png"), pixels(fast_path[1]))
    assert png_info.read_parameters(str(tmp_path / "re" / "00000.png")) == \
        png_info.read_parameters(str(fast_path[1]))
    capsys.readouterr()


def test_vae_tile_flag_decodes_in_tiles_and_is_replayed(tiny, tmp_path, capsys):
    # 16x16 images are 8x8 latents here (f=2): tiles of 4 latents overlapping by 2 decode them in 3x3 pieces
    for name, extra in (("plain", []), ("tiled", ["--vae_tile", "4", "--vae_tile_overlap", "2"])):
        cli.txt2img_main(small(tiny, tmp_path / name, "--skip_grid", "--n_samples", "1", *extra))
    plain, tiled = (tmp_path / name / "samples" / "00000.png" for name in ("plain", "tiled"))
    assert not np.array_equal(pixels(plain), pixels(tiled))  # each tile normalises on its own statistics
    fields = png_info.parse_parameters(png_info.read_parameters(str(tiled)))
    assert (fields["VAE tile"], fields["VAE tile overlap"]) == ("4", "2")
    rerun.main([str(tiled), "--config", tiny[0], "--ckpt", tiny[1], "--outdir", str(tmp_path / "re"),
                "--device", "cpu"])
    assert np.array_equal(pixels(tmp_path / "re" / "00000.png"), pixels(tiled))
    assert "identical to" in capsys.readouterr().out


def test_speed_options_round_trip_through_the_infotext():
    parse = cli.build_parser("txt2img").parse_args
    opts = parse(["--vae_tile", "4", "--vae_tile_overlap", "0", "--attention", "math", "--vae_slice", "3"])
    opts.sampler, opts.H, opts.W = "ddim", 16, 16
    fields = png_info.parse_parameters(record.infotext(vars(opts), "x", 0, 0, {}))
    assert (fields["VAE tile"], fields["VAE tile overlap"], fields["Attention"], fields["VAE slice"]) == \
        ("4", "0", "math", "3")
    assert "Prepack" not in fields and "Compile" not in fields
    back, _, _ = record.options_from_infotext(fields, vars(parse([])))
    assert (back["vae_tile"], back["vae_tile_overlap"], back["attention"], back["vae_slice"]) == (4, 0, "math", 3)
    assert "prepack" not in back  # absent: rerun leaves it at its default (off)


def test_compile_and_offload_flags_reach_the_model(tiny, monkeypatch):
    compiled, offloads = [], []
    monkeypatch.setattr(fast, "compile_module", lambda module, **kw: compiled.append(type(module).__name__))
    monkeypatch.setattr(fast, "SequentialOffload", lambda model, device, offload_device: offloads.append(
        (device, torch.device(offload_device), next(model.parameters()).device)))
    opts = cli.build_parser("txt2img").parse_args(small(tiny, "unused", "--compile", "--offload"))
    opts.device = torch.device("cpu")
    model = cli.load(opts)
    assert compiled == ["UNetModel", "Decoder"]
    # --offload loads into CPU memory and hands the parts to SequentialOffload for the execution device
    assert offloads == [(torch.device("cpu"), torch.device("cpu"), torch.device("cpu"))]
    # the model of the flags: the tiny config, its EMA UNet weights (the default) from the checkpoint
    state = torch.load(tiny[1], map_location="cpu", weights_only=True)["state_dict"]
    key = "model.diffusion_model.out.2.weight"
    assert model.config == load_config(tiny[0])
    assert torch.equal(model.state_dict()[key], state["model_ema.diffusion_modelout2weight"])


# ------------------------------------------------------------------------------------------------ bad input
BAD = {
    "H not a multiple of f": (["--H", "17"], "not a positive multiple of --f"),
    "H not a multiple of the UNet's downsampling": (["--H", "18"], "multiples of 4 for this model"),
    "unknown sampler": (["--sampler", "nope"], "invalid choice: 'nope'"),
    "unknown schedule": (["--schedule", "cosine"], "invalid choice: 'cosine'"),
    "schedule of another family": (["--schedule", "karras"], "valid: uniform, quad"),
    "missing config": (["--config", "nowhere.yaml"], "config not found: nowhere.yaml"),
    "missing ckpt": (["--ckpt", "nowhere.ckpt"], "checkpoint not found: nowhere.ckpt"),
    "missing prompt file": (["--from-file", "nowhere.txt"], "prompt file (--from-file) not found"),
    "impossible step count": (["--ddim_steps", "3"], "--ddim_steps 3"),
    "wrong latent channels": (["--C", "3"], "--C 3 does not match"),
    "the original's LAION-400M switch": (["--laion400m"], "--laion400m selects the LDM-KL-8 BERT model"),
    "prepack off the CPU's float32": (["--prepack", "--precision", "bf16"], "--prepack applies to float32 on the CPU"),
    "offload with the CPU as device": (["--offload"], "--offload moves the models between CPU memory and an"),
    "tile overlap over half the tile": (["--vae_tile", "8", "--vae_tile_overlap", "5"], "--vae_tile_overlap must be"),
    "tile overlap without tiles": (["--vae_tile_overlap", "4"], "--vae_tile_overlap needs --vae_tile"),
    "slice size with another backend": (["--attention", "math", "--attention_slice", "64"],
                                        "applies to --attention sliced"),
    "zero slice": (["--vae_slice", "0"], "--vae_slice must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_no_files(case, tiny, tmp_path, capsys):
    extra, message = BAD[case]
    outdir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.txt2img_main(small(tiny, outdir, *extra))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert "error:" in err
    if "sampler" in case:
        assert "euler_a" in err and "dpmpp_2m" in err  # the valid names are listed
    assert not outdir.exists()


@pytest.mark.parametrize("extra, message", [(["--strength", "1.5"], "--strength must be in [0, 1]"),
                                            (["--init-img", "nowhere.png"], "init image (--init-img) not found")])
def test_img2img_bad_input(extra, message, tiny, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(init)
    config, ckpt = tiny
    argv = ["--config", config, "--ckpt", ckpt, "--outdir", str(tmp_path / "out"), "--init-img", str(init),
            "--f", "2", "--device", "cpu", *extra]
    with pytest.raises(SystemExit) as exit_info:
        cli.img2img_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, extra, message", [
    ("txt2img.py", ["--W", "30"], "--W 30 is not a positive multiple of --f 8"),
    ("img2img.py", ["--init-img", "nowhere.png"], "init image (--init-img) not found: nowhere.png"),
])
def test_scripts_fail_cleanly_in_a_subprocess(script, extra, message, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--outdir", str(tmp_path / "out"),
                             "--ckpt", __file__, "--config", __file__, *extra],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"{script}: error: {message}"], result.stderr
    assert os.listdir(tmp_path) == []
