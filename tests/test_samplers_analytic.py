"""Samplers on an analytic model: Gaussian data x0 ~ N(MU, S^2) has the exact VE denoiser
E[x0 | x0 + sigma n] = (S^2 x + sigma^2 MU) / (S^2 + sigma^2), and its probability-flow ODE the exact
solution x(sigma) = MU + (x(sigma_0) - MU) sqrt((S^2 + sigma^2) / (S^2 + sigma_0^2)).

- deterministic samplers: convergence ORDER as the step count doubles, float64, on a geometric sigma list
  10 -> 0.1 (no final 0: the last step to 0 is deliberately first order in several samplers);
- stochastic samplers: mean and variance of 2^14 samples started from the exact marginal at sigma_max;
- identities between samplers that are the same method written differently;
- BrownianNoise: the law of k-diffusion's Brownian tree, also against torchsde-run moments in the fixture.
"""

import math
from pathlib import Path

import pytest
import torch

from ldm.samplers import compvis, k, noise, unipc
from make_fixtures_samplers import MU, S, gaussian_denoiser

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "samplers_parity.pt"


pytestmark = pytest.mark.usefixtures("one_thread")


def exact(x, sigma_from, sigma_to):
    return MU + (x - MU) * math.sqrt((S**2 + sigma_to**2) / (S**2 + sigma_from**2))


def geometric(n, high=10.0, low=0.1):
    return torch.exp(torch.linspace(math.log(high), math.log(low), n + 1, dtype=torch.float64))


ORDERS = {  # name: (sampler, expected order, step counts)
    "euler": (k.sample_euler, 1, (16, 32, 64)),
    "ddim": (compvis.sample_ddim, 1, (16, 32, 64)),
    "heun": (k.sample_heun, 2, (16, 32, 64)),
    "dpm2": (k.sample_dpm_2, 2, (16, 32, 64)),
    "dpmpp_2m": (k.sample_dpmpp_2m, 2, (16, 32, 64)),
    "dpm_solver": (lambda d, x, s: k.sample_dpmpp_2m(d, x, s, lower_order_final=True), 2, (16, 32, 64)),
    # Adams-Bashforth with constant (uniform-step) coefficients on a non-uniform grid: second order
    "plms": (compvis.sample_plms, 2, (16, 32, 64)),
    # UniPC-p (predictor order p + corrector UniC) is of order p + 1 (Zhao et al. 2023, Thm 3.3); measured
    # without lower_order_final, whose first-order, corrector-free last step caps any order at 2
    "unipc_2": (lambda d, x, s: unipc.sample_unipc(d, x, s, order=2, lower_order_final=False), 3, (16, 32, 64)),
    "unipc_3": (lambda d, x, s: unipc.sample_unipc(d, x, s, order=3, lower_order_final=False), 4, (32, 64, 128)),
}


@pytest.mark.parametrize("name", list(ORDERS))
def test_convergence_order(name):
    sampler, order, counts = ORDERS[name]
    x = torch.linspace(-30, 30, 7, dtype=torch.float64)[:, None]
    errors = []
    for n in counts:
        sigmas = geometric(n)
        out = sampler(gaussian_denoiser, x, sigmas)
        errors.append((out - exact(x, 10.0, 0.1)).abs().max().item())
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    print(name, errors, observed)
    # the ratio of successive errors approaches 2^order; +-0.35 covers the pre-asymptotic drift measured
    # at these step counts (float64 rounding is far below the errors, >= 1e-9)
    # errors are against the exact solution, so a sampler converging to anything else would plateau
    assert all(abs(o - order) < 0.35 for o in observed), observed


def test_lms_is_at_least_second_order():
    """k-diffusion's LMS (order 4) starts with lower orders (Euler first), which limits it; measured ~3."""
    x = torch.linspace(-30, 30, 7, dtype=torch.float64)[:, None]
    errors = [(k.sample_lms(gaussian_denoiser, x, geometric(n)) - exact(x, 10.0, 0.1)).abs().max().item()
              for n in (16, 32, 64)]
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(2.5 < o < 4.5 for o in observed), observed


def ancestral_variance(sigmas, var):
    """Exact output variance of ancestral DDPM / DDIM eta=1 / Euler ancestral (the same chain) on the
    Gaussian model: x' - MU = a (x - MU) + sigma_next sqrt(1 - r) z, r = sigma_next^2 / sigma^2,
    a = r + (1 - r) S^2 / (S^2 + sigma^2)."""
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        r = sigma_next**2 / sigma**2
        a = r + (1 - r) * S**2 / (S**2 + sigma**2)
        var = a * a * var + sigma_next**2 * (1 - r)
    return var


def karras(n):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    hi, lo = 20.0 ** (1 / 7), 0.002 ** (1 / 7)
    return torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1, dtype=torch.float64)])


def start(sigmas, n=1 << 14, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = MU + math.sqrt(S**2 + sigmas[0].item() ** 2) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, g


@pytest.mark.parametrize("name", ["ddpm", "ddim_eta1", "euler_a"])
def test_ancestral_first_order_law(name):
    """Sharp: their exact output variance on this model (not N(MU, S^2): 25 steps are too few for a
    first-order chain) against 2^14 samples; 5 standard errors."""
    sampler = {"ddpm": compvis.sample_ddpm, "euler_a": k.sample_euler_ancestral,
               "ddim_eta1": lambda d, x, s, generator: compvis.sample_ddim(d, x, s, generator=generator, eta=1.0)}[name]
    sigmas = karras(25)
    x, g = start(sigmas)
    out = sampler(gaussian_denoiser, x, sigmas, generator=g)
    expected = ancestral_variance(sigmas, S**2 + sigmas[0].item() ** 2)
    n = out.shape[0]
    assert abs(out.mean().item() - MU) < 5 * math.sqrt(expected / n)
    assert abs(out.var().item() / expected - 1) < 5 * math.sqrt(2 / n)
    assert abs(expected / S**2 - 1) > 0.1  # the bias the exact law accounts for is real at 25 steps


@pytest.mark.parametrize("name", ["dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_stochastic_samplers_reach_the_data_law(name):
    """100 Karras steps: N(MU, S^2) up to sampling error (5 standard errors) plus a discretization
    allowance of 2% in variance (measured bias <= 0.6% for these second-order samplers)."""
    sampler = getattr(k, {"dpm2_a": "sample_dpm_2_ancestral", "dpmpp_2s_a": "sample_dpmpp_2s_ancestral"}.get(
        name, f"sample_{name}"))
    sigmas = karras(100)
    x, g = start(sigmas)
    out = sampler(gaussian_denoiser, x, sigmas, generator=g)
    n = out.shape[0]
    assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(out.var().item() / S**2 - 1) < 5 * math.sqrt(2 / n) + 0.02


def test_ddim_eta0_is_euler():
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)[:, None]
    sigmas = torch.cat([geometric(12, 14.6, 0.03), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(compvis.sample_ddim(gaussian_denoiser, x, sigmas),
                               k.sample_euler(gaussian_denoiser, x, sigmas), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("final", [0.0, 0.03])
def test_ddpm_equals_ddim_eta1_and_euler_ancestral(final):
    """One chain written three ways (posterior mean/variance; DDIM eta 1; Euler to sigma_down + sigma_up
    noise), drawing the same noise in the same order."""
    sigmas = torch.cat([geometric(8, 14.6, 0.1), torch.tensor([final], dtype=torch.float64)])
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)[:, None]
    runs = [compvis.sample_ddpm(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3)),
            compvis.sample_ddim(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), eta=1.0)]
    if final == 0.0:  # k-diffusion's Euler ancestral adds no noise on a step to 0 (nor does it at sigma 0)
        runs.append(k.sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3)))
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-12, atol=1e-12)


def test_lower_order_final_acts_only_on_short_runs_ending_above_zero():
    """The original --dpm_solver is dpmpp_2m with lower_order_final: with >= 15 steps, or a final 0 (both then
    take a first-order last step anyway), it changes nothing; on a short run ending above 0 it does."""
    sigmas = torch.cat([geometric(16, 14.6, 0.03), torch.zeros(1, dtype=torch.float64)])
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)[:, None]
    for run in (sigmas, sigmas[-6:], sigmas[:-1]):  # 16 steps to 0; 5 steps to 0; 15 steps to 0.03
        torch.testing.assert_close(k.sample_dpmpp_2m(gaussian_denoiser, x, run, lower_order_final=True),
                                   k.sample_dpmpp_2m(gaussian_denoiser, x, run), rtol=0, atol=0)
    short = sigmas[-6:-1]  # 4 steps to 0.03 > 0: the original's final step is first order, dpmpp_2m's not
    difference = (k.sample_dpmpp_2m(gaussian_denoiser, x, short, lower_order_final=True)
                  - k.sample_dpmpp_2m(gaussian_denoiser, x, short))
    assert difference.abs().max() > 1e-4


def test_plms_first_step_is_heun():
    """plms.py's "pseudo improved Euler" first step is Heun's method in sigma."""
    sigmas = torch.tensor([10.0, 4.0, 1.0], dtype=torch.float64)
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)[:, None]
    seen = []
    compvis.sample_plms(gaussian_denoiser, x, sigmas, callback=lambda info: seen.append(info["x"]))
    torch.testing.assert_close(seen[1], k.sample_heun(gaussian_denoiser, x, sigmas[:2]), rtol=1e-12, atol=1e-12)


def test_brownian_noise_has_the_brownian_tree_law():
    """dpmpp_sde's query pattern: per step [s, s_mid] then [s, s_next]. Each answer is N(0, 1); the two of
    a step have correlation sqrt((s - s_mid) / (s - s_next)); answers of different steps are independent.
    2^16 samples: correlation standard error ~0.004."""
    x = torch.zeros(1 << 16, dtype=torch.float64)
    sampler = noise.BrownianNoise(x, torch.Generator().manual_seed(0))
    levels = [(10.0, 6.0, 2.0), (2.0, 1.5, 0.5)]
    answers = []
    for high, mid, low in levels:
        answers += [sampler(torch.tensor(high), torch.tensor(mid)), sampler(torch.tensor(high), torch.tensor(low))]
    a = torch.stack(answers)
    corr = torch.corrcoef(a)
    torch.testing.assert_close(a.var(dim=1), torch.ones(4, dtype=torch.float64), rtol=0, atol=0.03)
    torch.testing.assert_close(corr[0, 1].item(), math.sqrt(4 / 8), rtol=0, atol=0.02)
    torch.testing.assert_close(corr[2, 3].item(), math.sqrt(0.5 / 1.5), rtol=0, atol=0.02)
    assert corr[0:2, 2:4].abs().max() < 0.02
    assert torch.equal(sampler(torch.tensor(0.5), torch.tensor(0.2)), sampler.draws[-1])  # fresh: plain randn
    with pytest.raises(ValueError):
        sampler(torch.tensor(3.0), torch.tensor(0.1))  # not a visited level


@pytest.mark.parametrize("key", ["dpmpp_sde_4", "dpmpp_sde_8", "dpmpp_2m_sde_6", "dpmpp_3m_sde_6"])
def test_sde_samplers_match_torchsde_moments(key):
    """Equal in distribution to k-diffusion with torchsde's BrownianTreeNoiseSampler: mean and variance
    of the output on the Gaussian model agree within 5 combined standard errors. For dpmpp_sde, the same
    run with INDEPENDENT noises per query (the wrong law) is shown to fail this check."""
    ref = torch.load(FIXTURE, weights_only=True)["moments"][key]
    sampler = getattr(k, f"sample_{ref['sampler']}")
    sigmas = ref["sigmas"]
    x, g = start(sigmas, n=1 << 15, seed=5)

    def moments_ok(out):
        n_ours, n_ref = out.shape[0], ref["n"]
        var_se = math.sqrt(2 / n_ours + 2 / n_ref) * ref["var"]
        mean_se = math.sqrt(ref["var"] / n_ours + ref["var"] / n_ref)
        return abs(out.mean().item() - ref["mean"]) < 5 * mean_se and abs(out.var().item() - ref["var"]) < 5 * var_se
    assert moments_ok(sampler(gaussian_denoiser, x, sigmas, generator=g))
    if ref["sampler"] == "dpmpp_sde":
        wrong = noise.default_noise_sampler(x, g)
        assert not moments_ok(sampler(gaussian_denoiser, x, sigmas, noise_sampler=wrong))
