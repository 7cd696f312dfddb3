"""Noise schedules as pure functions: built in float64, returned as tensors (callers store float32).

Two views of one discrete DDPM schedule of N training timesteps n = 0 .. N-1:
  VP (the originals):  x_n = sqrt(alphas_cumprod[n]) * x_0 + sqrt(1 - alphas_cumprod[n]) * eps
  VE (k-diffusion):    x   = x_0 + sigma * eps,  sigma_n = sqrt((1 - alphas_cumprod[n]) / alphas_cumprod[n])
so x_VE = x_VP / sqrt(alphas_cumprod) = x_VP * sqrt(1 + sigma^2). Samplers work on VE sigma lists (descending,
often ending in 0); the functions below build those lists for every grid the originals use, and map a
continuous sigma back to a (fractional) UNet timestep.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

INTERPOLATIONS = ("log_sigma", "log_alpha")


def make_beta_schedule(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
                       schedule: str = "linear", cosine_s: float = 8e-3) -> torch.Tensor:
    """betas in float64 on the CPU, as ldm/modules/diffusionmodules/util.py make_beta_schedule. Stable
    Diffusion uses "linear": squares of an even grid between sqrt(linear_start) and sqrt(linear_end)."""
    if schedule == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return torch.clamp(1 - alphas[1:] / alphas[:-1], min=0, max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; valid: linear, sqrt_linear, sqrt, cosine")


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """prod_{s<=t} (1 - beta_s), in the dtype of `betas` (the original uses np.cumprod in float64)."""
    return torch.cumprod(1.0 - betas, dim=0)


# The buffers ddpm.py DDPM.register_schedule stores in every original checkpoint, in its order.
DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def ddpm_buffers(betas: torch.Tensor, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The 12 DDPM_BUFFERS of `betas` as ddpm.py register_schedule computes them (float64 math; the original
    stores float32, callers cast). Only what checkpoints hold: sampling needs alphas_cumprod alone."""
    betas = betas.to(torch.float64)
    ac = alphas_cumprod_from_betas(betas)
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    variance = (1 - v_posterior) * betas * (1.0 - prev) / (1.0 - ac) + v_posterior * betas
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": variance,
        # clipped because the posterior variance is 0 at the start of the chain
        "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - ac),
    }
    return {name: values[name] for name in DDPM_BUFFERS}


def discrete_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_n = sqrt((1 - a_n) / a_n) for every training timestep, ascending in n; float32 on the CPU."""
    a = alphas_cumprod.detach().to("cpu", torch.float64)
    return ((1 - a) / a).sqrt().to(torch.float32)


def _keys(sigma: torch.Tensor, interpolation: str) -> torch.Tensor:
    """The coordinate that is interpolated linearly between training timesteps, increasing in sigma:
    log sigma (k-diffusion external.py DiscreteSchedule) or -log alpha_VP = log(1 + sigma^2) / 2
    (DPM-Solver's NoiseScheduleVP('discrete'): log alpha piecewise linear in t)."""
    if interpolation == "log_sigma":
        return sigma.log()
    if interpolation == "log_alpha":
        return 0.5 * torch.log1p(sigma**2)
    raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor, quantize: bool = False,
               interpolation: str = "log_sigma") -> torch.Tensor:
    """Fractional training timestep of each noise level (k-diffusion DiscreteSchedule.sigma_to_t): linear
    interpolation of the key between the two neighbouring discrete sigmas, clamped to [0, N-1]; with
    `quantize`, the nearest timestep instead. float64 on the CPU, shape of `sigma`."""
    key_table = _keys(sigmas.to(torch.float64), interpolation)
    key = _keys(sigma.detach().to("cpu", torch.float64).reshape(-1), interpolation)
    dists = key[None, :] - key_table[:, None]  # (N, B)
    if quantize:
        return dists.abs().argmin(dim=0).to(torch.float64).view(sigma.shape)
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=key_table.shape[0] - 2)
    w = ((key_table[low] - key) / (key_table[low] - key_table[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).view(sigma.shape)


def nearest_sigma_index(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the table `sigmas` to each noise level, by |sigma - sigmas[n]| computed in
    float32 (sgm denoiser.py DiscreteDenoiser.sigma_to_idx; argmin takes the first of equal distances). Not the
    log-sigma distance of `sigma_to_t(quantize=True)`: the two disagree near midpoints. int64 on the CPU."""
    dists = sigma.detach().to("cpu", torch.float32).reshape(-1) - sigmas.to(torch.float32)[:, None]  # (N, B)
    return dists.abs().argmin(dim=0).view(sigma.shape)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor, interpolation: str = "log_sigma") -> torch.Tensor:
    """Noise level of fractional timesteps, the inverse of sigma_to_t; float64."""
    t = t.to(torch.float64)
    key_table = _keys(sigmas.to(torch.float64), interpolation)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    key = (1 - w) * key_table[low] + w * key_table[high]
    return key.exp() if interpolation == "log_sigma" else torch.expm1(2 * key).sqrt()


def _appended(sigmas: torch.Tensor, last: float | torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.reshape(-1), torch.as_tensor(last, dtype=sigmas.dtype).reshape(1)])


# -- the originals' grids (CompVis ddim.py / plms.py / ddpm.py, Stability dpm_solver) ---------------------

def _discretize(steps: int, num_timesteps: int, discretize: str) -> torch.Tensor:
    """util.py make_ddim_timesteps before its +1: "uniform" = range(0, N, N // S), "quad" =
    int(linspace(0, sqrt(0.8 N), S) ** 2)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if discretize == "uniform":
        if steps > num_timesteps:
            raise ValueError(f"steps must be <= {num_timesteps} for the uniform grid, got {steps}")
        return torch.arange(0, num_timesteps, num_timesteps // steps)
    if discretize == "quad":
        # numpy's linspace (i * step, last entry set to stop), squared, truncated as astype(int)
        stop = math.sqrt(num_timesteps * 0.8)
        grid = torch.arange(steps, dtype=torch.float64) * (stop / max(steps - 1, 1))
        grid[-1] = stop if steps > 1 else 0.0
        return (grid**2).long()
    raise ValueError(f"unknown DDIM discretization {discretize!r}; valid: uniform, quad")


def ddim_timesteps(steps: int, num_timesteps: int = 1000, discretize: str = "uniform") -> torch.Tensor:
    """The DDIM timesteps, ascending, as util.py make_ddim_timesteps (the discretization + 1). The
    originals then read alphas_cumprod at each of them, so a "uniform" grid ending at N (whenever N // S
    divides N - 1: for N = 1000, S in 3, 9, 27, 36, 37, 101-111, 251-333, 501-1000) raises their IndexError;
    we raise ValueError. "uniform" makes ceil(N / (N // S)) steps, which can exceed S (S = 400 gives 500),
    as the original."""
    t = _discretize(steps, num_timesteps, discretize) + 1
    if int(t[-1]) >= num_timesteps:
        raise ValueError(f"{steps} {discretize} DDIM steps select timestep {int(t[-1])}, outside the "
                         f"{num_timesteps} of the schedule (the original fails with an IndexError); "
                         f"choose another step count")
    return t


def ddim_sigma_list(sigmas: torch.Tensor, steps: int, discretize: str = "uniform") -> torch.Tensor:
    """VE noise levels of the DDIM / PLMS loop: the DDIM timesteps from the top, then the level of
    alphas_cumprod[0] where the originals' last step lands (ddim_alphas_prev[0]). Entries are exactly the
    discrete `sigmas` (so a quantizing denoiser hands the UNet the original integer timesteps)."""
    t = ddim_timesteps(steps, sigmas.shape[0], discretize)
    return _appended(sigmas[t.flip(0)], sigmas[0])


def ddpm_sigma_list(sigmas: torch.Tensor, steps: int, discretize: str = "uniform") -> torch.Tensor:
    """Noise levels for ancestral DDPM: the DDIM discretization WITHOUT its +1 shift, then 0. With S = N
    this is N-1, ..., 0 and the final posterior step to x_0 (alphas_cumprod_prev[0] = 1), i.e. the
    original LatentDiffusion.p_sample_loop; fewer steps subsample the same chain."""
    t = _discretize(steps, sigmas.shape[0], discretize)
    return _appended(sigmas[t.flip(0)], 0.0)


def dpm_solver_sigma_list(sigmas: torch.Tensor, steps: int, skip_type: str = "time_uniform") -> torch.Tensor:
    """Stability's DPM-Solver grid (dpm_solver.py NoiseScheduleVP('discrete') and DPM_Solver.sample):
    continuous time t from T = 1 to t_0 = 1/N in `steps` even ("time_uniform") or quadratic steps, where
    t = (n + 1) / N is timestep n and log alpha is linear in t in between. Fractional timesteps
    tau = N t - 1, so the matching denoiser uses interpolation="log_alpha" (the original hands the UNet
    (t - 1/N) * 1000 = tau for N = 1000). Ends at sigma_0 > 0."""
    n = sigmas.shape[0]
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if skip_type == "time_uniform":
        t = torch.linspace(1.0, 1.0 / n, steps + 1, dtype=torch.float64)
    elif skip_type == "time_quadratic":
        t = torch.linspace(1.0, (1.0 / n) ** 0.5, steps + 1, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown DPM-Solver skip type {skip_type!r}; valid: time_uniform, time_quadratic")
    tau = (t * n - 1).clamp(0, n - 1)
    return t_to_sigma(tau, sigmas, "log_alpha").to(torch.float32)


# -- k-diffusion sigma lists (sampling.py / external.py), each ending in 0 ---------------------------------

def uniform_sigma_list(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """CompVisDenoiser.get_sigmas(steps): timesteps linspace(N-1, 0, steps), sigma by log-sigma
    interpolation, then 0."""
    t = torch.linspace(sigmas.shape[0] - 1, 0, steps, dtype=torch.float64)
    return _appended(t_to_sigma(t, sigmas, "log_sigma").to(torch.float32), 0.0)


def karras_sigma_list(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, then 0
    (get_sigmas_karras)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _appended(((max_inv + ramp * (min_inv - max_inv)) ** rho).to(torch.float32), 0.0)


def exponential_sigma_list(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """log sigma evenly spaced from sigma_max to sigma_min, then 0 (get_sigmas_exponential)."""
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64)
    return _appended(log_sigmas.exp().to(torch.float32), 0.0)


K_SCHEDULES = ("uniform", "karras", "exponential")


def k_sigma_list(sigmas: torch.Tensor, steps: int, schedule: str = "uniform") -> torch.Tensor:
    """A k-diffusion sigma list over the model's discrete sigmas; karras and exponential span
    [sigma_min, sigma_max] of the discrete schedule (its first and last entries), as the usual scripts."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if schedule == "uniform":
        return uniform_sigma_list(sigmas, steps)
    sigma_min, sigma_max = float(sigmas[0]), float(sigmas[-1])
    if schedule == "karras":
        return karras_sigma_list(steps, sigma_min, sigma_max)
    if schedule == "exponential":
        return exponential_sigma_list(steps, sigma_min, sigma_max)
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(K_SCHEDULES)}")


# -- generative-models (sgm) discretizations (discretizer.py, scripts/demo/discretization.py) ------------

def sgm_alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012,
                       num_timesteps: int = 1000) -> torch.Tensor:
    """LegacyDDPMDiscretization's alphas_cumprod: util.py make_beta_schedule("linear") in float64, then
    np.cumprod(1 - betas) (torch's cumprod gives the same float64 values)."""
    return alphas_cumprod_from_betas(make_beta_schedule(num_timesteps, linear_start, linear_end, "linear"))


def sgm_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DiscreteDenoiser's table: LegacyDDPMDiscretization.get_sigmas(N) flipped to ascending. sgm rounds the
    float64 ratio (1 - a) / a to float32 and takes the square root in float32, which differs in the last bit
    from the float64 root rounded once (`discrete_sigmas`) for about a fifth of the entries."""
    a = alphas_cumprod.detach().to("cpu", torch.float64)
    return ((1 - a) / a).to(torch.float32) ** 0.5


def sgm_legacy_ddpm_sigma_list(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """LegacyDDPMDiscretization()(steps): the timesteps np.linspace(N - 1, 0, steps, endpoint=False).astype(int)
    (999, 899, ..., 99 for 10 of 1000: no +1 offset, never timestep 0 below N steps) read from the table
    `sigmas` (ascending), descending, then 0."""
    n = sigmas.shape[0]
    if not isinstance(steps, int) or not 1 <= steps <= n:
        raise ValueError(f"steps must be an integer in [1, {n}] (LegacyDDPMDiscretization), got {steps!r}")
    # numpy's linspace: start + i * step in float64; astype(int) truncates toward zero
    t = (torch.arange(steps, dtype=torch.float64) * ((0.0 - (n - 1)) / steps) + (n - 1)).long()
    return _appended(sigmas[t] if steps < n else sigmas.flip(0), 0.0)


def sgm_edm_sigma_list(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDMDiscretization(sigma_min, sigma_max, rho)(steps): Karras et al. (2022) eq. 5 as sgm computes it (a
    float32 ramp, torch.linspace's), then 0. sigma_min / sigma_max are Python floats."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _appended((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, 0.0)


SGM_SCHEDULES = ("uniform", "karras")


def sgm_sigma_list(sigmas: torch.Tensor, steps: int, schedule: str = "uniform") -> torch.Tensor:
    """The sgm demo's discretizations over the denoiser's ascending table `sigmas`: "uniform" is
    LegacyDDPMDiscretization, "karras" EDMDiscretization(sigmas[0], sigmas[-1], rho 7)."""
    if schedule == "uniform":
        return sgm_legacy_ddpm_sigma_list(sigmas, steps)
    if schedule == "karras":
        return sgm_edm_sigma_list(steps, float(sigmas[0]), float(sigmas[-1]))
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SGM_SCHEDULES)}")


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """Img2ImgDiscretizationWrapper(strength): the max(int(strength * len), 1) smallest levels of the
    descending `sigmas` (their final 0 counted: strength 0.3 of 10 steps keeps 3 levels, 2 steps)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    keep = max(int(strength * len(sigmas)), 1)
    return sigmas[len(sigmas) - keep:]


def txt2noisy_sigmas(sigmas: torch.Tensor, strength: float, original_steps: int) -> torch.Tensor:
    """Txt2NoisyDiscretizationWrapper(strength, original_steps): drop the max(min(int(strength * (steps + 1))
    - 1, steps), 0) smallest levels, so the run stops at a noise level a second model (the refiner) starts
    from."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    steps = original_steps + 1
    prune = max(min(int(strength * steps) - 1, steps - 1), 0)
    return sigmas[:len(sigmas) - prune]


# -- grids: name -> (function, schedule names), the table a sampler's registry entry names ----------------

class Grid(NamedTuple):
    """How a run's sigma list is built: build(discrete sigmas, steps, schedule) -> descending sigma list, and
    the schedule names `build` accepts (the first is the default)."""

    build: Callable[[torch.Tensor, int, str], torch.Tensor]
    schedules: tuple[str, ...]


def _dpm_solver_grid(sigmas: torch.Tensor, steps: int, schedule: str) -> torch.Tensor:
    # the originals' skip types under the DDIM discretization names the command line uses for them
    return dpm_solver_sigma_list(sigmas, steps, {"uniform": "time_uniform", "quad": "time_quadratic"}[schedule])


GRIDS: dict[str, Grid] = {
    "ddim": Grid(ddim_sigma_list, ("uniform", "quad")),  # CompVis ddim.py / plms.py
    "ddpm": Grid(ddpm_sigma_list, ("uniform", "quad")),  # ddpm.py p_sample_loop, subsampled
    "dpm_solver": Grid(_dpm_solver_grid, ("uniform", "quad")),  # Stability dpm_solver, also UniPC
    "k": Grid(k_sigma_list, K_SCHEDULES),  # k-diffusion get_sigmas / get_sigmas_karras / _exponential
    "sgm": Grid(sgm_sigma_list, SGM_SCHEDULES),  # generative-models LegacyDDPM / EDM discretizations
}


def sigma_list(grid: str, sigmas: torch.Tensor, steps: int, schedule: str) -> torch.Tensor:
    """The sigma list of a run of `steps` on `grid` (a GRIDS name) over the discrete `sigmas`."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)}")
    valid = GRIDS[grid].schedules
    if schedule not in valid:
        raise ValueError(f"unknown schedule {schedule!r} for this sampler; valid: {', '.join(valid)}")
    return GRIDS[grid].build(sigmas, steps, schedule)
