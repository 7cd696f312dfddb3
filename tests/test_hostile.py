"""Hostile files and hostile parameters (issue 18): refused with one line naming the problem, in seconds, in
bounded memory, with an exit status that is not a signal; or handled right (16-bit init images, concurrent
numbering, Ctrl-C).

The dangerous cases (each hung, crashed or exhausted memory before the fix) run in a worker process under an
address-space limit (RLIMIT_AS) and a wall-clock timeout, each timed and its peak memory read back
(tests/hostile.py builds the files and runs them); a few run as real processes of the scripts, to see the
exit status; the rest run in-process. Every file is built here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hostile
from ldm import cli, png_info
from ldm.cli import inputs, limits, record, run
from ldm.config import load_config
from ldm.models.latent_diffusion import build_model
from tiny_models import make_tiny_checkpoint, tiny_config_path

ROOT = Path(__file__).resolve().parents[1]
ADDRESS_SPACE = 6 << 30  # RLIMIT_AS of the worker and the scripts; torch's import alone maps ~2.5 GB
CASE_SECONDS = 20  # per case; each takes under 2 s on a loaded 2-core machine
WORKER_RSS = 2 << 30  # the worker's peak resident memory; torch + a tiny model + the largest case ~0.7 GB

pytestmark = pytest.mark.usefixtures("one_thread")


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # A shell's background job (`pytest ... &`, nohup) starts with SIGINT ignored, the child inherits that and
    # Python then installs no KeyboardInterrupt handler: give the child the default, as an interactive run has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")


def _one_line(stderr: str) -> list[str]:
    """The lines of stderr that are not progress bars (tqdm redraws with carriage returns)."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and "it/s]" not in line and "?it/s" not in line and "s/it]" not in line]


# ----------------------------------------------------------------------------------------------- the files
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("hostile")
    config = tiny_config_path("tiny-v1")
    f = {"tmp": tmp, "config": str(config), "ckpt": str(make_tiny_checkpoint(config, tmp / "tiny-v1.ckpt"))}
    for name in ("dag_persistent_id", "dag_dict_key", "deep_tuple_key", "deep_list", "zip_bomb", "memo_flood",
                 "copy_amplifier", "sized_bytes", "mark_flood", "inert_flood", "legacy_with_hostile_keys",
                 "safetensors_past_end"):
        f[name] = str(getattr(hostile, name)(tmp / f"{name}.ckpt"))
    yaml = config.read_text()
    for name, old, new in (("model_channels", "model_channels: 32", "model_channels: 0"),
                           ("num_heads", "num_heads: 2", "num_heads: 0"),
                           ("scale_factor", "scale_factor: 0.18215", "scale_factor: 0"),
                           ("linear_start", "linear_start: 0.00085", "linear_start: 5.0"),
                           ("linear_start_nan", "linear_start: 0.00085", "linear_start: .nan")):
        assert old in yaml
        (tmp / f"{name}.yaml").write_text(yaml.replace(old, new))
        f[f"yaml_{name}"] = str(tmp / f"{name}.yaml")
    f["png_bomb"] = str(hostile.png_bomb(tmp / "bomb.png"))
    f["binary_prompts"] = str(tmp / "prompts.bin")
    Path(f["binary_prompts"]).write_bytes(b"a cat\n\xff\xfe\x00\x80 binary\n")
    Image.fromarray(np.zeros((16, 16), np.float32)).save(tmp / "float.tif")  # mode F
    f["float_image"] = str(tmp / "float.tif")
    f["a_file"] = str(tmp / "a-file.txt")
    Path(f["a_file"]).write_text("not a folder")
    f["init"] = str(tmp / "init.png")
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(f["init"])
    f["other_init"] = str(tmp / "other.png")
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(f["other_init"])
    _tampered_pngs(f)
    return f


def _recorded_fields(f: dict, mode: str = "txt2img") -> dict:
    """The parameters txt2img/img2img record for a small run of the tiny model (ldm/cli/record.py)."""
    argv = ["--n_samples", "2", "--ddim_steps", "4", "--f", "2", "--seed", "5"]
    opts = cli.build_parser(mode).parse_args(argv + (["--init-img", f["init"]] if mode == "img2img" else []))
    opts.sampler, opts.H, opts.W = "ddim", 16, 16
    hashes = {"Model hash": png_info.file_hash(f["ckpt"]), "Model": "tiny-v1"}
    if mode == "img2img":
        hashes.update({"Init image": f["init"], "Init image hash": png_info.file_hash(f["init"])})
    return png_info.parse_parameters(record.infotext(vars(opts), "a cat", 1, 1, hashes))


TAMPER = {  # PNG name -> changes to the recorded fields (None: the field removed)
    "size": {"Size": "100000x100000"}, "batch_number": {"Batch number": "1000000000"},
    "batch_pos": {"Batch pos": "5"}, "precision": {"Precision": "fp64"}, "scale_nan": {"CFG scale": "nan"},
    "eta_inf": {"Eta": "inf"}, "steps_zero": {"Steps": "0"}, "seed_huge": {"Seed": str(1 << 64)},
    "sampler": {"Sampler": "rm -rf"}, "no_model_hash": {"Model hash": None}, "ema": {"EMA": "maybe"},
}


def _tampered_pngs(f: dict) -> None:
    image = np.zeros((16, 16, 3), np.uint8)
    for name, changes in TAMPER.items():
        fields = _recorded_fields(f)
        for key, value in changes.items():
            if value is None:
                del fields[key]
            else:
                fields[key] = value
        png_info.save_png(image, str(f["tmp"] / f"{name}.png"), png_info.format_parameters(fields))
        f[f"png_{name}"] = str(f["tmp"] / f"{name}.png")
    img2img = _recorded_fields(f, "img2img")
    png_info.save_png(image, str(f["tmp"] / "img2img.png"), png_info.format_parameters(img2img))
    f["png_img2img"] = str(f["tmp"] / "img2img.png")
    whole = (f["tmp"] / "img2img.png").read_bytes()
    (f["tmp"] / "truncated.png").write_bytes(whole[: len(whole) // 2])
    f["png_truncated"] = str(f["tmp"] / "truncated.png")


def _small(f, outdir, *extra) -> list[str]:
    return ["--config", f["config"], "--ckpt", f["ckpt"], "--outdir", str(outdir), "--H", "16", "--W", "16",
            "--f", "2", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2", "--device", "cpu", *extra]


def _rerun(f, png, *extra) -> list[str]:
    return [f[png], "--config", f["config"], "--ckpt", f["ckpt"], "--outdir", str(f["tmp"] / "re"),
            "--device", "cpu", *extra]


# --------------------------------------------------------------------------------- the worker's cases
# name -> (kind, arguments from the files, expected in the one line, watched paths that must stay unopened)
READ = {
    "persistent id of shared references": ("dag_persistent_id", "unsupported persistent id (a list)"),
    "dict key of shared references": ("dag_dict_key", "take too long to hash"),
    "200,000-deep tuple as a dict key": ("deep_tuple_key", "nested more than 256 deep"),
    "100,000-deep lists": ("deep_list", "nests containers more than 256 deep"),
    "zip member inflating to 1 GiB": ("zip_bomb", "unpacks to 1073741824 bytes, more than the"),
    "2 million memo entries": ("memo_flood", "memoizes more than"),
    "10^10 element copies": ("copy_amplifier", "copies more data than its size allows"),
    "bytes(2**31 - 1)": ("sized_bytes", "calls bytes() with a size"),
    "a million nested MARKs": ("mark_flood", "nests MARKs more than 256 deep"),
    "20,000 placeholder classes": ("inert_flood", "more than 1000 classes"),
    "legacy format, shared-reference key list": ("legacy_with_hostile_keys", "is not a list of strings"),
    "safetensors header past the end": ("safetensors_past_end", "header of 10000000 bytes runs past the end"),
}
CLI = {
    "--H 100000": ("txt2img", lambda f, o: _small(f, o, "--H", "100000"), "400000 latent positions", ()),
    "--n_samples 10^9": ("txt2img", lambda f, o: _small(f, o, "--n_samples", "1000000000"), "needs at least", ()),
    "--n_iter 10^9 with a grid": ("txt2img", lambda f, o: _small(f, o, "--n_iter", "1000000000"),
                                  "for the grid's 1000000000 images", ()),
    "--ddim_steps 10^9": ("txt2img", lambda f, o: _small(f, o, "--ddim_steps", "1000000000"),
                          "--ddim_steps must be in [1, 10000]", ()),
    "--scale nan": ("txt2img", lambda f, o: _small(f, o, "--scale", "nan"), "--scale must be a finite number", ()),
    "--scale inf": ("txt2img", lambda f, o: _small(f, o, "--scale", "inf"), "--scale must be a finite number", ()),
    "--ddim_eta -inf": ("txt2img", lambda f, o: _small(f, o, "--ddim_eta=-inf"), "--ddim_eta must be a finite", ()),
    "--seed 2^64": ("txt2img", lambda f, o: _small(f, o, "--seed", "18446744073709551616"),
                    "--seed must be between", ()),
    "--from-file binary": ("txt2img", lambda f, o: _small(f, o, "--from-file", f["binary_prompts"]),
                           "is not UTF-8 text (byte 0xff at offset 6)", ()),
    "yaml model_channels 0": ("txt2img", lambda f, o: _small(f, o, "--config", f["yaml_model_channels"]),
                              "model_channels must be at least 1, got 0", ()),
    "yaml num_heads 0": ("txt2img", lambda f, o: _small(f, o, "--config", f["yaml_num_heads"]),
                         "num_heads must be at least 1, or -1, got 0", ()),
    "yaml scale_factor 0": ("txt2img", lambda f, o: _small(f, o, "--config", f["yaml_scale_factor"]),
                            "scale_factor must be non-zero", ()),
    "yaml linear_start 5.0": ("txt2img", lambda f, o: _small(f, o, "--config", f["yaml_linear_start"]),
                              "has betas outside (0, 1)", ()),
    "yaml linear_start nan": ("txt2img", lambda f, o: _small(f, o, "--config", f["yaml_linear_start_nan"]),
                              "linear_start must be a finite number", ()),
    # a checkpoint that would fail to load: the outdir's error comes first, so it was never read
    "outdir under a file": ("txt2img", lambda f, o: _small(f, f["a_file"] + "/out", "--ckpt", f["dag_persistent_id"]),
                            "cannot be created", ()),
    "--vae a PNG": ("txt2img", lambda f, o: _small(f, o, "--vae", f["init"]),
                    "not a torch zip, safetensors or pickle file (it starts with b'\\x89PNG", ()),
    "init image decompression bomb": ("img2img", lambda f, o: _small(f, o, "--init-img", f["png_bomb"]),
                                      "is too large to decode", ()),
    "init image of float samples": ("img2img", lambda f, o: _small(f, o, "--init-img", f["float_image"]),
                                    "floating-point samples", ()),
    "--strength nan": ("img2img", lambda f, o: _small(f, o, "--init-img", f["init"], "--strength", "nan"),
                       "--strength must be a finite number", ()),
    "rerun Size 100000x100000": ("rerun", lambda f, o: _rerun(f, "png_size"), "latent positions", ()),
    "rerun Batch number 10^9": ("rerun", lambda f, o: _rerun(f, "png_batch_number"),
                                "'Batch number' must be in [0, 10000)", ()),
    "rerun Batch pos outside the batch": ("rerun", lambda f, o: _rerun(f, "png_batch_pos"),
                                          "'Batch pos' 5 is not a position in a batch of 2", ()),
    "rerun Precision fp64": ("rerun", lambda f, o: _rerun(f, "png_precision"), "'Precision' is 'fp64'; valid", ()),
    "rerun CFG scale nan": ("rerun", lambda f, o: _rerun(f, "png_scale_nan"), "'CFG scale' must be a finite", ()),
    "rerun Eta inf": ("rerun", lambda f, o: _rerun(f, "png_eta_inf"), "'Eta' must be a finite number", ()),
    "rerun Steps 0": ("rerun", lambda f, o: _rerun(f, "png_steps_zero"), "'Steps' must be in [1, 10000]", ()),
    "rerun Seed 2^64": ("rerun", lambda f, o: _rerun(f, "png_seed_huge"), "'Seed' must be between", ()),
    "rerun Sampler 'rm -rf'": ("rerun", lambda f, o: _rerun(f, "png_sampler"), "'Sampler' is 'rm -rf'; valid", ()),
    "rerun EMA maybe": ("rerun", lambda f, o: _rerun(f, "png_ema"), "unreadable parameter 'EMA'", ()),
    "rerun without a Model hash": ("rerun", lambda f, o: _rerun(f, "png_no_model_hash"), "records no Model hash", ()),
    "rerun truncated PNG": ("rerun", lambda f, o: _rerun(f, "png_truncated"), "cannot read parameters from", ()),
    # the PNG records a path: it is never opened, whether the user names no init image or another one
    "rerun img2img, recorded init image": ("rerun", lambda f, o: _rerun(f, "png_img2img"),
                                           "name that file with --init-img", ("init",)),
    "rerun img2img, another init image": ("rerun", lambda f, o: _rerun(f, "png_img2img", "--init-img",
                                                                       f["other_init"]),
                                          "Init image hash", ("init",)),
}
CASES = [*READ, *CLI]


@pytest.fixture(scope="module")
def worker(files, tmp_path_factory) -> dict:
    """Run every case of READ and CLI in one worker process; {name: result} (tests/hostile.py)."""
    out = tmp_path_factory.mktemp("outputs")
    cases = [{"name": name, "kind": "read", "path": files[key]} for name, (key, _) in READ.items()]
    for name, (kind, argv, _, watch) in CLI.items():
        cases.append({"name": name, "kind": kind, "argv": argv(files, out / "x"),
                      "watch": [files[key] for key in watch]})
    (out / "cases.json").write_text(json.dumps(cases))
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "hostile.py"), str(out / "cases.json")],
                              capture_output=True, text=True, env=_env(), preexec_fn=_limits, timeout=300)
        stdout, returncode, stderr = proc.stdout, proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:  # a hang: report the cases before it
        stdout, returncode, stderr = (e.stdout or b"").decode(), "timeout", ""
    results, started = {}, None
    for line in stdout.splitlines():
        record_ = json.loads(line)
        if "started" in record_:
            started = record_["started"]
        else:
            results[record_["name"]] = record_
    results["_died"] = None if returncode == 0 else f"worker exit {returncode} during {started!r}: {stderr[-1000:]}"
    results["_outdir"] = out / "x"
    return results


@pytest.mark.parametrize("name", CASES)
def test_refused_in_one_line_quickly_in_bounded_memory(name, worker):
    result = worker.get(name)
    assert result is not None, worker["_died"]
    expected = READ[name][1] if name in READ else CLI[name][2]
    lines = _one_line(result["stderr"])
    assert result["error"] is None, result["error"]
    assert result["code"] == 1, (result["code"], result["stderr"])
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result["stderr"], lines
    assert result["seconds"] < CASE_SECONDS, result["seconds"]
    assert result["maxrss"] < WORKER_RSS, result["maxrss"]
    assert result["opened"] == [], f"opened a path recorded in the PNG: {result['opened']}"
    assert not worker["_outdir"].exists()  # nothing written


# ------------------------------------------------------------------------------ the scripts, as processes
@pytest.mark.parametrize("script, argv, message", [
    ("txt2img.py", lambda f: _small(f, f["tmp"] / "s1", "--H", "100000", "--W", "100000"), "latent positions"),
    ("txt2img.py", lambda f: _small(f, f["tmp"] / "s2", "--ckpt", f["deep_tuple_key"]), "nested more than 256"),
    ("rerun.py", lambda f: _rerun(f, "png_size"), "latent positions"),
], ids=["absurd size", "deep-tuple checkpoint (was a segfault)", "rerun of a tampered size"])
def test_scripts_exit_1_not_a_signal(script, argv, message, files):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *argv(files)], capture_output=True,
                          text=True, env=_env(), preexec_fn=_limits, timeout=300)
    lines = _one_line(proc.stderr)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # a signal would be negative
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and message in lines[0], lines
    assert time.perf_counter() - start < 120


def test_sigint_ends_with_one_line_and_exit_130(files):
    out = files["tmp"] / "interrupted"
    argv = _small(files, out, "--n_iter", "40", "--ddim_steps", "5", "--skip_grid")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "txt2img.py"), *argv], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=_env(), preexec_fn=_limits)
    deadline = time.monotonic() + 240
    while not (out / "samples").is_dir() or len(os.listdir(out / "samples")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    written = sorted(os.listdir(out / "samples"))
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    assert _one_line(stderr) == [f"txt2img.py: interrupted after {len(written)} of 40 images; the written ones "
                                 "are complete"], stderr[-2000:]
    assert all(name.endswith(".png") and not name.startswith(".") for name in written)  # no temporary files
    for name in written:
        with Image.open(out / "samples" / name) as image:
            image.load()  # complete


# ------------------------------------------------------------------------------------------ in-process
def _save_many(directory: str, marker: int, count: int) -> None:
    for i in range(count):
        png_info.save_numbered(np.full((2, 2, 3), marker, np.uint8), directory, run.SAMPLE_NAME,
                               run.SAMPLE_TEMPLATE, f"x\nWriter: {marker}, Index: {i}")


def test_concurrent_runs_never_overwrite_each_other(tmp_path):
    # 6 processes x 40 saves into one folder: every image keeps its own file (before: 54 files of 240)
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_save_many, args=(str(tmp_path), marker, 40)) for marker in range(6)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    names = sorted(os.listdir(tmp_path))
    assert names == [f"{i:05}.png" for i in range(240)]
    seen = {png_info.read_parameters(str(tmp_path / name)) for name in names}
    assert seen == {f"x\nWriter: {m}, Index: {i}" for m in range(6) for i in range(40)}


def test_a_number_taken_meanwhile_is_skipped_not_overwritten(tmp_path, monkeypatch):
    png_info.save_png(np.zeros((2, 2, 3), np.uint8), str(tmp_path / "00000.png"), "first")
    monkeypatch.setattr(png_info, "next_index", lambda directory, pattern: 0)  # as if listed before it appeared
    path = png_info.save_numbered(np.ones((2, 2, 3), np.uint8), str(tmp_path), run.SAMPLE_NAME, run.SAMPLE_TEMPLATE,
                                  "second")
    assert Path(path).name == "00001.png" and png_info.read_parameters(str(tmp_path / "00000.png")) == "first"
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00001.png"]


def test_16_bit_init_image_is_scaled_not_clipped(tmp_path):
    array = hostile.grey16(tmp_path / "grey16.png")  # a ramp over 0..65535
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I")  # 16-bit: convert("RGB") would clip every value above 255 to white
    loaded = inputs.load_init_image(str(tmp_path / "grey16.png"))
    assert loaded.shape == (1, 3, 32, 32)
    assert loaded.min() < -0.95 and loaded.max() > 0.95 and abs(loaded.mean().item()) < 0.05
    # the same picture at 8 bits (v * 257 = the 8-bit value v at 16 bits) reads the same through the original's
    # 8-bit path, up to the 8-bit rounding of its LANCZOS resize (half a level, plus the clamp of ringing)
    eight = (array // 257).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "grey8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "grey16b.png")
    reference = inputs.load_init_image(str(tmp_path / "grey8.png"))
    wide = inputs.load_init_image(str(tmp_path / "grey16b.png"))
    assert torch.allclose(wide, reference, atol=2 * 2 / 255, rtol=0)


@pytest.mark.parametrize("mode, values, message", [
    ("I", [0, 70000], "32-bit integer samples (0..70000)"), ("F", [0.0, 2.0], "floating-point samples"),
])
def test_init_images_of_unknown_range_are_refused(tmp_path, mode, values, message):
    path = tmp_path / "image.tif"
    Image.fromarray(np.array([values * 16] * 32, dtype=np.int32 if mode == "I" else np.float32)).save(path)
    with pytest.raises(cli.CLIError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inputs.load_init_image(str(path))


def test_blank_prompt_lines_are_skipped_with_a_warning(files, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\n   \ntwo\n")
    cli.txt2img_main(_small(files, tmp_path / "out", "--from-file", str(prompts), "--n_samples", "2",
                            "--skip_grid"))
    err = _one_line(capsys.readouterr().err)
    assert err == [f"warning: prompt file {prompts}: skipped 2 blank lines (line 2, 3)"], err
    written = sorted((tmp_path / "out" / "samples").iterdir())
    assert [png_info.parse_parameters(png_info.read_parameters(str(p)))["Prompt"] for p in written] == ["one", "two"]


def test_long_prompt_warning_is_one_bounded_line(files, capsys):
    model = build_model(load_config(files["config"]))
    inputs.warn_long_prompts(model, ["a very long prompt " * 300])
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and len(err) < 300 and "more characters" in err, err


def test_unwritable_outdir_is_found_before_the_model_loads(files, tmp_path, monkeypatch, capsys):
    # root may write anywhere, so the refusal of the probe file is simulated
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(inputs.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(run, "load", lambda opts: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cli.txt2img_main(_small(files, tmp_path / "out"))
    assert exit_info.value.code == 1
    assert _one_line(capsys.readouterr().err) == [
        f"txt2img.py: error: --outdir {tmp_path / 'out'} is not writable ({tmp_path}: Permission denied)"]


def test_memory_estimate_names_the_largest_allocation(files):
    opts = cli.build_parser("txt2img").parse_args(_small(files, "unused", "--H", "4096", "--W", "4096"))
    opts.device = torch.device("cpu")
    cfg = load_config(files["config"])
    needs = dict(limits.memory_needs(opts, cfg, n_images=1))
    # tiny VAE: 32 channels at full resolution, input and output of a convolution, float32
    assert needs["the VAE decode (1 x 32 x 4096 x 4096, twice)"] == 2 * 32 * 4096 * 4096 * 4
    limits.check_memory(opts, cfg, 1, available=5 << 30)  # 4 GiB fits
    with pytest.raises(cli.CLIError, match=r"needs at least 4.0 GiB for the VAE decode .* more than the 3.0 GiB"):
        limits.check_memory(opts, cfg, 1, available=3 << 30)
    opts.vae_tile = 64  # tiles of 64 latents = 128 px: the decode's activation is one tile's
    limits.check_memory(opts, cfg, 1, available=3 << 30)


# ------------------------------------------------------------------------------------ the library's calls
@pytest.fixture(scope="module")
def model(files):
    return build_model(load_config(files["config"]))


@pytest.fixture(scope="module")
def inpainting_model():
    return build_model(load_config(tiny_config_path("tiny-v1-inpainting")))


def _calls(m, inpainting=None):
    from ldm import pipeline
    from ldm.denoisers import Denoiser

    x, t, ctx = torch.zeros(1, 4, 8, 8), torch.tensor([5]), torch.zeros(1, 77, 32)
    nan = float("nan")
    return {
        "context of another batch": (lambda: m.unet(x, t, torch.zeros(3, 77, 32)),
                                     "context batch 3 does not match x batch 1"),
        "2-D context": (lambda: m.unet(x, t, torch.zeros(77, 32)), "context must be (B, tokens, width), got (77, 32)"),
        "context of another width": (lambda: m.unet(x, t, torch.zeros(1, 77, 16)), "context width 16 does not match"),
        "timesteps of another batch": (lambda: m.unet(x, torch.tensor([1, 2]), ctx), "timesteps must be a scalar or"),
        "odd spatial size": (lambda: m.unet(torch.zeros(1, 4, 7, 7), t, ctx), "x height and width must be multiples"),
        "c_concat of another batch": (lambda: inpainting.apply_model(x, t, {"c_concat": [torch.zeros(2, 5, 8, 8)],
                                                                            "c_crossattn": [ctx]}),
                                      "c_concat must be (B, channels, H, W) like x"),
        "prompt not a string": (lambda: m.encode_text([3]), "prompts[0] is of type int"),
        "VAE encode of 4 channels": (lambda: m.vae.encode(torch.zeros(1, 4, 16, 16)), "x must be (B, 3, H, W) images"),
        "VAE decode of 3 channels": (lambda: m.decode_first_stage(torch.zeros(1, 3, 8, 8)), "z must be (B, 4, h, w)"),
        "sigma of another batch": (lambda: Denoiser(m.apply_model, m.alphas_cumprod)(x, torch.ones(2), ctx),
                                   "sigma must be a scalar or of shape (1,)"),
        "txt2img scale nan": (lambda: pipeline.txt2img(m, "a", H=16, W=16, f=2, steps=2, seed=0, scale=nan),
                              "scale must be a finite number"),
        "img2img of a 4-channel image": (lambda: pipeline.img2img(m, torch.zeros(1, 4, 16, 16), "a", steps=2, seed=0),
                                         "init_image must be (1 or B, 3, H, W)"),
        "sample of a 3-channel shape": (lambda: pipeline.sample(m, ["a"], shape=(1, 3, 8, 8), steps=2,
                                                                generator=torch.Generator()),
                                        "shape must be (B, 4, h, w)"),
    }


@pytest.mark.parametrize("case", list(_calls(None)))
def test_library_calls_name_the_wrong_argument(case, model, inpainting_model):
    call, message = _calls(model, inpainting_model)[case]
    with pytest.raises((ValueError, TypeError)) as info, torch.no_grad():
        call()
    assert message in str(info.value), str(info.value)


def test_a_zip_directory_is_bounded_before_it_is_parsed(tmp_path):
    # zipfile reads as many directory bytes as the end record claims, whatever the record count says
    from ldm.checkpoint import CheckpointError, read_checkpoint

    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 100 << 20, 0, 0)
    (tmp_path / "directory.ckpt").write_bytes(b"PK\x03\x04" + bytes(26) + end)
    with pytest.raises(CheckpointError, match="a zip of 1 records in a 104857600-byte directory"):
        read_checkpoint(tmp_path / "directory.ckpt")


def test_a_real_checkpoint_layout_is_within_every_bound(tmp_path):
    # sd-v1 keys (the vendored manifest) with Lightning's extras and an AdamW state for the UNet: the bounds
    # leave such a file untouched
    from manifests import load_manifest

    from ldm.checkpoint import read_checkpoint

    keys = load_manifest("v1-inference")
    state = {key: torch.zeros((1,) * len(shape)) for key, shape in keys.items()}
    unet = [key for key in keys if key.startswith("model.diffusion_model.")]
    optimizer = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)}
                           for i in range(len(unet))},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": list(range(len(unet)))}]}
    torch.save({"state_dict": state, "optimizer_states": [optimizer], "epoch": 3, "global_step": 1000,
                "hparams": {"lr": 1e-4, "sizes": ((1, 2), frozenset({3}))}}, tmp_path / "real.ckpt")
    obj = read_checkpoint(tmp_path / "real.ckpt")
    assert set(obj["state_dict"]) == set(keys) and len(obj["optimizer_states"][0]["state"]) == len(unet)
    assert obj["hparams"]["sizes"] == ((1, 2), frozenset({3}))


def test_every_script_reads_16_bit_images_by_their_range(tmp_path):
    """Masks, inpainting and SDXL init images and ControlNet hints go through ldm/cli/images.py as img2img's init
    image does: a 16-bit greyscale file is scaled by its real range, never clipped to white; 8-bit files are read
    exactly as the originals read them; samples of unknown range are refused in one line."""
    from ldm.cli import images
    from ldm.cli.flags import CLIError

    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    wide = tmp_path / "wide.png"
    Image.fromarray(ramp).save(wide)  # PIL stores it as a 16-bit greyscale PNG
    grey = images.read_uint8(str(wide), "mask", "L")
    assert grey.dtype == np.uint8 and grey.shape == (48, 64)
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) > 200  # a ramp, not a white image
    np.testing.assert_array_equal(grey, np.rint(ramp / 65535 * 255).astype(np.uint8))
    rgb = images.read_uint8(str(wide), "init image", "RGB")
    assert rgb.shape == (48, 64, 3) and np.array_equal(rgb[..., 0], grey) and np.array_equal(rgb[..., 2], grey)
    eight = tmp_path / "eight.png"
    colours = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(colours).save(eight)
    assert np.array_equal(images.read_uint8(str(eight), "init image"), colours)
    floats = tmp_path / "float.tiff"
    Image.fromarray(np.ones((4, 4), np.float32), mode="F").save(floats)
    with pytest.raises(CLIError, match="floating-point samples"):
        images.read_uint8(str(floats), "control image")
