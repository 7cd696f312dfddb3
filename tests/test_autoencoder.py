"""KL autoencoder: checkpoint layout, parity with independent references, posterior sampling.

Reference outputs come from tests/fixtures/vae_tiny.safetensors, written by tests/make_fixtures_vae.py
(diffusers' AutoencoderKL loaded through diffusers' own original-checkpoint converter, and the original
CompVis code; versions and file hashes are in the file's metadata). No reference package is imported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ldm.config import AutoencoderConfig, DDConfig, load_config
from ldm.models.autoencoder import AttnBlock, AutoencoderKL, DiagonalGaussianDistribution
from manifests import load_manifest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "vae_tiny.safetensors"


# float32 throughout. Our graph differs from the references only in op order: SDPA versus bmm + softmax in the
# attention, F.silu versus x * sigmoid(x), fused versus separate bias adds. Each differs by ~1 ulp (6e-8
# relative) and the tiny VAE chains ~20 layers; measured max |ours - ref| / max |ref| is ~1e-6 (and diffusers
# vs the original CompVis code differ by the same ~1.5e-6). 1e-5 leaves a ~6x margin and still catches
# real errors: GroupNorm eps 1e-5 instead of 1e-6 gives ~2e-5, the pad on the wrong side ~1.
RTOL = 1e-5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to the reference's scale (elementwise ratios blow up near zero)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def dd_config(**overrides) -> DDConfig:
    fields = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 2),
                  num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    fields.update(overrides)
    return DDConfig(**fields)


@pytest.fixture(scope="module")
def fixture():
    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    exponents, offsets = json.loads(meta["weight_exponents"]), json.loads(meta["weight_offsets"])
    # weights are offset + int8 * 2**-exponent, exact in float32 (see make_fixtures_vae.py)
    weights = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
    weights = {k: offsets[k] + v.to(torch.float32) * 2.0 ** -exponents[k] for k, v in weights.items()}
    return meta, tensors, weights


def build(meta: dict, ddconfig_key: str) -> AutoencoderKL:
    raw = json.loads(meta[ddconfig_key])
    dd = DDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    torch.manual_seed(0)  # the init is overwritten by load_state_dict; seeded only to keep runs identical
    return AutoencoderKL(AutoencoderConfig(ddconfig=dd, embed_dim=json.loads(meta["embed_dim"]))).eval()


def load(vae: AutoencoderKL, weights: dict, keys: list[str] | None = None) -> AutoencoderKL:
    vae.load_state_dict({k: weights[k] for k in (keys or weights)}, strict=True)
    return vae


def test_tiny_layout_matches_original(fixture):
    # the fixture's key list is the original modules' state_dict, with and without level attention
    meta, _, weights = fixture
    ours = build(meta, "ddconfig_attn").state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in weights.items()}
    assert any(".down.1.attn.0." in k for k in ours) and any(".up.1.attn.1." in k for k in ours)
    assert sorted(build(meta, "ddconfig").state_dict()) == json.loads(meta["keys_no_attn"])


@pytest.mark.parametrize("reference, ddconfig_key", [("diffusers", "ddconfig"), ("original", "ddconfig"),
                                                     ("original_attn", "ddconfig_attn")])
def test_parity(fixture, reference, ddconfig_key):
    meta, tensors, weights = fixture
    keys = json.loads(meta["keys_no_attn"]) if ddconfig_key == "ddconfig" else None
    vae = load(build(meta, ddconfig_key), weights, keys)
    image, z = tensors["input.image"], tensors["input.z"]
    with torch.no_grad():
        posterior = vae.encode(image)
        decoded = vae.decode(z)
    errors = {
        "mean": rel_err(posterior.mean, tensors[f"{reference}.mean"]),
        "logvar": rel_err(posterior.logvar, tensors[f"{reference}.logvar"]),
        "decoded": rel_err(decoded, tensors[f"{reference}.decoded"]),
    }
    assert max(errors.values()) < RTOL, errors
    assert torch.equal(posterior.mode(), posterior.mean)
    # decode does not clamp: the random-weight reference leaves [-1, 1], and so must we
    assert decoded.abs().max() > 1.0


def test_attention_matches_original_math():
    # model.py AttnBlock: w = softmax(q^T k * C**-0.5) over keys, h = v w^T, then proj_out and the residual
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (proj(h).reshape(2, 64, 35) for proj in (block.q, block.k, block.v))
        w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * 64 ** -0.5, dim=2)
        expected = x + block.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(2, 64, 5, 7))
        assert rel_err(block(x), expected) < RTOL


def test_attention_hands_the_fused_kernels_unit_stride_inputs(monkeypatch):
    # torch's fused SDPA kernels need unit stride along the head dimension; given a transposed view the CPU
    # falls back to the explicit form with its (H*W)^2 score matrix (17 GB for a 2048 px decode)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append([t.stride(-1) for t in (q, k, v)])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    block = AttnBlock(64).eval()
    with torch.no_grad():
        block(torch.randn(2, 64, 5, 7))
    assert seen == [[1, 1, 1]]


def test_sample_reproducible_and_drawn_from_generator():
    torch.manual_seed(0)
    params = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    posterior = DiagonalGaussianDistribution(params)
    first = posterior.sample(torch.Generator().manual_seed(123))
    again = posterior.sample(torch.Generator().manual_seed(123))
    assert torch.equal(first, again)
    assert not torch.equal(first, posterior.sample(torch.Generator().manual_seed(124)))
    # noise is drawn in float32 on the generator's (CPU) device, then cast to the posterior's dtype
    noise = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(123))
    assert first.dtype == torch.float64
    assert torch.equal(first, posterior.mean + posterior.std * noise.to(torch.float64))
    # without a generator, torch's global CPU generator is used
    torch.manual_seed(7)
    unseeded = posterior.sample()
    torch.manual_seed(7)
    assert torch.equal(unseeded, posterior.mean + posterior.std * torch.randn(2, 4, 3, 5).to(torch.float64))


def test_posterior_clamp_and_kl():
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 4, 1, 1)
    logvar = torch.tensor([-100.0, 0.3, 100.0, -2.0]).reshape(1, 4, 1, 1)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    clamped = torch.tensor([-30.0, 0.3, 20.0, -2.0]).reshape(1, 4, 1, 1)  # distributions.py clamps to [-30, 20]
    assert torch.equal(posterior.mean, mean) and torch.equal(posterior.logvar, clamped)
    assert torch.allclose(posterior.std, torch.exp(0.5 * clamped)) and torch.allclose(posterior.var, clamped.exp())
    # closed-form Gaussian KL from torch.distributions, summed over (C, H, W)
    normal = torch.distributions.Normal
    prior_kl = torch.distributions.kl_divergence(normal(mean, posterior.std), normal(0.0, 1.0)).sum(dim=[1, 2, 3])
    assert torch.allclose(posterior.kl(), prior_kl, rtol=1e-6)
    other = DiagonalGaussianDistribution(torch.cat([mean.flip(1), logvar.clamp(-3, 3).flip(1)], dim=1))
    pair_kl = torch.distributions.kl_divergence(normal(mean, posterior.std), normal(other.mean, other.std))
    assert torch.allclose(posterior.kl(other), pair_kl.sum(dim=[1, 2, 3]), rtol=1e-6)


def test_forward_uses_generator(fixture):
    meta, tensors, weights = fixture
    vae = load(build(meta, "ddconfig"), weights, json.loads(meta["keys_no_attn"]))
    image = tensors["input.image"]
    with torch.no_grad():
        decoded, posterior = vae(image, generator=torch.Generator().manual_seed(5))
        expected = vae.decode(posterior.sample(torch.Generator().manual_seed(5)))
        assert torch.equal(decoded, expected)
        assert torch.equal(vae(image, sample_posterior=False)[0], vae.decode(posterior.mean))


@pytest.mark.parametrize("option", [dict(resamp_with_conv=False), dict(use_linear_attn=True),
                                    dict(attn_type="linear"), dict(double_z=False)])
def test_unsupported_options_fail(option):
    with pytest.raises(ValueError):
        AutoencoderKL(AutoencoderConfig(ddconfig=dd_config(**option), embed_dim=4))


@pytest.mark.parametrize("name", ["v1-inference", "v1-inpainting-inference", "v2-inference-v"])
def test_full_size_keys_match_manifest(name):
    expected = {k[len("first_stage_model."):]: v for k, v in load_manifest(name).items()
                if k.startswith("first_stage_model.")}
    cfg = load_config(REPO / "configs" / "stable-diffusion" / f"{name}.yaml")
    with torch.device("meta"):
        vae = AutoencoderKL(cfg.first_stage)
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == expected


def test_deterministic_posterior_and_nll():
    # Regression: distributions.py DiagonalGaussianDistribution(parameters, deterministic=False) and its nll;
    # deterministic makes std and var zero (sample == mean, still drawing noise) and kl / nll zero.
    params = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0))
    point = DiagonalGaussianDistribution(params, deterministic=True)
    assert point.parameters is params and torch.equal(point.std, torch.zeros(2, 4, 3, 5))
    assert torch.equal(point.sample(torch.Generator().manual_seed(1)), point.mean)
    assert torch.equal(point.kl(), torch.zeros(1)) and torch.equal(point.nll(point.mean), torch.zeros(1))
    posterior = DiagonalGaussianDistribution(params)
    sample = posterior.sample(torch.Generator().manual_seed(1))
    # the Gaussian negative log-density from torch.distributions, summed over (C, H, W)
    expected = -torch.distributions.Normal(posterior.mean, posterior.std).log_prob(sample).sum(dim=[1, 2, 3])
    assert torch.allclose(posterior.nll(sample), expected, rtol=1e-5)


def test_inputs_are_cast_to_the_weights_dtype():
    # Regression: the original ran half models under autocast, which casts the inputs; without it a float32
    # image into a float64 (or float16) VAE was a dtype error. Results come back in the weights' dtype.
    vae = AutoencoderKL(AutoencoderConfig(ddconfig=dd_config(), embed_dim=4)).eval()
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        reference = vae.decode(vae.encode(image).mean)
        vae.double()
        posterior = vae.encode(image)
        decoded = vae.decode(posterior.mean.float())
    assert posterior.mean.dtype == decoded.dtype == torch.float64
    assert rel_err(decoded.float(), reference) < RTOL
