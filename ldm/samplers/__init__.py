"""Samplers: stateless functions `sample_NAME(denoiser, x, sigmas, *, extra_args, callback, generator, ...)`
over a VE denoiser, plus the registry SAMPLERS (each sampler's conventions as data) and the one entry point
`sample(...)` the pipeline uses.

Notation (all samplers, VE space as k-diffusion; the originals' VP quantities in brackets)
  alphas_cumprod  a_n, n = 0..N-1, the model's discrete schedule          [ddpm.py register_schedule]
  sigma           noise level, sigma^2 = (1 - a) / a; x = x_0 + sigma * noise
  sigmas          the sigma list a run steps through, descending, often ending in 0
  x               the VE sample; x_VP = x / sqrt(1 + sigma^2)            [x_t, img]
  t               the (fractional) UNet timestep of sigma (Denoiser.sigma_to_t)
  denoised        D(x, sigma), the estimate of x_0                      [pred_x0]
  eps             (x - denoised) / sigma, the noise estimate             [e_t]
  d               dx/dsigma = eps, the probability-flow ODE derivative  (Karras et al. 2022, eq. 4)
  lam, h          lam = lambda = -log sigma (half log-SNR), h = lam_next - lam   [DPM-Solver]
  sigma_up/down   ancestral split of a step: down deterministically, then noise of std sigma_up
  eta             amount of fresh noise (DDIM's eta; the ancestral/SDE samplers use eta = 1)

A run (`sample`): the registry entry names the sigma grid (schedules.GRIDS), how x_T enters ("start"), how
img2img noises the init latent ("encode") and the UNet timestep mapping ("timing"). The originals' family
(ddpm, ddim, plms, dpm_solver, unipc) starts from the VP x_T at their first timestep, x = x_T * sqrt(1 +
sigmas[0]^2), and ends at sigma > 0 (alphas_cumprod[0]); the k-family starts from x_T * sigmas[0] and ends at
sigma = 0, where VE = VP. Either way the result is converted back to VP, the latent the originals decode.

A per-step hook (`before_step(x, i, sigma) -> x`, e.g. the masked img2img blend of ldm/inpaint.py, which is
the DDIMSampler's `mask`/`x0` blend) changes x before every step. The sampler functions stay untouched: a
`stepwise` sampler, whose step i reads only x, sigmas[i] and sigmas[i + 1], is run one step at a time on
sigmas[i:i + 2] with the hook in between, which is the same run. Samplers that carry state from step to step
(history of the multistep methods, PLMS) are refused with the hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ldm import schedules
from ldm.noise import Generators, randn_like
from ldm.samplers.compvis import sample_ddim, sample_ddpm, sample_plms
from ldm.samplers.k import (CHURN, sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                            sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_euler,
                            sample_euler_ancestral, sample_heun, sample_lms)
from ldm.samplers import sgm
from ldm.samplers.unipc import sample_unipc

STARTS = ("sigma", "vp")  # x = x_T * sigmas[0] (k-diffusion) | x_T * sqrt(1 + sigmas[0]^2) (VP x_T)
ENCODINGS = ("ve", "vp", "ddim", "sgm")  # img2img noising; see `_encode`
OUTPUTS = ("vp", "ve")  # what a run returns: the VP latent x / sqrt(1 + sigma_end^2) | x as the sampler leaves it


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its conventions.

    fn: the sampler function. grid: a schedules.GRIDS name (its schedules are the valid --schedule values).
    start / encode: how x_T enters and how img2img noises the init latent (STARTS, ENCODINGS).
    timing: Denoiser options that make the UNet see the original's timesteps (quantize: the CompVis samplers'
    integer timesteps; log_alpha: DPM-Solver's continuous time; the k-family keeps the fractional default).
    fixed: keyword arguments always passed to fn. options: keyword options a caller may set, with their
    defaults. stochastic: draws noise with the default options; `noise_option` names the option that, set
    non-zero, makes a deterministic sampler draw noise (ddim's eta, euler's churn). stepwise: step i reads only
    x, sigmas[i] and sigmas[i + 1], so a run may be cut between steps (`before_step` hooks). idle_draw: fn draws
    step noise even when it multiplies it by 0, as its original does (CompVis p_sample_ddim at eta 0, plms.py,
    k-diffusion's euler/heun/dpm_2 churn noise), so a run consumes the generator as the original consumes its
    RNG and the next batch of a run starts from the same numbers; such a fn takes the generator always."""

    fn: Callable
    grid: str
    start: str
    encode: str
    stochastic: bool = False
    timing: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    noise_option: str | None = None
    stepwise: bool = False
    idle_draw: bool = False
    output: str = "vp"

    def __post_init__(self):
        if (self.grid not in schedules.GRIDS or self.start not in STARTS or self.encode not in ENCODINGS
                or self.output not in OUTPUTS):
            raise ValueError(f"bad sampler spec: grid {self.grid!r}, start {self.start!r}, encode {self.encode!r}, "
                             f"output {self.output!r}")

    @property
    def valid_schedules(self) -> tuple[str, ...]:
        return schedules.GRIDS[self.grid].schedules

    @property
    def takes_generator(self) -> bool:
        return self.stochastic or self.idle_draw or self.noise_option is not None

    def is_stochastic(self, options: dict | None = None) -> bool:
        """Whether a run with these options draws noise (does not converge to the ODE solution)."""
        return self.stochastic or bool(self.noise_option and (options or {}).get(self.noise_option))


_INTEGER = {"quantize": True}
_CONTINUOUS = {"quantize": False, "interpolation": "log_alpha"}
_ORIGINAL = dict(start="vp", encode="vp", timing=_INTEGER)
_K = dict(grid="k", start="sigma", encode="ve")
_STEPWISE = dict(stepwise=True)
SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, "ddpm", stochastic=True, **_ORIGINAL, **_STEPWISE, idle_draw=True),
    "ddim": SamplerSpec(sample_ddim, "ddim", **{**_ORIGINAL, "encode": "ddim"}, options={"eta": 0.0},
                        noise_option="eta", **_STEPWISE, idle_draw=True),
    "plms": SamplerSpec(sample_plms, "ddim", **{**_ORIGINAL, "encode": "ddim"}, idle_draw=True),
    # the original --dpm_solver: Stability's DPMSolverSampler, DPM-Solver++(2M) with lower_order_final
    "dpm_solver": SamplerSpec(sample_dpmpp_2m, "dpm_solver", start="vp", encode="vp", timing=_CONTINUOUS,
                              fixed={"lower_order_final": True}),
    "unipc": SamplerSpec(sample_unipc, "dpm_solver", start="vp", encode="vp", timing=_CONTINUOUS),
    "euler": SamplerSpec(sample_euler, **_K, options=dict(CHURN), noise_option="s_churn", **_STEPWISE,
                         idle_draw=True),
    "euler_a": SamplerSpec(sample_euler_ancestral, **_K, stochastic=True, **_STEPWISE),
    "heun": SamplerSpec(sample_heun, **_K, options=dict(CHURN), noise_option="s_churn", **_STEPWISE,
                        idle_draw=True),
    "dpm2": SamplerSpec(sample_dpm_2, **_K, options=dict(CHURN), noise_option="s_churn", **_STEPWISE,
                        idle_draw=True),
    "dpm2_a": SamplerSpec(sample_dpm_2_ancestral, **_K, stochastic=True, **_STEPWISE),
    "lms": SamplerSpec(sample_lms, **_K),
    "dpmpp_2s_a": SamplerSpec(sample_dpmpp_2s_ancestral, **_K, stochastic=True, **_STEPWISE),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, **_K),
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde, **_K, stochastic=True, **_STEPWISE),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, **_K, stochastic=True, options={"solver_type": "midpoint"}),
    "dpmpp_3m_sde": SamplerSpec(sample_dpmpp_3m_sde, **_K, stochastic=True),
}
# generative-models (sgm, SDXL): its demo's samplers on its discretizations. They start from x_T * sqrt(1 +
# sigmas[0]^2), noise img2img as (z + noise * s0) / sqrt(1 + s0^2) then multiply back, and return x as they
# leave it (a run stopped early for a refiner hands over its noisy VE latent). Their timing is the model's
# denoiser's (DiscreteDenoiser: quantize_sigma), so the entries set none.
_SGM = dict(grid="sgm", start="vp", encode="sgm", output="ve")
SAMPLERS.update({
    "sgm_euler": SamplerSpec(sgm.sample_euler_edm, **_SGM, options=dict(sgm.CHURN), noise_option="s_churn"),
    "sgm_heun": SamplerSpec(sgm.sample_euler_edm, **_SGM, fixed={"heun": True}, options=dict(sgm.CHURN),
                            noise_option="s_churn"),
    "sgm_euler_a": SamplerSpec(sgm.sample_euler_ancestral, **_SGM, stochastic=True),
    "sgm_dpmpp_2s_a": SamplerSpec(sgm.sample_dpmpp_2s_ancestral, **_SGM, stochastic=True),
    "sgm_dpmpp_2m": SamplerSpec(sample_dpmpp_2m, **_SGM),  # DPMPP2MSampler: k-diffusion's, op for op
    "sgm_lms": SamplerSpec(sgm.sample_lms, **_SGM),  # LinearMultistepSampler, order 4
})
# The command line's --sampler names for sgm models (the demo's sampler list); the rest are not sgm's.
SGM_NAMES = {"euler": "sgm_euler", "heun": "sgm_heun", "euler_a": "sgm_euler_a", "dpmpp_2s_a": "sgm_dpmpp_2s_a",
             "dpmpp_2m": "sgm_dpmpp_2m", "lms": "sgm_lms"}


def resolve(sampler: str, family: str = "ldm") -> str:
    """The registry name of a command-line sampler name for a model family: "sgm" (SDXL) maps the demo's
    names (SGM_NAMES) onto generative-models' samplers and refuses the others; "ldm" takes names as they are."""
    if family != "sgm":
        return sampler
    if sampler in SGM_NAMES.values():
        return sampler
    if sampler not in SGM_NAMES:
        raise ValueError(f"sampler {sampler!r} is not one of generative-models' (SDXL); valid: "
                         f"{', '.join(SGM_NAMES)}")
    return SGM_NAMES[sampler]


def get(sampler: str) -> SamplerSpec:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def sigma_list(spec: SamplerSpec, sigmas: torch.Tensor, steps: int, schedule: str) -> torch.Tensor:
    """The full sigma list of a run of `steps` over the discrete `sigmas`."""
    return schedules.sigma_list(spec.grid, sigmas, steps, schedule)


def resolve_options(spec: SamplerSpec, sampler: str, eta: float = 0.0, options: dict | None = None) -> dict:
    """The keyword arguments for spec.fn: its fixed ones and the caller's options (`eta` is DDIM's eta, kept
    as its own argument for the command line's --ddim_eta); unknown options are an error."""
    options = dict(options or {})
    if eta:
        if "eta" not in spec.options:
            raise ValueError(f"eta applies to ddim only, got eta={eta} for {sampler}")
        options["eta"] = eta
    unknown = set(options) - set(spec.options)
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise ValueError(f"sampler {sampler} has no option {', '.join(sorted(unknown))}; its options: {valid}")
    return {**spec.fixed, **options}


def _encode(spec, sigmas, x_T, init_latent, strength, steps, generator, add_noise=True):
    """(x in VE space, the sigma list to run) of img2img, which runs the last t_enc = int(strength * steps)
    steps. encode "ddim": as CompVis scripts/img2img.py, stochastic_encode at DDIM index t_enc, i.e. VP
    noising to the level just ABOVE the first decoded step, then decode; "vp": VP noising to the first level
    run; "ve": k-diffusion's x = init + noise * sigma; "sgm": the sgm demo's do_img2img, which keeps the
    max(int(strength * (steps + 1)), 1) smallest levels (schedules.img2img_sigmas) and noises to the first as
    (init + noise * s0) / sqrt(1 + s0^2), which the sampler multiplies back; without `add_noise` (its
    apply_refiner, finishing another run's latent) the noise is drawn but x = init / sqrt(1 + s0^2)."""
    if strength is None or not 0.0 <= strength <= 1.0:
        raise ValueError(f"img2img needs a strength in [0, 1], got {strength}")
    noise = randn_like(init_latent, generator) if x_T is None else x_T
    if spec.encode == "sgm":
        tail = schedules.img2img_sigmas(sigmas, strength)
        x = init_latent + noise * tail[0] if add_noise else init_latent
        return _start(spec, tail, x / (1 + tail[0] ** 2).sqrt()), tail
    if not add_noise:
        raise ValueError(f"add_noise=False is sgm's (apply_refiner); encode {spec.encode!r} always noises")
    t_enc = int(strength * steps)
    tail = sigmas[len(sigmas) - 1 - min(t_enc, len(sigmas) - 1):]
    if spec.encode == "ve":
        return init_latent + noise * tail[0], tail
    sigma_enc = tail[0]
    if spec.encode == "ddim":
        # ddim_alphas[t_enc]; strength 1 on a grid of exactly `steps` levels has none above (the original's
        # IndexError) and is noised to the top level instead
        sigma_enc = sigmas[max(len(sigmas) - 2 - t_enc, 0)]
    a_enc = 1 / (1 + sigma_enc**2)
    x_vp = a_enc.sqrt() * init_latent + (1 - a_enc).sqrt() * noise
    return x_vp * (1 + tail[0] ** 2).sqrt(), tail


def _run_stepwise(spec, sampler, denoiser, x, sigmas, kwargs, extra_args, callback, before_step):
    """spec.fn one step at a time on sigmas[i:i + 2], with x = before_step(x, i, sigmas[i]) before each step."""
    if not spec.stepwise:
        valid = ", ".join(name for name, other in SAMPLERS.items() if other.stepwise)
        raise ValueError(f"sampler {sampler} carries state from step to step and cannot take a per-step hook "
                         f"(masked img2img); samplers that can: {valid}")
    if kwargs.get("s_churn"):  # k-diffusion spreads churn over the run: gamma = s_churn / steps
        raise ValueError(f"churn (s_churn) depends on the whole run; {sampler} takes a per-step hook without it")
    for i in range(len(sigmas) - 1):
        x = before_step(x, i, sigmas[i])
        step_callback = None if callback is None else (lambda info, i=i: callback({**info, "i": i}))
        x = spec.fn(denoiser, x, sigmas[i:i + 2], extra_args=extra_args, callback=step_callback, **kwargs)
    return x


def _start(spec, sigmas, x_T):
    # "vp" is also sgm's BaseDiffusionSampler.prepare_sampling_loop: x *= torch.sqrt(1.0 + sigmas[0] ** 2.0)
    return x_T * (sigmas[0] if spec.start == "sigma" else (1 + sigmas[0] ** 2).sqrt())


def _progress(callback, total, disable):
    if disable:
        return callback, None
    from tqdm.auto import tqdm  # only the entry point draws a bar; the samplers import only torch

    bar = tqdm(total=total)

    def step(info):
        bar.update(1)
        if callback is not None:
            callback(info)
    return step, bar


@torch.no_grad()
def sample(denoiser, x_T: torch.Tensor | None, *, sampler: str = "ddim", steps: int = 50,
           schedule: str = "uniform", eta: float = 0.0, options: dict | None = None,
           generator: Generators = None, init_latent: torch.Tensor | None = None,
           strength: float | None = None, callback: Callable | None = None, disable: bool = False,
           extra_args: dict | None = None, before_step: Callable | None = None, handoff: float | None = None,
           add_noise: bool = True) -> torch.Tensor:
    """Run `sampler` for `steps` and return the VP latent the original would decode (the sgm samplers: x as
    they leave it, the same when the run ends at 0).

    denoiser: a Denoiser / CFGDenoiser (needs .sigmas and .replace); extra_args go to it (cond, uncond, ...).
    x_T: N(0, I) of the latent shape; for img2img (init_latent + strength) it is the forward-noising noise,
    drawn from `generator` (one generator, or one per row: ldm/noise.py) if None. callback(info) once per step
    with k-diffusion's dict (x, i, sigma, sigma_hat, denoised); disable turns the progress bar off. schedule:
    one of the sampler's grid's (SAMPLERS[name].valid_schedules). eta: DDIM's eta (ddim only); options: the
    sampler's other options (SamplerSpec.options: churn for euler/heun/dpm2, solver_type for dpmpp_2m_sde).
    before_step(x, i, sigma): returns the VE x that step i (at level sigma) starts from; `stepwise` samplers only
    (see the module doc). handoff: stop early and leave the last part to a second model (sgm's
    Txt2NoisyDiscretizationWrapper(handoff, original_steps=steps), schedules.txt2noisy_sigmas); add_noise=False:
    sgm img2img of such a latent (see `_encode`).
    """
    spec = get(sampler)
    kwargs = resolve_options(spec, sampler, eta, options)
    if x_T is None and init_latent is None:
        raise ValueError("x_T is needed unless init_latent is given")
    full = sigma_list(spec, denoiser.sigmas, steps, schedule)
    if handoff is not None:
        full = schedules.txt2noisy_sigmas(full, handoff, steps)
    denoiser = denoiser.replace(**spec.timing) if spec.timing else denoiser
    reference = init_latent if init_latent is not None else x_T
    full = full.to(reference.device)
    if init_latent is None:
        if strength is not None:
            raise ValueError("strength is given without an init_latent")
        x, sigmas = _start(spec, full, x_T), full
    else:
        x, sigmas = _encode(spec, full, x_T, init_latent, strength, steps, generator, add_noise)
    if spec.takes_generator:
        kwargs["generator"] = generator
    step_callback, bar = _progress(callback, len(sigmas) - 1, disable)
    try:
        if before_step is None:
            x = spec.fn(denoiser, x, sigmas, extra_args=extra_args, callback=step_callback, **kwargs)
        else:
            x = _run_stepwise(spec, sampler, denoiser, x, sigmas, kwargs, extra_args, step_callback, before_step)
    finally:
        if bar is not None:
            bar.close()
    return x if spec.output == "ve" else x / (1 + sigmas[-1] ** 2).sqrt()
