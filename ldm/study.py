"""Sampler convergence studies: each run's error against a converged reference solution, as a function of the
number of denoiser evaluations (NFE). scripts/study_samplers.py is the command line; tests/test_study.py runs
the same harness on the Gaussian data model, whose denoiser is exact.

Definitions (what results.json holds; each run is one (prompt, seed) pair, one image):
  start        x_T = randn([1, C, H/f, W/f]) from a CPU generator seeded with the seed, exactly what txt2img
               draws for --prompt P --seed S --n_samples 1; every run and the reference start from it, each
               with its sampler's own start (k-family: x_T * sigmas[0]), and a stochastic sampler then draws
               its step noise from the same generator, as txt2img does.
  nfe          denoiser calls per sample, COUNTED by wrapping the denoiser the sampler receives
               (`CountingDenoiser`; a batched classifier-free-guidance call is one call).
  latent_rmse  sqrt(mean((z - z_ref)^2)) over every element of the final latent z, the latent the sampler
               returns and the original decodes (before the division by scale_factor), against the
               reference's, in float64.
  psnr         10 log10(255^2 / mean((a - b)^2)) of the decoded uint8 images (H, W, 3) a and b, the run's
               and the reference's (inf when they are equal).
  seconds      wall time of the sampling call (the decode is not counted).
  adherence    1 when ldm/demo/evaluate.py finds every attribute of the prompt in the image, else 0 (demo
               model only).
  order        the empirical order of convergence of a sampler and schedule: minus the least-squares slope
               of log(mean latent_rmse over prompts and seeds) against log(nfe) over its three finest step
               counts.
  floor        the reference's own error: the reference against the same sampler at twice its steps.
Stochastic samplers (SamplerSpec.is_stochastic) are run too and marked: they do not converge to the solution
of the probability-flow ODE that the reference approximates.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm import samplers
from ldm.noise import randn

# a run's row (then "adherence" on the demo model, and "stochastic")
FIELDS = ("sampler", "schedule", "steps", "nfe", "prompt", "seed", "latent_rmse", "psnr", "seconds")


class CountingDenoiser:
    """A denoiser that counts its calls. `replace` (the registry's timing options) keeps the count shared,
    so every call the sampler makes is counted, whichever copy it makes."""

    def __init__(self, denoiser, counter: list[int] | None = None):
        self.denoiser = denoiser
        self.counter = [0] if counter is None else counter

    @property
    def calls(self) -> int:
        return self.counter[0]

    @property
    def sigmas(self) -> torch.Tensor:
        return self.denoiser.sigmas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.denoiser.alphas_cumprod

    def replace(self, **changes) -> CountingDenoiser:
        return CountingDenoiser(self.denoiser.replace(**changes), self.counter)

    def __call__(self, *args, **kwargs):
        self.counter[0] += 1
        return self.denoiser(*args, **kwargs)


@dataclass(frozen=True)
class Method:
    """One sampler on one schedule; `steps` is the list of step counts it runs."""

    sampler: str
    schedule: str
    steps: tuple[int, ...]

    @property
    def stochastic(self) -> bool:
        return samplers.get(self.sampler).is_stochastic()


def parse_reference(text: str, default_schedule: str) -> tuple[str, int, str]:
    """SAMPLER:STEPS[:SCHEDULE] -> (sampler, steps, schedule), checked against the registry."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ValueError(f"reference must be SAMPLER:STEPS[:SCHEDULE], got {text!r}")
    sampler, steps, schedule = parts[0], int(parts[1]), parts[2] if len(parts) == 3 else default_schedule
    spec = samplers.get(sampler)
    if spec.is_stochastic():
        raise ValueError(f"the reference must be deterministic; {sampler} draws noise")
    if schedule not in spec.valid_schedules:
        raise ValueError(f"schedule {schedule!r} does not apply to {sampler}; valid: {', '.join(spec.valid_schedules)}")
    return sampler, steps, schedule


def methods(sampler_names: Sequence[str], schedules: Sequence[str], steps: Sequence[int]) -> list[Method]:
    """Every sampler with each of `schedules` that applies to it; a sampler with none is an error."""
    out = []
    for name in sampler_names:
        valid = [s for s in schedules if s in samplers.get(name).valid_schedules]
        if not valid:
            raise ValueError(f"sampler {name} takes none of the schedules {', '.join(schedules)} "
                             f"(valid: {', '.join(samplers.get(name).valid_schedules)})")
        out.extend(Method(name, schedule, tuple(steps)) for schedule in valid)
    return out


def latent_rmse(z: torch.Tensor, z_ref: torch.Tensor) -> float:
    return math.sqrt(float(((z.double() - z_ref.double()) ** 2).mean()))


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two uint8 images, peak 255."""
    mse = float(((image.astype(np.float64) - reference.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def start(seed: int, shape: Sequence[int], device) -> tuple[torch.Tensor, torch.Generator]:
    """(x_T, the generator after drawing it): txt2img's first draw for --seed seed --n_samples 1."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return randn(shape, generator, device), generator


def run_one(denoiser, seed: int, shape: Sequence[int], device, sampler: str, steps: int,
            schedule: str) -> tuple[torch.Tensor, int, float]:
    """(final latent, counted nfe, seconds) of one run from txt2img's start for `seed`."""
    x_T, generator = start(seed, shape, device)
    counted = CountingDenoiser(denoiser)
    begin = time.perf_counter()
    z = samplers.sample(counted, x_T, sampler=sampler, steps=steps, schedule=schedule, generator=generator,
                        disable=True)
    return z, counted.calls, time.perf_counter() - begin


def measure(denoiser_for: Callable[[str], object], prompts: Sequence[str], seeds: Sequence[int],
            shape: Sequence[int], runs: Sequence[Method], reference: tuple[str, int, str], *,
            decode: Callable[[torch.Tensor], np.ndarray] | None = None,
            adherence: Callable[[np.ndarray, str], int] | None = None, device="cpu",
            progress: bool = True) -> dict:
    """{"reference": {...}, "runs": [...]} for every run x (prompt, seed) pair (see the module docstring).

    denoiser_for(prompt): the (guided) denoiser of a prompt; shape: one sample's latent (1, C, h, w);
    decode(z) -> (H, W, 3) uint8 image (None: no psnr, no adherence); adherence(image, prompt) -> 0 or 1.
    """
    from tqdm.auto import tqdm

    ref_sampler, ref_steps, ref_schedule = reference
    total = len(prompts) * len(seeds) * (2 + sum(len(m.steps) for m in runs))
    bar = tqdm(total=total, desc="runs", disable=not progress)
    rows, pairs = [], []
    for prompt in prompts:
        denoiser = denoiser_for(prompt)
        for seed in seeds:
            def one(sampler, steps, schedule):
                bar.set_postfix_str(f"{sampler}:{steps}:{schedule} seed {seed}")
                z, nfe, seconds = run_one(denoiser, seed, shape, device, sampler, steps, schedule)
                bar.update(1)
                return z, (decode(z) if decode is not None else None), nfe, seconds

            z_ref, image_ref, ref_nfe, ref_seconds = one(ref_sampler, ref_steps, ref_schedule)
            z_fine, image_fine, fine_nfe, _ = one(ref_sampler, 2 * ref_steps, ref_schedule)
            pair = {"prompt": prompt, "seed": seed, "nfe": ref_nfe, "seconds": ref_seconds,
                    "floor_nfe": fine_nfe, "floor_latent_rmse": latent_rmse(z_ref, z_fine)}
            if decode is not None:
                pair["floor_psnr"] = psnr(image_ref, image_fine)
                if adherence is not None:
                    pair["adherence"] = adherence(image_ref, prompt)
            pairs.append(pair)
            for method in runs:
                for steps in method.steps:
                    z, image, nfe, seconds = one(method.sampler, steps, method.schedule)
                    row = {"sampler": method.sampler, "schedule": method.schedule, "steps": steps, "nfe": nfe,
                           "prompt": prompt, "seed": seed, "latent_rmse": latent_rmse(z, z_ref),
                           "psnr": psnr(image, image_ref) if decode is not None else None,
                           "seconds": seconds}
                    if adherence is not None and decode is not None:
                        row["adherence"] = adherence(image, prompt)
                    row["stochastic"] = method.stochastic
                    rows.append(row)
    bar.close()
    floor = [p["floor_latent_rmse"] for p in pairs]
    ref = {"sampler": ref_sampler, "schedule": ref_schedule, "steps": ref_steps, "nfe": pairs[0]["nfe"],
           "floor_steps": 2 * ref_steps, "floor_latent_rmse": float(np.mean(floor))}
    if decode is not None:
        ref["floor_psnr"] = float(np.mean([p["floor_psnr"] for p in pairs]))
    ref["pairs"] = pairs
    return {"reference": ref, "runs": rows}


def curves(results: dict) -> list[dict]:
    """Per sampler and schedule (in run order): step counts, nfe, and the mean / min / max of latent_rmse
    and the mean psnr over prompts and seeds at each step count, plus the empirical order."""
    groups: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for row in results["runs"]:
        groups.setdefault((row["sampler"], row["schedule"]), {}).setdefault(row["steps"], []).append(row)
    out = []
    for (sampler, schedule), by_steps in groups.items():
        steps = sorted(by_steps)
        rmse = [[r["latent_rmse"] for r in by_steps[n]] for n in steps]
        nfe = [by_steps[n][0]["nfe"] for n in steps]
        psnrs = [[r["psnr"] for r in by_steps[n] if r["psnr"] is not None] for n in steps]
        curve = {"sampler": sampler, "schedule": schedule, "steps": steps, "nfe": nfe,
                 "rmse": [float(np.mean(v)) for v in rmse], "rmse_min": [min(v) for v in rmse],
                 "rmse_max": [max(v) for v in rmse],
                 "psnr": [float(np.mean(v)) if v else None for v in psnrs],
                 "stochastic": by_steps[steps[0]][0]["stochastic"]}
        if "adherence" in by_steps[steps[0]][0]:
            curve["adherence"] = [float(np.mean([r["adherence"] for r in by_steps[n]])) for n in steps]
        curve["order"] = empirical_order(nfe, curve["rmse"])
        curve["local_orders"] = [local_order(a, b, ea, eb) for a, b, ea, eb in
                                 zip(nfe, nfe[1:], curve["rmse"], curve["rmse"][1:])]
        out.append(curve)
    return out


def empirical_order(nfe: Sequence[float], errors: Sequence[float]) -> float:
    """Minus the least-squares slope of log(error) against log(nfe) over the three largest nfe (NaN with
    fewer than three points or a zero error)."""
    points = sorted(zip(nfe, errors))[-3:]
    if len(points) < 3 or any(e <= 0 for _, e in points):
        return math.nan
    x = np.log([n for n, _ in points])
    y = np.log([e for _, e in points])
    return float(-np.polyfit(x, y, 1)[0])


def local_order(nfe_a, nfe_b, error_a, error_b) -> float:
    """The order between two neighbouring step counts: -log(error_b / error_a) / log(nfe_b / nfe_a)."""
    if error_a <= 0 or error_b <= 0:
        return math.nan
    return -math.log(error_b / error_a) / math.log(nfe_b / nfe_a)


def _psnr_text(value) -> str:
    return "" if value is None else ("inf" if math.isinf(value) else f"{value:.1f}")


def table(results: dict) -> str:
    """The summary as a Markdown table: per sampler and schedule, mean latent_rmse (and psnr in dB) at each
    step count with its nfe, the empirical order over the three finest step counts, the local orders between
    neighbouring step counts, and the reference floor."""
    ref = results["reference"]
    lines = ["| sampler | schedule | steps (nfe): latent_rmse / psnr dB | order | between neighbours | |",
             "|---|---|---|---:|---|---|"]
    for c in curves(results):
        cells = "; ".join(f"{n} ({nfe}): {e:.2e}" + ("" if p is None else f" / {_psnr_text(p)}")
                          for n, nfe, e, p in zip(c["steps"], c["nfe"], c["rmse"], c["psnr"]))
        note = "stochastic: does not converge to the ODE solution" if c["stochastic"] else ""
        order = "n/a" if math.isnan(c["order"]) else f"{c['order']:.2f}"
        local = ", ".join("n/a" if math.isnan(o) else f"{o:.2f}" for o in c["local_orders"])
        lines.append(f"| {c['sampler']} | {c['schedule']} | {cells} | {order} | {local} | {note} |")
    floor = f"{ref['floor_latent_rmse']:.2e}"
    if "floor_psnr" in ref:
        floor += f" / {_psnr_text(ref['floor_psnr'])} dB"
    lines.append("")
    lines.append(f"reference {ref['sampler']}:{ref['steps']}:{ref['schedule']} ({ref['nfe']} nfe); its floor "
                 f"against {ref['floor_steps']} steps: latent_rmse / psnr {floor}")
    return "\n".join(lines)


def write(results: dict, out: Path) -> list[str]:
    """DIR/results.json, DIR/results.csv (the runs' rows) and DIR/error_vs_nfe.png; returns messages (the
    plot is skipped, with a message, when matplotlib is missing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    columns = list(dict.fromkeys([*FIELDS, *(key for row in results["runs"] for key in row)]))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(results["runs"])
    (out / "summary.md").write_text(table(results) + "\n")
    try:
        plot(results, out / "error_vs_nfe.png")
    except ImportError:
        (out / "error_vs_nfe.png").unlink(missing_ok=True)  # never leave another run's plot beside these results
        return ["matplotlib is not installed: error_vs_nfe.png skipped (pip install -e '.[study]')"]
    return []


def plot(results: dict, path: Path) -> None:
    """log-log latent_rmse against nfe, one line per sampler and schedule (mean over prompts and seeds, the
    band their min..max), stochastic samplers dashed, the reference floor as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = results["reference"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    for c in curves(results):
        label = f"{c['sampler']} ({c['schedule']})"
        if c["stochastic"]:
            label += ", stochastic"
        elif not math.isnan(c["order"]):
            label += f", order {c['order']:.2f}"
        line, = ax.plot(c["nfe"], c["rmse"], "--" if c["stochastic"] else "-", marker="o", ms=3, label=label)
        ax.fill_between(c["nfe"], c["rmse_min"], c["rmse_max"], color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(ref["floor_latent_rmse"], color="grey", lw=1, ls=":",
               label=f"reference floor ({ref['sampler']}:{ref['steps']} vs {ref['floor_steps']})")
    ax.set(xscale="log", yscale="log", xlabel="NFE (denoiser calls per sample)",
           ylabel="latent RMSE against the reference",
           title=f"error against NFE, reference {ref['sampler']}:{ref['steps']}:{ref['schedule']}")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
