"""Generate tests/fixtures/samplers_parity.pt: schedule and sampler outputs of the ORIGINAL code.

Run with the reference environment (k-diffusion, torchsde are not dependencies of ldm):

    .venv-ref/bin/python tests/make_fixtures_samplers.py --compvis DIR --stability DIR --unipc GITDIR

with DIR a checkout of CompVis/stable-diffusion and of Stability-AI/stablediffusion, and GITDIR a git
directory (or checkout) of wl-zhao/UniPC.

References (generated with k-diffusion 0.1.1, torchsde 0.2.6, torch 2.14.1, numpy 1.26.4):
- CompVis/stable-diffusion ddim.py, plms.py, ddpm.py (LatentDiffusion.p_sample_loop, register_schedule) and
  util.py, read from the --compvis tree;
- Stability-AI/stablediffusion ddim.py (v-prediction), ddpm.py, dpm_solver/{sampler,dpm_solver}.py from
  the --stability tree;
- k-diffusion 0.1.1 (pip) sampling.py and external.py CompVisDenoiser / CompVisVDenoiser;
- UniPC (wl-zhao/UniPC uni_pc.py, variant bh2) from --unipc (a checkout, or a git directory whose HEAD's
  uni_pc.py is read with `git show`).
The originals are `ldm.*` packages like ours: they are loaded from their files under other module names,
with the few `ldm.*` modules they import injected into sys.modules (stubs, or the reference util.py) in
THIS process only; our `ldm` is never imported here. Their CUDA-only register_buffer is replaced by a plain
setattr (CompVis samplers), everything runs in float32 on the CPU.

They all drive one deterministic toy "UNet" (ToyUNet below, weights stored in the fixture) through a fake
model whose schedule buffers come from the original register_schedule (SD's linear 0.00085..0.012). The
originals draw their noise from the global RNG (torch.randn / randn_like); it is seeded right before each
run, and our samplers are run in the test with a torch.Generator seeded the same, which yields the same
numbers in the same order. For the SDE samplers k-diffusion is given a noise_sampler that draws from the
global RNG in the way ldm's BrownianNoise does (one randn per new sub-interval), so the runs are comparable
number for number; the law of BrownianNoise against torchsde's Brownian tree is checked separately through
moments of the Gaussian analytic model ("moments").
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "samplers_parity.pt"

SHAPE = (2, 4, 8, 8)  # two samples with different prompts, so a swapped CFG batch order shows
CONTEXT = (2, 5, 8)
SCALE = 7.5
# Gaussian analytic model of the "moments" runs: data ~ N(MU, S^2), exact VE denoiser
MU, S = 0.5, 0.6


class ToyUNet:
    """A fixed small nonlinear function of (x, t, context) standing in for the UNet: a 3x3 conv with a
    tanh, plus per-channel biases from a sinusoidal embedding of the (fractional) timestep, with the UNet's
    frequencies exp(-log(10000) i / half) (so t matters at the 1e-4 level as in the real model), and from
    the mean of the context."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.w = weights

    @staticmethod
    def random_weights(seed: int = 1234) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"conv": torch.randn(4, 4, 3, 3, generator=g) / 6, "conv_b": torch.randn(4, generator=g) / 10,
                "t_proj": torch.randn(4, 16, generator=g) / 4, "ctx_proj": torch.randn(4, CONTEXT[2], generator=g)}

    def __call__(self, x, t, context=None, cond=None, **_):
        context = cond if context is None else context  # k-diffusion passes it as cond=
        t = t.to(torch.float32)
        freqs = torch.exp(-math.log(10000) * torch.arange(8, dtype=torch.float32) / 8)
        emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
        bias = emb @ self.w["t_proj"].T + torch.tanh(context.mean(1) @ self.w["ctx_proj"].T)
        h = torch.nn.functional.conv2d(x, self.w["conv"], self.w["conv_b"], padding=1)
        return torch.tanh(h) + 0.3 * x + 0.2 * bias[:, :, None, None]


def gaussian_denoiser(x, sigma, **_):
    """E[x0 | x0 + sigma n] for x0 ~ N(MU, S^2)."""
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


# -- loading the originals ------------------------------------------------------------------------------

class _Stub(types.ModuleType):
    """A module whose unknown attributes are inert classes: stands in for imports the samplers never use."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


def _stub(name, **attrs):
    module = _Stub(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_references(ref_compvis: Path, ref_stability: Path, ref_unipc: Path):
    import torch.nn as nn

    _stub("pytorch_lightning", LightningModule=nn.Module)
    _stub("pytorch_lightning.utilities")
    _stub("pytorch_lightning.utilities.distributed", rank_zero_only=lambda f: f)
    _stub("ldm")
    _stub("ldm.util", exists=lambda x: x is not None,
          default=lambda v, d: v if v is not None else (d() if callable(d) else d))
    for name in ("ldm.modules.ema", "ldm.modules.distributions.distributions", "ldm.models.autoencoder",
                 "ldm.modules.diffusionmodules.openaimodel", "ldm.modules.encoders.modules"):
        _stub(name)
    refs = {}
    for tag, root in (("compvis", ref_compvis), ("stability", ref_stability)):
        sys.modules["ldm.modules.diffusionmodules.util"] = _load(
            f"ref_{tag}_util", root / "ldm/modules/diffusionmodules/util.py")
        if tag == "stability":
            _stub("ldm.models.diffusion.sampling_util", norm_thresholding=None)
        ddim = _load(f"ref_{tag}_ddim", root / "ldm/models/diffusion/ddim.py")
        sys.modules["ldm.models.diffusion.ddim"] = ddim
        refs[tag] = dict(ddim=ddim, plms=_load(f"ref_{tag}_plms", root / "ldm/models/diffusion/plms.py"),
                         ddpm=_load(f"ref_{tag}_ddpm", root / "ldm/models/diffusion/ddpm.py"),
                         util=sys.modules["ldm.modules.diffusionmodules.util"])
    _stub("ref_dpm")
    _load("ref_dpm.dpm_solver", ref_stability / "ldm/models/diffusion/dpm_solver/dpm_solver.py")
    refs["dpm_sampler"] = _load("ref_dpm.sampler", ref_stability / "ldm/models/diffusion/dpm_solver/sampler.py")
    for sampler in (refs["compvis"]["ddim"].DDIMSampler, refs["compvis"]["plms"].PLMSSampler):
        sampler.register_buffer = lambda self, name, attr: setattr(self, name, attr)  # theirs moves to CUDA
    if (ref_unipc / "uni_pc.py").exists():
        path, git_dir = ref_unipc / "uni_pc.py", ref_unipc / ".git"
    else:  # a bare git directory
        git_dir = ref_unipc
        path = Path(tempfile.mkdtemp()) / "uni_pc.py"
        path.write_text(subprocess.run(["git", f"--git-dir={git_dir}", "show", "HEAD:uni_pc.py"], check=True,
                                       capture_output=True, text=True).stdout)
    refs["unipc"] = _load("ref_unipc", path)
    refs["unipc"].print = lambda *a, **k: None  # it prints on every step
    refs["unipc_commit"] = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], check=True,
                                          capture_output=True, text=True).stdout.strip()
    return refs


def fake_model(ddpm_module, toy, parameterization="eps", log=None):
    """An original LatentDiffusion without its networks: schedule buffers from its own register_schedule
    (SD's linear schedule), apply_model = the toy UNet (recording the timesteps it is given)."""
    cls = ddpm_module.LatentDiffusion
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    model.parameterization, model.v_posterior = parameterization, 0.0
    ddpm_module.DDPM.register_schedule(model, beta_schedule="linear", timesteps=1000,
                                       linear_start=0.00085, linear_end=0.012)

    def apply_model(x, t, cond, **_):
        if log is not None:
            log.append(t.detach().clone().float())
        return toy(x, t, cond)
    model.apply_model = apply_model
    model.device = torch.device("cpu")
    model.shorten_cond_schedule, model.clip_denoised, model.log_every_t = False, False, 100
    return model


# -- the runs --------------------------------------------------------------------------------------------

def schedules_fixture(refs, alphas_cumprod):
    util = refs["compvis"]["util"]
    out = {"betas": {}, "ddim_failures": {}, "ddim_checksums": {}}
    for kind in ("linear", "cosine", "sqrt_linear", "sqrt"):
        out["betas"][kind] = torch.as_tensor(util.make_beta_schedule(kind, 1000, linear_start=0.00085,
                                                                     linear_end=0.012))
    for method in ("uniform", "quad"):
        failures, sums = [], []
        for steps in range(1, 1001):
            t = util.make_ddim_timesteps(method, steps, 1000, verbose=False)
            try:
                util.make_ddim_sampling_parameters(alphas_cumprod, t, 0.0, verbose=False)
            except IndexError:
                failures.append(steps)
            t = torch.as_tensor(t.astype("int64"))
            sums.append([len(t), int(t.sum()), int((t * t).sum())])
        out["ddim_failures"][method] = torch.tensor(failures)
        out["ddim_checksums"][method] = torch.tensor(sums)
    return out


def k_schedules_fixture(kd, alphas_cumprod):
    model = types.SimpleNamespace(alphas_cumprod=alphas_cumprod)
    wrap = kd.external.CompVisDenoiser(model)
    smin, smax = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    probe = torch.exp(torch.linspace(math.log(smin) - 0.1, math.log(smax) + 0.1, 257))
    return {"uniform_5": wrap.get_sigmas(5), "uniform_20": wrap.get_sigmas(20), "uniform_1": wrap.get_sigmas(1),
            "karras_20": kd.sampling.get_sigmas_karras(20, smin, smax),
            "exponential_20": kd.sampling.get_sigmas_exponential(20, smin, smax),
            "probe_sigmas": probe, "probe_t": wrap.sigma_to_t(probe),
            "probe_t_quantized": wrap.sigma_to_t(probe, quantize=True)}


class ReplayBrownian:
    """Noise for k-diffusion's SDE samplers, drawn from the global RNG as ldm's BrownianNoise does: one
    randn per new sub-interval, a query over [sigma, mid] + [mid, sigma_next] answered with the
    length-weighted sum of the two draws."""

    def __init__(self, x):
        self.x, self.last = x, None

    def __call__(self, sigma, sigma_next):
        z = torch.randn_like(self.x)
        if self.last is not None and float(self.last[0]) == float(sigma):
            high, mid, z1 = self.last
            self.last = None
            return (z1 * (high - mid) ** 0.5 + z * (mid - sigma_next) ** 0.5) / (high - sigma_next) ** 0.5
        self.last = (sigma, sigma_next, z)
        return z


K_CASES = {  # name: (k-diffusion function, steps, schedule, parameterization, quantize, scale[, options])
    "euler": ("sample_euler", 8, "karras", "eps", False, SCALE),
    "euler_v": ("sample_euler", 8, "uniform", "v", False, SCALE),
    "euler_quantized": ("sample_euler", 8, "uniform", "eps", True, SCALE),
    "euler_a": ("sample_euler_ancestral", 8, "karras", "eps", False, SCALE),
    "heun": ("sample_heun", 6, "karras", "eps", False, SCALE),
    "dpm2": ("sample_dpm_2", 6, "exponential", "eps", False, SCALE),
    "dpm2_a": ("sample_dpm_2_ancestral", 6, "karras", "eps", False, SCALE),
    "lms": ("sample_lms", 10, "karras", "eps", False, SCALE),
    "dpmpp_2s_a": ("sample_dpmpp_2s_ancestral", 6, "karras", "eps", False, SCALE),
    "dpmpp_2m": ("sample_dpmpp_2m", 10, "karras", "eps", False, SCALE),
    "dpmpp_2m_v": ("sample_dpmpp_2m", 10, "exponential", "v", False, 1.0),
    "dpmpp_sde": ("sample_dpmpp_sde", 6, "karras", "eps", False, SCALE),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", 8, "karras", "eps", False, SCALE),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", 8, "karras", "eps", False, SCALE),
    # churn (Karras et al. 2022 Algorithm 2); s_tmin/s_tmax leave some steps at gamma 0, where k-diffusion
    # still draws its eps: the draws of the steps after them must line up
    "euler_churn": ("sample_euler", 8, "karras", "eps", False, SCALE,
                    {"s_churn": 2.0, "s_tmin": 0.3, "s_tmax": 5.0, "s_noise": 1.003}),
    "heun_churn": ("sample_heun", 6, "karras", "eps", False, SCALE, {"s_churn": 1.0}),
    "dpm2_churn": ("sample_dpm_2", 6, "exponential", "eps", False, SCALE, {"s_churn": 1.5, "s_tmax": 8.0}),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", 8, "karras", "eps", False, SCALE, {"solver_type": "heun"}),
}
K_NAMES = {"sample_euler": "euler", "sample_euler_ancestral": "euler_a", "sample_heun": "heun",
           "sample_dpm_2": "dpm2", "sample_dpm_2_ancestral": "dpm2_a", "sample_lms": "lms",
           "sample_dpmpp_2s_ancestral": "dpmpp_2s_a", "sample_dpmpp_2m": "dpmpp_2m",
           "sample_dpmpp_sde": "dpmpp_sde", "sample_dpmpp_2m_sde": "dpmpp_2m_sde",
           "sample_dpmpp_3m_sde": "dpmpp_3m_sde"}


def k_runs(kd, toy, alphas_cumprod, inputs):
    cases = {}
    for case, (fn_name, steps, schedule, param, quantize, scale, *rest) in K_CASES.items():
        options = rest[0] if rest else {}
        model = types.SimpleNamespace(alphas_cumprod=alphas_cumprod, apply_model=toy)
        wrap = (kd.external.CompVisDenoiser if param == "eps" else kd.external.CompVisVDenoiser)(
            model, quantize=quantize)
        smin, smax = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
        sigmas = {"uniform": lambda: wrap.get_sigmas(steps),
                  "karras": lambda: kd.sampling.get_sigmas_karras(steps, smin, smax),
                  "exponential": lambda: kd.sampling.get_sigmas_exponential(steps, smin, smax)}[schedule]()

        def cfg(x, sigma, cond, uncond):
            if scale == 1.0:
                return wrap(x, sigma, cond=cond)
            out = wrap(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uncond, cond]))
            u, c = out.chunk(2)
            return u + (c - u) * scale
        x = inputs["x_T"] * sigmas[0]
        kwargs = {}
        if fn_name in ("sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"):
            kwargs["noise_sampler"] = ReplayBrownian(x)
        seed = 100 + len(cases)
        torch.manual_seed(seed)
        extra_args = {"cond": inputs["cond"], "uncond": inputs["uncond"]}
        out = getattr(kd.sampling, fn_name)(cfg, x, sigmas, extra_args=extra_args, disable=True, **kwargs,
                                            **options)
        cases[case] = dict(sampler=K_NAMES[fn_name], steps=steps, schedule=schedule, parameterization=param,
                           quantize=quantize, scale=scale, seed=seed, out=out, sigmas=sigmas, options=options,
                           after=torch.randn(8))
    return cases


def original_runs(refs, toy, inputs):
    cases = {}
    cv, st = refs["compvis"], refs["stability"]
    cond, uncond, x_T = inputs["cond"], inputs["uncond"], inputs["x_T"]

    def record(case, sampler, steps, schedule, seed, out, log, parameterization="eps", scale=SCALE, **extra):
        # `after`: the next numbers of the global RNG once the run is done, so a test can check that a run
        # consumes its generator exactly as the original consumes the RNG (the next batch of a run starts there)
        extra["after"] = torch.randn(8)
        cases[case] = dict(sampler=sampler, steps=steps, schedule=schedule, parameterization=parameterization,
                           scale=scale, seed=seed, out=out, t=torch.stack(log), **extra)

    for case, (module, cls, steps, schedule, eta, param) in {
            "ddim": (cv["ddim"], "DDIMSampler", 10, "uniform", 0.0, "eps"),
            "ddim_quad": (cv["ddim"], "DDIMSampler", 7, "quad", 0.0, "eps"),
            "ddim_eta1": (cv["ddim"], "DDIMSampler", 10, "uniform", 1.0, "eps"),
            "ddim_150": (cv["ddim"], "DDIMSampler", 150, "uniform", 0.5, "eps"),  # 167 steps, not 150
            "ddim_v": (st["ddim"], "DDIMSampler", 10, "uniform", 0.0, "v"),
            "ddim_v_eta1": (st["ddim"], "DDIMSampler", 6, "uniform", 1.0, "v"),
            "plms": (cv["plms"], "PLMSSampler", 10, "uniform", 0.0, "eps"),
            "plms_one_step": (cv["plms"], "PLMSSampler", 1, "uniform", 0.0, "eps"),
            "plms_quad": (cv["plms"], "PLMSSampler", 5, "quad", 0.0, "eps")}.items():
        log = []
        repo = cv if module in (cv["ddim"], cv["plms"]) else st
        model = fake_model(repo["ddpm"], toy, param, log)
        kwargs = {} if repo is cv else {"device": torch.device("cpu")}
        sampler = getattr(module, cls)(model, **kwargs)
        seed = 200 + len(cases)
        torch.manual_seed(seed)
        sampler.make_schedule(steps, ddim_discretize=schedule, ddim_eta=eta, verbose=False)
        out, _ = sampler.ddim_sampling(cond, x_T.shape, x_T=x_T, unconditional_guidance_scale=SCALE,
                                       unconditional_conditioning=uncond) if cls == "DDIMSampler" else \
            sampler.plms_sampling(cond, x_T.shape, x_T=x_T, unconditional_guidance_scale=SCALE,
                                  unconditional_conditioning=uncond)
        record(case, "ddim" if cls == "DDIMSampler" else "plms", steps, schedule, seed, out, log, param, eta=eta)

    for case, (steps, strength, eta) in {"img2img_ddim": (10, 0.75, 0.0), "img2img_ddim_eta1": (10, 0.5, 1.0),
                                         "img2img_ddim_strength0": (10, 0.05, 0.0)}.items():
        log = []
        model = fake_model(cv["ddpm"], toy, "eps", log)
        sampler = cv["ddim"].DDIMSampler(model)
        sampler.make_schedule(steps, ddim_eta=eta, verbose=False)
        t_enc = int(strength * steps)
        seed = 300 + len(cases)
        torch.manual_seed(seed)
        noise = torch.randn_like(inputs["init"])  # img2img.py: stochastic_encode's randn_like, then decode's
        z_enc = sampler.stochastic_encode(inputs["init"], torch.tensor([t_enc] * x_T.shape[0]), noise=noise)
        out = sampler.decode(z_enc, cond, t_enc, unconditional_guidance_scale=SCALE,
                             unconditional_conditioning=uncond)
        record(case, "ddim", steps, "uniform", seed, out, log or [torch.zeros(2)], strength=strength, eta=eta)

    for case, (steps, param, scale) in {"dpm_solver": (10, "eps", SCALE), "dpm_solver_20": (20, "eps", SCALE),
                                        "dpm_solver_v": (8, "v", SCALE), "dpm_solver_2": (2, "eps", 1.0)}.items():
        log = []
        model = fake_model(st["ddpm"], toy, param, log)
        sampler = refs["dpm_sampler"].DPMSolverSampler(model, device=torch.device("cpu"))
        torch.manual_seed(0)
        out, _ = sampler.sample(steps, x_T.shape[0], x_T.shape[1:], conditioning=cond, verbose=False,
                                unconditional_guidance_scale=scale, unconditional_conditioning=uncond, x_T=x_T)
        record(case, "dpm_solver", steps, "uniform", 0, out, log, param, scale)

    # all 1000 steps; and, with the model's clip_denoised (the DDPM class default), the chain of the last
    # 100 timesteps (p_sample_loop(timesteps=100) starts x_T at t = 99), where clipping to [-1, 1] bites
    for case, (clip, steps) in {"ddpm_1000": (False, 1000), "ddpm_100_clip": (True, 100)}.items():
        log = []
        model = fake_model(cv["ddpm"], toy, "eps", log)
        model.clip_denoised = clip
        seed = 400 + len(cases)
        torch.manual_seed(seed)
        out = model.p_sample_loop(cond, x_T.shape, x_T=x_T, verbose=False, timesteps=steps)
        record(case, "ddpm", steps, "uniform", seed, out, log[::50], scale=1.0, clip_denoised=clip)

    up = refs["unipc"]
    for case, steps in {"unipc": 10, "unipc_20": 20}.items():
        model = fake_model(st["ddpm"], toy, "eps")
        ns = up.NoiseScheduleVP("discrete", alphas_cumprod=model.alphas_cumprod)
        model_fn = up.model_wrapper(lambda x, t, c: model.apply_model(x, t, c), ns, model_type="noise",
                                    guidance_type="classifier-free", condition=cond,
                                    unconditional_condition=uncond, guidance_scale=SCALE)
        solver = up.UniPC(model_fn, ns, algorithm_type="data_prediction", variant="bh2")
        torch.manual_seed(0)
        out = solver.sample(x_T.clone(), steps=steps, skip_type="time_uniform", method="multistep",
                            order=3, lower_order_final=True)
        record(case, "unipc", steps, "uniform", 0, out, [torch.zeros(2)])
    return cases


def moments(kd):
    """Mean and variance of the SDE samplers' output on the Gaussian model with torchsde's Brownian tree
    (k-diffusion's default noise), 2^16 scalars from the exact marginal at sigma_max."""
    out = {}
    n = 1 << 16
    for name, steps in (("sample_dpmpp_sde", 4), ("sample_dpmpp_sde", 8), ("sample_dpmpp_2m_sde", 6),
                        ("sample_dpmpp_3m_sde", 6)):
        sigmas = kd.sampling.get_sigmas_karras(steps, 0.03, 20.0).double()
        torch.manual_seed(7)
        x = MU + (S**2 + sigmas[0] ** 2) ** 0.5 * torch.randn(n, 1, dtype=torch.float64)
        noise = kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=11)
        y = getattr(kd.sampling, name)(gaussian_denoiser, x, sigmas, noise_sampler=noise, disable=True)
        out[f"{K_NAMES[name]}_{steps}"] = dict(sampler=K_NAMES[name], steps=steps, n=n, sigmas=sigmas,
                                               mean=y.mean().item(), var=y.var().item())
    return out


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compvis", type=Path, required=True, help="checkout of CompVis/stable-diffusion")
    p.add_argument("--stability", type=Path, required=True, help="checkout of Stability-AI/stablediffusion")
    p.add_argument("--unipc", type=Path, required=True, help="checkout or git directory of wl-zhao/UniPC")
    args = p.parse_args(argv)
    sys.modules["clip"] = types.ModuleType("clip")  # k_diffusion.evaluation imports it; unused here
    import k_diffusion as kd
    import numpy
    import torchsde

    refs = load_references(args.compvis, args.stability, args.unipc)
    weights = ToyUNet.random_weights()
    toy = ToyUNet(weights)
    g = torch.Generator().manual_seed(0)
    inputs = {"x_T": torch.randn(SHAPE, generator=g), "cond": torch.randn(CONTEXT, generator=g),
              "uncond": torch.randn(CONTEXT, generator=g), "init": torch.randn(SHAPE, generator=g) * 0.8}
    alphas_cumprod = fake_model(refs["compvis"]["ddpm"], toy).alphas_cumprod
    from importlib.metadata import version
    fixture = {
        "meta": {"k-diffusion": version("k-diffusion"), "torchsde": torchsde.__version__,
                 "torch": str(torch.__version__), "numpy": numpy.__version__,
                 "unipc_commit": refs.get("unipc_commit", "")},
        "toy": weights, "inputs": inputs, "alphas_cumprod": alphas_cumprod,
        "schedules": schedules_fixture(refs, alphas_cumprod),
        "k_schedules": k_schedules_fixture(kd, alphas_cumprod),
        "dpm_solver_grid": dpm_grid(refs, alphas_cumprod),
        "cases": {**k_runs(kd, toy, alphas_cumprod, inputs), **original_runs(refs, toy, inputs)},
        "moments": moments(kd),
    }
    torch.save(fixture, FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes), cases: {', '.join(fixture['cases'])}")


def dpm_grid(refs, alphas_cumprod):
    """The noise levels and UNet timesteps of Stability's DPM-Solver grid (time_uniform and
    time_quadratic, 10 steps): VE sigma = marginal_std / marginal_alpha, t_input = (t - 1/N) * 1000."""
    dpm = sys.modules["ref_dpm.dpm_solver"]
    ns = dpm.NoiseScheduleVP("discrete", alphas_cumprod=alphas_cumprod)
    solver = dpm.DPM_Solver(None, ns, predict_x0=True)
    out = {}
    for skip in ("time_uniform", "time_quadratic"):
        t = solver.get_time_steps(skip, 1.0, 1.0 / ns.total_N, 10, "cpu")
        out[skip] = dict(sigma=ns.marginal_std(t) / ns.marginal_alpha(t), t_input=(t - 1.0 / ns.total_N) * 1000.0)
    return out


if __name__ == "__main__":
    main()
