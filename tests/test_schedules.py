"""Schedules against the originals: CompVis util.py / ddpm.py register_schedule, k-diffusion 0.1.1 sigma
lists and sigma_to_t, Stability's DPM-Solver time grid. Reference values: tests/fixtures/samplers_parity.pt
(tests/make_fixtures_samplers.py)."""

from pathlib import Path

import pytest
import torch

from ldm import schedules

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "samplers_parity.pt"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sqrt_linear", "sqrt"])
def test_beta_schedules_match_original(fx, kind):
    ours = schedules.make_beta_schedule(1000, 0.00085, 0.012, schedule=kind)
    ref = fx["schedules"]["betas"][kind]
    assert ours.dtype == torch.float64
    # Same float64 operations as util.py make_beta_schedule (torch.linspace, cos, sqrt), but torch's vectorised
    # float64 cos and sqrt round differently on other CPUs: up to 2.2e-16 absolute, 1.1e-13 relative where the
    # cosine schedule's betas are differences of nearby values, seen on an AVX-512 Xeon against fixtures
    # written on another machine; 1e-12 relative is ~4500 float64 ulps and nothing more.
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)


def test_alphas_cumprod_matches_register_schedule(fx):
    """ddpm.py register_schedule: np.cumprod in float64, stored float32. Bit-equal."""
    ours = schedules.alphas_cumprod_from_betas(schedules.make_beta_schedule()).to(torch.float32)
    assert torch.equal(ours, fx["alphas_cumprod"])


def test_make_beta_schedule_rejects_unknown():
    with pytest.raises(ValueError, match="linear"):
        schedules.make_beta_schedule(1000, schedule="scaled_linear")


@pytest.mark.parametrize("method", ["uniform", "quad"])
def test_ddim_timesteps_match_original_for_every_step_count(fx, method):
    """All S in 1..1000: the original's grid (length, sum, sum of squares) or, where the original indexes
    alphas_cumprod out of range (IndexError), our ValueError."""
    failures = set(fx["schedules"]["ddim_failures"][method].tolist())
    checksums = fx["schedules"]["ddim_checksums"][method]
    for steps in range(1, 1001):
        if steps in failures:
            with pytest.raises(ValueError, match="IndexError"):
                schedules.ddim_timesteps(steps, 1000, method)
            continue
        t = schedules.ddim_timesteps(steps, 1000, method)
        assert [len(t), int(t.sum()), int((t * t).sum())] == checksums[steps - 1].tolist(), steps
    if method == "uniform":  # the set the docstring of ddim_timesteps promises
        expected = {3, 9, 27, 36, 37} | set(range(101, 112)) | set(range(251, 334)) | set(range(501, 1001))
        assert failures == expected
    else:
        assert not failures


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5])
def test_ddim_timesteps_reject_bad_counts(steps):
    with pytest.raises(ValueError):
        schedules.ddim_timesteps(steps)


def test_ddim_sigma_list_uses_the_discrete_sigmas(fx):
    sigmas = schedules.discrete_sigmas(fx["alphas_cumprod"])
    ours = schedules.ddim_sigma_list(sigmas, 10)
    t = list(range(901, 0, -100))  # range(0, 1000, 100) + 1, from the top
    assert torch.equal(ours, torch.cat([sigmas[t], sigmas[:1]]))  # ends at alphas_cumprod[0], as ddim.py


def test_ddpm_sigma_list_with_all_steps_is_p_sample_loop(fx):
    sigmas = schedules.discrete_sigmas(fx["alphas_cumprod"])
    ours = schedules.ddpm_sigma_list(sigmas, 1000)
    assert torch.equal(ours, torch.cat([sigmas.flip(0), torch.zeros(1)]))


@pytest.mark.parametrize("key", ["uniform_1", "uniform_5", "uniform_20", "karras_20", "exponential_20"])
def test_k_sigma_lists_match_k_diffusion(fx, key):
    sigmas = schedules.discrete_sigmas(fx["alphas_cumprod"])
    schedule, steps = key.split("_")
    ours = schedules.k_sigma_list(sigmas, int(steps), schedule)
    ref = fx["k_schedules"][key]
    assert ours.dtype == torch.float32 and ours[-1] == 0
    # k-diffusion computes these in float32, we in float64: a few float32 ulps
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)


def test_sigma_to_t_matches_k_diffusion(fx):
    sigmas = schedules.discrete_sigmas(fx["alphas_cumprod"])
    probe = fx["k_schedules"]["probe_sigmas"]
    ours = schedules.sigma_to_t(probe, sigmas)
    # k-diffusion interpolates in float32 (log sigma to 1e-7 relative over steps of ~2e-3 in log sigma near
    # t = 999: up to ~2e-4 in t); we in float64
    torch.testing.assert_close(ours.float(), fx["k_schedules"]["probe_t"], rtol=0, atol=5e-4)
    assert ours.min() == 0 and ours.max() == 999  # clamped outside the schedule, as theirs
    quantized = schedules.sigma_to_t(probe, sigmas, quantize=True)
    assert torch.equal(quantized.long(), fx["k_schedules"]["probe_t_quantized"])


@pytest.mark.parametrize("interpolation", ["log_sigma", "log_alpha"])
def test_t_to_sigma_inverts_sigma_to_t(fx, interpolation):
    sigmas = schedules.discrete_sigmas(fx["alphas_cumprod"])
    t = torch.linspace(0, 999, 4001, dtype=torch.float64)
    back = schedules.sigma_to_t(schedules.t_to_sigma(t, sigmas, interpolation).float(), sigmas,
                                interpolation=interpolation)
    # through float32 sigmas: 6e-8 relative in sigma is < 1e-3 in t even where sigma moves slowest
    torch.testing.assert_close(back, t, rtol=0, atol=1e-3)
    assert torch.equal(schedules.t_to_sigma(torch.arange(1000.0), sigmas, interpolation).float(), sigmas)


@pytest.mark.parametrize("skip", ["time_uniform", "time_quadratic"])
def test_dpm_solver_grid_matches_stability(fx, skip):
    sigmas = schedules.discrete_sigmas(fx["alphas_cumprod"])
    ref = fx["dpm_solver_grid"][skip]
    ours = schedules.dpm_solver_sigma_list(sigmas, 10, skip)
    # Stability's NoiseScheduleVP works in float32 (sqrt(1 - alpha^2) loses ~1e-7 / sigma^2 relative at the
    # low end, where sigma_VP^2 ~ 1e-3)
    torch.testing.assert_close(ours, ref["sigma"], rtol=1e-4, atol=0)
    t = schedules.sigma_to_t(ours, sigmas, interpolation="log_alpha")
    torch.testing.assert_close(t.float(), ref["t_input"], rtol=0, atol=2e-4)
    assert ours[0] == sigmas[-1] and ours[-1] == sigmas[0]  # from T = 1 (t = 999) to t_0 = 1/N (t = 0)
