"""The sampler registry entry point `sample`, the denoiser wrappers and guidance: conventions and invalid
inputs, on small callables (no UNet)."""


import pytest
import torch

from ldm import samplers, schedules
from ldm.denoisers import CFGDenoiser, Denoiser

ALPHAS_CUMPROD = schedules.alphas_cumprod_from_betas(schedules.make_beta_schedule()).to(torch.float32)


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """A model_fn (as model.apply_model) that records its inputs and returns a fixed affine function of them."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond=None, **extra):
        self.calls.append((x.clone(), t.clone(), cond, extra))
        bias = 0 if cond is None else cond.mean(dim=(1, 2))[:, None, None, None]  # per sample
        return 0.5 * x + 0.01 * t[:, None, None, None] + bias


def denoiser(**kwargs):
    return Denoiser(Recorder(), ALPHAS_CUMPROD, **kwargs)


def x_T(seed=0, shape=(2, 4, 3, 3)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- invalid inputs ----------------------------------------------------------------------------------------

def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(ValueError, match="euler_a.*dpmpp_3m_sde"):
        samplers.sample(denoiser(), x_T(), sampler="ddim_plus")


@pytest.mark.parametrize("sampler, schedule", [("ddim", "karras"), ("plms", "exponential"),
                                               ("euler", "quad"), ("dpm_solver", "karras"), ("heun", "linear")])
def test_unknown_schedule_lists_the_valid_names(sampler, schedule):
    with pytest.raises(ValueError, match="valid: "):
        samplers.sample(denoiser(), x_T(), sampler=sampler, schedule=schedule, disable=True)


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
@pytest.mark.parametrize("steps", [3, 9, 27, 36, 37, 101, 111, 251, 333, 501, 1000, 1001, 0])
def test_ddim_step_counts_the_original_cannot_run(sampler, steps):
    with pytest.raises(ValueError):
        samplers.sample(denoiser(), x_T(), sampler=sampler, steps=steps, disable=True)


@pytest.mark.parametrize("strength", [-0.1, 1.5, None])
def test_strength_outside_unit_interval(strength):
    with pytest.raises(ValueError, match="strength"):
        samplers.sample(denoiser(), x_T(), sampler="ddim", steps=10, init_latent=x_T(1), strength=strength)


def test_strength_without_init_latent():
    with pytest.raises(ValueError, match="init_latent"):
        samplers.sample(denoiser(), x_T(), steps=10, strength=0.5)


@pytest.mark.parametrize("sampler", ["plms", "euler_a", "dpm_solver", "ddpm"])
def test_eta_is_ddims_only(sampler):
    with pytest.raises(ValueError, match="eta"):
        samplers.sample(denoiser(), x_T(), sampler=sampler, steps=10, eta=0.5, disable=True)


def test_wrapper_arguments_are_checked():
    with pytest.raises(ValueError, match="parameterization"):
        Denoiser(Recorder(), ALPHAS_CUMPROD, "x0")
    with pytest.raises(ValueError, match="interpolation"):
        Denoiser(Recorder(), ALPHAS_CUMPROD, interpolation="linear")
    with pytest.raises(ValueError, match="unconditional"):
        CFGDenoiser(denoiser(), 7.5, cond=torch.ones(2, 1, 3))(x_T(), torch.ones(2))


# -- denoiser wrappers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_denoiser_scalings(parameterization):
    """k-diffusion external.py: eps: denoised = x - sigma * eps(x c_in); v: c_skip x + c_out v(x c_in),
    c_in = 1/sqrt(sigma^2+1), c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1)."""
    d = denoiser(parameterization=parameterization)
    x, sigma = x_T(), torch.tensor([0.5, 7.0])
    out = d(x, sigma, cond=torch.full((2, 1, 3), 2.0))
    s = sigma[:, None, None, None].double()
    c_in = 1 / (s**2 + 1).sqrt()
    unet_in, t, _, _ = d.model_fn.calls[0]
    torch.testing.assert_close(unet_in.double(), x.double() * c_in)
    model_out = 0.5 * unet_in.double() + 0.01 * t.double()[:, None, None, None] + 2.0  # context mean 2
    expected = x - s * model_out if parameterization == "eps" else x / (s**2 + 1) - s * c_in * model_out
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_denoiser_timesteps_fractional_quantized_and_log_alpha():
    sigmas = schedules.discrete_sigmas(ALPHAS_CUMPROD)
    # a grid point, and a quarter of the way from t = 10 to 11 in log sigma
    sigma = torch.stack([sigmas[500], (0.75 * sigmas[10].log() + 0.25 * sigmas[11].log()).exp()])
    for kwargs, expected in [({}, [500.0, 10.25]), ({"quantize": True}, [500.0, 10.0])]:
        d = denoiser(**kwargs)
        d(x_T(), sigma)
        torch.testing.assert_close(d.model_fn.calls[0][1], torch.tensor(expected), rtol=0, atol=1e-5)
    d = denoiser(interpolation="log_alpha")
    d(x_T(), sigma)
    t = d.model_fn.calls[0][1]
    # log alpha is not linear in log sigma between timesteps; near t = 0 (sigma ~ 0.03) it shows: 10.2417
    assert t[0] == 500 and 10.23 < t[1] < 10.245
    assert d.replace(quantize=True).quantize and not d.quantize  # replace copies, never mutates


def test_denoiser_passes_conditioning_through_untouched():
    """The denoiser scales x only; the conditioning (a dict, here with an extra entry) and any other keyword
    argument reach the model as given, for apply_model to route (ldm/models/latent_diffusion.py)."""
    cond = {"c_crossattn": [torch.ones(2, 1, 3)], "c_concat": [torch.full((2, 5, 3, 3), 3.0)]}
    calls = []
    d = Denoiser(lambda x, t, c=None, **extra: calls.append((c, extra)) or x, ALPHAS_CUMPROD)
    d(x_T(), torch.tensor([2.0, 2.0]), cond, y=torch.zeros(2, 6))
    assert calls[0][0] is cond and set(calls[0][1]) == {"y"}


def test_cfg_is_one_batched_call_uncond_first():
    d = denoiser()
    cond, uncond = torch.full((2, 1, 3), 1.0), torch.full((2, 1, 3), -1.0)
    calls = []

    def inner(x, sigma, cond=None, **extra):
        calls.append((x.shape[0], cond, extra))
        return d(x, sigma, cond=cond, **extra)
    cfg = CFGDenoiser(inner, 7.5, cond=cond, uncond=uncond)
    x, sigma = x_T(), torch.tensor([1.0, 3.0])
    shared = torch.zeros(2, 5, 3, 3)
    out = cfg(x, sigma, shared=shared)
    assert len(calls) == 1 and calls[0][0] == 4
    assert torch.equal(calls[0][1], torch.cat([uncond, cond]))  # [uncond, cond], as ddim.py
    assert calls[0][2]["shared"].shape[0] == 4  # shared extra arguments doubled
    out_uncond, out_cond = d(x, sigma, cond=uncond), d(x, sigma, cond=cond)
    torch.testing.assert_close(out, out_uncond + 7.5 * (out_cond - out_uncond))
    # per-call conditioning wins over the bound one; scale 1 runs the conditional branch alone
    other = torch.full((2, 1, 3), 4.0)
    torch.testing.assert_close(cfg(x, sigma, cond=other, uncond=uncond),
                               out_uncond + 7.5 * (d(x, sigma, cond=other) - out_uncond))
    calls.clear()
    torch.testing.assert_close(CFGDenoiser(inner, 1.0, cond=cond, uncond=uncond)(x, sigma), d(x, sigma, cond=cond))
    assert len(calls) == 1 and calls[0][0] == 2


def test_cfg_runs_unpairable_conditionings_as_two_calls():
    """Conditionings of different shapes (A1111 chunks: 77 vs 154 tokens) or structure (a ControlNet on one
    branch only), or batched=False: two calls, cond first, the same guidance."""
    d = denoiser()
    calls = []

    def inner(x, sigma, cond=None):
        calls.append(cond)
        c = cond["c"] if isinstance(cond, dict) else cond
        return d(x, sigma, cond=c)
    x, sigma = x_T(), torch.tensor([1.0, 3.0])
    cond, uncond = torch.full((2, 2, 3), 1.0), torch.full((2, 1, 3), -1.0)  # 2 tokens vs 1
    out = CFGDenoiser(inner, 3.0, cond=cond, uncond=uncond)(x, sigma)
    assert [c.shape[1] for c in calls] == [2, 1]
    expected = d(x, sigma, cond=uncond) + 3.0 * (d(x, sigma, cond=cond) - d(x, sigma, cond=uncond))
    torch.testing.assert_close(out, expected)
    calls.clear()
    CFGDenoiser(inner, 3.0, cond={"c": cond, "control": 1}, uncond={"c": uncond})(x, sigma)
    assert len(calls) == 2 and "control" in calls[0]
    calls.clear()
    same = torch.full((2, 2, 3), -1.0)
    separate = CFGDenoiser(inner, 3.0, cond=cond, uncond=same, batched=False)(x, sigma)
    assert len(calls) == 2
    calls.clear()
    batched = CFGDenoiser(inner, 3.0, cond=cond, uncond=same)(x, sigma)
    assert len(calls) == 1
    torch.testing.assert_close(separate, batched)  # float rounding of the batch size at most


# -- sample(): starts, img2img, randomness ---------------------------------------------------------------

def first_x(sampler, **kwargs):
    seen = []
    samplers.sample(denoiser(), kwargs.pop("x_T", x_T()), sampler=sampler, disable=True,
                    callback=lambda info: seen.append((info["x"], info["sigma"])), **kwargs)
    return seen


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "ddim", "plms", "dpm_solver"])
def test_start_scaling(sampler):
    """k-family: x_T * sigmas[0]; the originals' family: the VP x_T at their first timestep."""
    seen = first_x(sampler, steps=10)
    x, sigma = seen[0]
    expected = x_T() * (sigma if samplers.SAMPLERS[sampler].start == "sigma" else (1 + sigma**2).sqrt())
    torch.testing.assert_close(x, expected)
    assert len(seen) == 10


def test_original_family_returns_vp_latents():
    """With eps = 0 the original DDIM keeps pred_x0 = x_T / sqrt(a_T) and lands on sqrt(a_0) * pred_x0:
    the result comes back in VP space at alphas_cumprod[0], not in our internal VE space."""
    zero = denoiser()
    zero.model_fn = lambda x, t, c: torch.zeros_like(x)
    out = samplers.sample(zero, x_T(), sampler="ddim", steps=10, disable=True)
    a = ALPHAS_CUMPROD.double()
    torch.testing.assert_close(out.double(), x_T().double() * (a[0] / a[901]).sqrt(), rtol=1e-6, atol=1e-6)


def test_k_img2img_convention():
    """x = init + noise * sigmas[0] of the last int(strength * steps) + 1 levels; the noise is drawn from
    the generator (x_T None) or given as x_T."""
    init, noise = x_T(1), x_T(2)
    full = schedules.k_sigma_list(schedules.discrete_sigmas(ALPHAS_CUMPROD), 10, "karras")
    seen = first_x("euler", x_T=noise, init_latent=init, strength=0.55, steps=10, schedule="karras")
    assert len(seen) == 5 and seen[0][1] == full[-6]
    torch.testing.assert_close(seen[0][0], init + noise * full[-6])
    drawn = first_x("euler", x_T=None, init_latent=init, strength=0.55, steps=10, schedule="karras",
                    generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(drawn[0][0], seen[0][0])
    assert len(first_x("euler", x_T=noise, init_latent=init, strength=1.0, steps=10)) == 10


@pytest.mark.parametrize("sampler", ["dpm_solver", "unipc", "ddpm"])
def test_other_original_family_img2img_noises_to_the_first_level(sampler):
    """No original img2img for these: they noise to the level they start from (VP noising at that level is
    x = init + noise * sigma in VE)."""
    init, noise = x_T(1), x_T(2)
    seen = first_x(sampler, x_T=noise, init_latent=init, strength=0.5, steps=10)
    assert len(seen) == 5
    torch.testing.assert_close(seen[0][0], init + noise * seen[0][1], rtol=1e-5, atol=1e-5)


def test_ddim_img2img_noises_one_level_above_and_accepts_strength_one():
    """CompVis img2img.py: stochastic_encode at DDIM index t_enc, then t_enc steps starting one index
    lower. strength 1 (the original's IndexError) noises to the top level."""
    init, noise = x_T(1), x_T(2)
    full = schedules.ddim_sigma_list(schedules.discrete_sigmas(ALPHAS_CUMPROD), 10)
    seen = first_x("ddim", x_T=noise, init_latent=init, strength=0.5, steps=10)
    a_enc = 1 / (1 + full[-7].double() ** 2)  # DDIM timestep index 5 = 501
    expected = a_enc.sqrt() * init.double() + (1 - a_enc).sqrt() * noise.double()
    expected = expected * (1 + full[-6].double() ** 2).sqrt()
    assert len(seen) == 5 and seen[0][1] == full[-6]
    torch.testing.assert_close(seen[0][0].double(), expected, rtol=1e-6, atol=1e-6)
    top = first_x("ddim", x_T=noise, init_latent=init, strength=1.0, steps=10)
    assert len(top) == 10
    a_top = 1 / (1 + full[0].double() ** 2)
    torch.testing.assert_close(top[0][0].double(), (a_top.sqrt() * init.double() + (1 - a_top).sqrt() * noise.double())
                               * (1 + full[0].double() ** 2).sqrt(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler_a", "dpmpp_sde", "dpmpp_3m_sde"])
def test_noise_comes_from_the_generator_only(sampler):
    kwargs = dict(sampler=sampler, steps=10, eta=1.0 if sampler == "ddim" else 0.0, disable=True)
    if sampler == "ddpm":
        kwargs["steps"] = 20
    runs = []
    for seed, global_seed in [(5, 0), (5, 1), (6, 0)]:
        torch.manual_seed(global_seed)
        runs.append(samplers.sample(denoiser(), x_T(), generator=torch.Generator().manual_seed(seed), **kwargs))
    assert torch.equal(runs[0], runs[1])  # the global RNG plays no part
    assert (runs[0] - runs[2]).abs().max() > 1e-3  # the generator does


def test_registry_names():
    assert set(samplers.SAMPLERS) == {"ddpm", "ddim", "plms", "dpm_solver", "unipc", "euler", "euler_a", "heun",
                                      "dpm2", "dpm2_a", "lms", "dpmpp_2s_a", "dpmpp_2m", "dpmpp_sde",
                                      "dpmpp_2m_sde", "dpmpp_3m_sde", "sgm_euler", "sgm_heun", "sgm_euler_a",
                                      "sgm_dpmpp_2s_a", "sgm_dpmpp_2m", "sgm_lms"}


def test_sampler_options_are_checked():
    with pytest.raises(ValueError, match="no option s_churn; its options: none"):
        samplers.sample(denoiser(), x_T(), sampler="euler_a", steps=4, options={"s_churn": 1.0}, disable=True)
    with pytest.raises(ValueError, match="no option solver"):
        samplers.sample(denoiser(), x_T(), sampler="euler", steps=4, options={"solver_type": "heun"}, disable=True)
    with pytest.raises(ValueError, match="solver_type must be"):
        samplers.sample(denoiser(), x_T(), sampler="dpmpp_2m_sde", steps=4, options={"solver_type": "rk4"},
                        generator=torch.Generator(), disable=True)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm2"])
def test_churn_noise_is_drawn_at_every_step_on_or_off(sampler):
    """As k-diffusion 0.1.1 (sample_euler's `eps = torch.randn_like(x) * s_noise` before every step): the churn
    noise is drawn at every step, used only where gamma > 0, so the generator advances by one draw per step
    whether churn is on or off (the next batch of a run starts where k-diffusion's would); churn off changes
    no value of the run."""
    spec = samplers.SAMPLERS[sampler]
    assert not spec.is_stochastic() and spec.is_stochastic({"s_churn": 1.0})
    reference = torch.Generator().manual_seed(4)
    for _ in range(5):
        torch.randn(x_T().shape, generator=reference)
    outs = []
    for options in ({}, {"s_churn": 1.0, "s_tmin": 1.0, "s_tmax": 5.0}):
        g = torch.Generator().manual_seed(4)
        outs.append(samplers.sample(denoiser(), x_T(), sampler=sampler, steps=5, schedule="karras", generator=g,
                                    disable=True, options=options))
        assert torch.equal(g.get_state(), reference.get_state())
    # off: the same run as one that ignores the generator altogether
    torch.testing.assert_close(outs[0], samplers.sample(denoiser(), x_T(), sampler=sampler, steps=5,
                                                        schedule="karras", generator=None, disable=True),
                               rtol=0, atol=0)
    assert (outs[1] - outs[0]).abs().max() > 1e-3
