"""The sampler-study harness (ldm/study.py, scripts/study_samplers.py).

- On the Gaussian data model (exact denoiser, tests/make_fixtures_samplers.py) the harness measures the
  samplers' known orders of convergence, and heun's COUNTED nfe is 2n - 1 (its last step, to sigma 0, is Euler).
- The script on the demo model writes the files of the issue, and its numbers are recomputed here from the
  definitions: x_T from txt2img's generator, the latents of ldm.pipeline.sample, psnr of the decoded uint8
  images, the order as the least-squares slope.
"""

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm import pipeline, schedules, study
from ldm.denoisers import CFGDenoiser, Denoiser
from make_fixtures_samplers import gaussian_denoiser

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


ALPHAS_CUMPROD = schedules.alphas_cumprod_from_betas(
    schedules.make_beta_schedule(1000, linear_start=0.00085, linear_end=0.012)).float()


class GaussianDenoiser:
    """The exact VE denoiser of x0 ~ N(MU, S^2) over SD's discrete sigmas (what samplers.sample needs)."""

    sigmas = schedules.discrete_sigmas(ALPHAS_CUMPROD)

    def replace(self, **changes):
        return self

    def __call__(self, x, sigma, **extra):
        return gaussian_denoiser(x, sigma.reshape(-1, *[1] * (x.ndim - 1)))


def test_orders_on_the_gaussian_model():
    runs = study.methods(["euler", "heun", "dpmpp_2m", "euler_a"], ["karras"], [8, 16, 32, 64])
    results = study.measure(lambda prompt: GaussianDenoiser(), ["-"], [0, 1], (1, 4, 8, 8), runs,
                            ("heun", 400, "karras"), progress=False)
    curves = {c["sampler"]: c for c in study.curves(results)}
    print(study.table(results))
    # measured 1.01, 2.10, 2.14 (float32 latents; the reference floor, 1.3e-5, is 50x below the finest error)
    assert abs(curves["euler"]["order"] - 1) < 0.2
    assert abs(curves["heun"]["order"] - 2) < 0.3
    assert abs(curves["dpmpp_2m"]["order"] - 2) < 0.3
    assert curves["heun"]["nfe"] == [2 * n - 1 for n in (8, 16, 32, 64)]
    assert curves["euler"]["nfe"] == curves["dpmpp_2m"]["nfe"] == [8, 16, 32, 64]
    assert results["reference"]["nfe"] == 799 and results["reference"]["pairs"][0]["floor_nfe"] == 1599
    assert results["reference"]["floor_latent_rmse"] < 0.1 * min(curves["heun"]["rmse"])
    # euler_a is marked and does not converge: its error stays at the size of the data's spread
    assert curves["euler_a"]["stochastic"] and not curves["heun"]["stochastic"]
    assert min(curves["euler_a"]["rmse"]) > 0.3
    assert all(row["stochastic"] == (row["sampler"] == "euler_a") for row in results["runs"])


def test_a_batched_guidance_call_counts_once():
    model_calls = []

    def model_fn(x, t, cond):
        model_calls.append(x.shape[0])
        return torch.zeros_like(x)

    cond, uncond = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    denoiser = CFGDenoiser(Denoiser(model_fn, ALPHAS_CUMPROD), 3.0,
                           cond=cond, uncond=uncond)
    counted = study.CountingDenoiser(denoiser)
    x_T, generator = study.start(0, (1, 4, 8, 8), "cpu")
    from ldm import samplers

    samplers.sample(counted, x_T, sampler="dpm_solver", steps=5, disable=True)  # replace()s the denoiser
    assert counted.calls == len(model_calls) == 5 and set(model_calls) == {2}


def test_empirical_order_is_the_least_squares_slope_of_the_three_finest():
    nfe = [4, 8, 16, 32]
    errors = [5.0, 2.0**-2, 2.0**-4, 2.0**-6]  # the coarsest point (off the line) is ignored
    assert study.empirical_order(nfe, errors) == pytest.approx(2.0)
    assert study.empirical_order(nfe, [1.0, 0.5, 0.25, 0.1]) == pytest.approx(
        -np.polyfit(np.log([8, 16, 32]), np.log([0.5, 0.25, 0.1]), 1)[0])
    assert math.isnan(study.empirical_order([4, 8], [1.0, 0.5]))


def _script():
    spec = importlib.util.spec_from_file_location("study_samplers", ROOT / "scripts" / "study_samplers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_on_the_demo_model(tmp_path, capsys):
    import ldm
    from ldm.demo import DEMO_CKPT, DEMO_CONFIG, evaluate

    out = tmp_path / "study"
    prompt = "a red circle on a blue background, top left"
    _script().main(["--out", str(out), "--seeds", "3", "--samplers", "euler,euler_a", "--steps", "1,2,3",
                    "--reference", "heun:3", "--device", "cpu", "--quiet"])
    printed = capsys.readouterr().out
    assert "| euler | karras |" in printed and "stochastic" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"reference", "runs"}
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(results["runs"]) == 6
    assert (out / "summary.md").exists()

    # recompute every number from the definitions, through the txt2img pipeline
    model = ldm.load_model(str(DEMO_CONFIG), str(DEMO_CKPT))

    def txt2img_latent(sampler, steps):  # txt2img --prompt P --seed 3 --n_samples 1 --scale 3
        generator = torch.Generator().manual_seed(3)
        return pipeline.sample(model, [prompt], sampler=sampler, steps=steps, schedule="karras", scale=3.0,
                               shape=(1, 4, 16, 16), generator=generator, disable=True)

    def image(z):
        return pipeline.to_uint8(pipeline.to_unit(pipeline.decode(model, z)))[0].astype(np.float64)

    z_ref = txt2img_latent("heun", 3)
    z_fine = txt2img_latent("heun", 6)
    ref = results["reference"]
    assert (ref["sampler"], ref["steps"], ref["schedule"]) == ("heun", 3, "karras")
    assert (ref["nfe"], ref["floor_steps"]) == (5, 6)
    assert ref["floor_latent_rmse"] == pytest.approx(float((z_ref - z_fine).double().pow(2).mean().sqrt()), rel=1e-6)
    for row in results["runs"]:
        z = txt2img_latent(row["sampler"], row["steps"])
        assert row["nfe"] == row["steps"]  # euler and euler_a: one call per step
        assert row["latent_rmse"] == pytest.approx(float((z - z_ref).double().pow(2).mean().sqrt()), rel=1e-6)
        mse = ((image(z) - image(z_ref)) ** 2).mean()
        assert row["psnr"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-9)
        expected = all(evaluate.evaluate_image(pipeline.to_uint8(pipeline.to_unit(pipeline.decode(model, z)))[0],
                                               prompt).values())
        assert row["adherence"] == int(expected)
        assert row["stochastic"] == (row["sampler"] == "euler_a")
        assert (row["prompt"], row["seed"]) == (prompt, 3)


def test_script_refuses_bad_input(tmp_path, capsys):
    script = _script()
    for argv, message in ((["--samplers", "ddim", "--schedule", "karras"], "takes none of the schedules"),
                          (["--reference", "euler_a:10"], "must be deterministic"),
                          (["--reference", "heun"], "SAMPLER:STEPS"),
                          (["--steps", "4,x"], "comma list of integers")):
        with pytest.raises(SystemExit) as e:
            script.main(["--out", str(tmp_path / "x"), *argv])
        assert e.value.code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
