"""SDXL (generative-models / sgm) modules against the ORIGINAL code, and the loader against the full manifests.

Fixtures: tests/make_fixtures_sdxl.py ran sgm's own DiffusionEngine, conditioner, denoiser, discretizers and
samplers (from a checkout of Stability-AI/generative-models) on the tiny SDXL base and refiner
(tests/configs/tiny-sdxl-*.yaml) with the random checkpoints of tests/tiny_models.py; here ldm's modules run on
the same inputs. Tolerances are float32 rounding of other op orders, measured: CLIP's attention (fused SDPA here,
transformers' eager softmax there) 1.4e-6 on contexts up to 4.5; the UNet 3.5e-6 on outputs up to 2.4; the VAE
3.4e-6; everything else (open_clip tower, size embeddings, sigma tables, discretizations, the samplers' own
arithmetic on a closed-form denoiser) is bit for bit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ldm
from ldm import samplers, schedules
from ldm.config import ConfigError, load_config
from ldm.config_sgm import DiffusionEngineConfig
from ldm.denoisers import CFGDenoiser, Denoiser
from ldm.loader import plan_load
from make_fixtures_sdxl import (CONFIGS, CKPT_SEED, DENOISER_SIGMAS, GRID_STEPS, NEGATIVES, PROMPTS, SEED,
                                STRENGTHS, TOY_CASES, TOY_STEPS, VALUES, WRAPPED_STEPS, state_digest,
                                toy_conditioning)
from manifests import load_manifest
from tiny_models import make_tiny_checkpoint, tiny_config_path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sdxl_modules.safetensors"
SGM_CONFIGS = ROOT / "configs" / "sgm"
# configs/sgm/<name> are the upstream files byte for byte: configs/inference/<name> of
# Stability-AI/generative-models@0ad7de9a5cb53fd63d6d30a4f385485e72e08597
ORIGINAL_SHA256 = {
    "sd_xl_base.yaml": "58908df2c3146a9b29b1926d7b9ac933cad81f249b5b1237bf27233b90ad6382",
    "sd_xl_refiner.yaml": "31bdd7333e8b4771f70dcb542b7a4d41ae8b79f679ca32d314fd521c2e73c110",
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(FIXTURE), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def models(tmp_path_factory, reference):
    root = tmp_path_factory.mktemp("sdxl")
    out = {}
    for name, config in CONFIGS.items():
        ckpt = make_tiny_checkpoint(tiny_config_path(config), root / f"{config}.safetensors", seed=CKPT_SEED)
        from safetensors.torch import load_file

        assert state_digest(load_file(str(ckpt))) == reference[1][f"checkpoint_digest.{name}"], \
            "tests/tiny_models.py now makes other weights: rerun tests/make_fixtures_sdxl.py"
        out[name] = ldm.load_model(tiny_config_path(config), ckpt)
    return out


def assert_close(got, expected, atol, what=""):
    assert got.shape == expected.shape, what
    error = (got.double() - expected.double()).abs().max().item()
    assert error <= atol, f"{what}: max abs error {error:.3g} > {atol:.3g}"


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", sorted(ORIGINAL_SHA256))
def test_shipped_sgm_configs_are_the_original_files(name):
    assert hashlib.sha256((SGM_CONFIGS / name).read_bytes()).hexdigest() == ORIGINAL_SHA256[name]
    assert sorted(p.name for p in SGM_CONFIGS.glob("*.yaml")) == sorted(ORIGINAL_SHA256)


def test_sgm_configs_read_strictly():
    base, refiner = (load_config(SGM_CONFIGS / n) for n in ("sd_xl_base.yaml", "sd_xl_refiner.yaml"))
    assert isinstance(base, DiffusionEngineConfig) and ldm.load_config(SGM_CONFIGS / "sd_xl_base.yaml") == base
    assert base.scale_factor == refiner.scale_factor == 0.13025
    assert [e.input_key for e in base.conditioner] == ["txt", "txt", "original_size_as_tuple",
                                                       "crop_coords_top_left", "target_size_as_tuple"]
    assert [e.input_key for e in refiner.conditioner] == ["txt", "original_size_as_tuple", "crop_coords_top_left",
                                                          "aesthetic_score"]
    clip, bigg = base.conditioner[0].params, base.conditioner[1].params
    assert (clip.layer, clip.layer_idx, clip.text_config.hidden_size, clip.text_config.num_hidden_layers) == \
        ("hidden", 11, 768, 12)
    assert (bigg.layer, bigg.legacy, bigg.always_return_pooled, bigg.embed_dim) == ("penultimate", False, True, 1280)
    assert (bigg.text_cfg.width, bigg.text_cfg.heads, bigg.text_cfg.layers) == (1280, 20, 32)
    unet = base.unet.unet_config()  # sgm's UNet has no `legacy`: heads as legacy=False
    assert (unet.legacy, unet.transformer_depth, unet.context_dim, unet.adm_in_channels) == (False, (1, 2, 10), 2048,
                                                                                             2816)
    assert refiner.unet.unet_config().context_dim == (1280,) * 4 and refiner.unet.transformer_depth == 4
    assert base.first_stage.ddconfig.attn_type == "vanilla-xformers"
    assert base.first_stage.lossconfig.target == "torch.nn.Identity"
    assert base.denoiser.discretization_config.linear_end == 0.012


def _leaves(obj, data: dict, where: str, section_fields: dict) -> None:
    """Every value of the yaml mapping `data` is the same value on the dataclass `obj` ({target, params}
    sections descend into params; `section_fields` renames yaml sections to fields)."""
    import dataclasses

    for key, value in data.items():
        attr = getattr(obj, section_fields.get(key, key))
        if isinstance(value, dict) and dataclasses.is_dataclass(attr):
            if hasattr(attr, "target") and "target" in value:
                assert attr.target == value["target"], f"{where}.{key}.target"
            _leaves(attr, (value.get("params") or {}) if "target" in value else value, f"{where}.{key}", {})
        elif isinstance(value, dict) and "target" in value:  # a section read into its params' dataclass
            _leaves(attr, value.get("params") or {}, f"{where}.{key}.params", {})
        elif isinstance(value, list) and value and isinstance(value[0], dict):  # emb_models
            for i, (item, entry) in enumerate(zip(attr, value)):
                assert item.target == entry["target"], f"{where}.{key}[{i}]"
                _leaves(item.params, entry.get("params") or {}, f"{where}.{key}[{i}].params", {})
                _leaves(item, {k: v for k, v in entry.items() if k not in ("target", "params")}, f"{where}[{i}]", {})
        else:
            expected = tuple(value) if isinstance(value, list) else value
            assert attr == expected, f"{where}.{key}: {attr!r} != {value!r}"


@pytest.mark.parametrize("path", sorted(SGM_CONFIGS.glob("*.yaml")) + [tiny_config_path(c) for c in CONFIGS.values()],
                         ids=lambda p: p.name)
def test_every_sgm_yaml_value_lands_in_the_dataclass(path):
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)["model"]
    cfg = load_config(path)
    assert cfg.target == data["target"]
    params = dict(data["params"])
    conditioner = params.pop("conditioner_config")
    assert len(cfg.conditioner) == len(conditioner["params"]["emb_models"])
    _leaves(cfg, {**params, "conditioner": conditioner["params"]["emb_models"]}, "model.params",
            {"network_config": "unet", "denoiser_config": "denoiser", "first_stage_config": "first_stage"})


def _variant(tmp_path, old, new):
    text = (SGM_CONFIGS / "sd_xl_base.yaml").read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "variant.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("old, new, message", [
    ("        num_head_channels: 64", "        num_head_channel: 64", "network_config.params.'num_head_channel'"),
    ("              layer_idx: 11", "              layer_index: 11", "emb_models[0].params.'layer_index'"),
    ("              legacy: False", "              legacy: False\n              context: 77", "'context'"),
    ("            input_key: crop_coords_top_left", "            input_keys: [a]", "needs input_key"),
    ("        num_idx: 1000", "        num_idx: 500", "unsupported value model.params.denoiser_config.params.num_idx"),
    ("denoiser_scaling.EpsScaling", "denoiser_scaling.VScaling", "scaling_config.target"),
    ("    scale_factor: 0.13025", "    scale_factr: 0.13025", "model.params.'scale_factr'"),
    ("              layer: penultimate", "              layer: pooled", "layer='pooled' must be one of"),
    ("              always_return_pooled: True\n              legacy: False",
     "              always_return_pooled: True", "always_return_pooled needs legacy: False"),
    ("        spatial_transformer_attn_type: softmax-xformers", "        spatial_transformer_attn_type: linear",
     "unsupported value"),
])
def test_bad_sgm_configs_are_clear_errors(tmp_path, old, new, message):
    path = _variant(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------- loader
@pytest.mark.parametrize("manifest, config", [("sd_xl_base_1.0", "sd_xl_base"), ("sd_xl_refiner_1.0", "sd_xl_refiner")])
@pytest.mark.parametrize("with_sigmas", [True, False], ids=["sigmas", "no-sigmas"])
def test_every_key_of_the_released_sdxl_files_is_accounted_for(manifest, config, with_sigmas):
    shapes = load_manifest(manifest)
    if not with_sigmas:  # `denoiser.sigmas` is accepted, never required
        shapes = {k: v for k, v in shapes.items() if k != "denoiser.sigmas"}
    model = ldm.build_model(load_config(SGM_CONFIGS / f"{config}.yaml"), device="meta")
    plan = plan_load(model, shapes)
    assert plan.missing == [] and plan.unexpected == [] and plan.mismatched == [] and plan.reshaped == set()
    targets = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert set(plan.sources) == set(targets) and len(set(plan.sources.values())) == len(targets)
    assert set(plan.sources.values()) | set(plan.ignored) == set(shapes)
    expected = {"CLIP position_ids"} if config == "sd_xl_base" else set()
    if with_sigmas:
        expected.add("denoiser sigmas")
    assert set(plan.ignored.values()) == expected
    assert not plan.use_ema  # the releases have no model_ema.*


def test_stored_sigmas_are_compared_with_the_config(tmp_path):
    config = tiny_config_path("tiny-sdxl-base")
    from tiny_models import tiny_state_dict
    from safetensors.torch import save_file

    state = tiny_state_dict(config)
    state["denoiser.sigmas"] = state["denoiser.sigmas"] * 1.01
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.warns(UserWarning, match="denoiser.sigmas differs"):
        ldm.load_model(config, tmp_path / "odd.safetensors")


# ------------------------------------------------------------------------------------------ module parity
@pytest.mark.parametrize("name", list(CONFIGS))
def test_conditioner_matches_sgm(models, reference, name):
    ref, _ = reference
    model = models[name]
    with torch.no_grad():
        batch = model.batch(PROMPTS, VALUES)
        batch_uc = model.batch(NEGATIVES, VALUES, negative=True)
        got = {"cond": model.conditioner(batch), "uncond_zero": model.conditioner(batch_uc, ["txt"]),
               "uncond": model.conditioner(batch_uc)}
        # the model's own entry points: text zeroed for the base unless a negative prompt is given
        assert torch.equal(model.conditioning(PROMPTS, VALUES)["crossattn"], got["cond"]["crossattn"])
        uncond = model.unconditional_conditioning(NEGATIVES, VALUES)
        assert torch.equal(uncond["vector"], got["uncond"]["vector"])  # a negative prompt: encoded
        blank = model.unconditional_conditioning(["", ""], VALUES)["crossattn"]
        assert (blank.abs().max() == 0) == (name == "base")  # "" on the base: zeros; the refiner encodes it
    for tag, cond in got.items():
        assert set(cond) == {"crossattn", "vector"}
        for key, value in cond.items():
            expected = ref[f"{name}.{tag}.{key}"]
            # CLIP-L's attention: fused SDPA here, eager softmax in transformers (1.4e-6 measured); open_clip's
            # tower and the size / score embeddings are the same ops (0 measured on the CPU that made the
            # fixture; on an AVX-512 AMD EPYC the same ops sum in another order: up to 1.3e-6), so float32
            # rounding of a ~1e0 value over a few dozen layers bounds them all
            assert_close(value, expected, 5e-6, f"{tag}.{key}")
    zero = ref[f"{name}.uncond_zero.vector"]
    pooled = 32  # the tiny bigG's embed_dim: the text part of the vector, zeroed
    assert zero[:, :pooled].abs().max() == 0 and zero[:, pooled:].abs().max() > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_and_denoiser_match_sgm(models, reference, name):
    ref, _ = reference
    model = models[name]
    cond = {k: ref[f"{name}.cond.{k}"] for k in ("crossattn", "vector")}
    x, t = ref[f"{name}.x"], ref[f"{name}.t"]
    with torch.no_grad():
        # 3.5e-6 measured on outputs up to 2.4 (the same ops summed in another order)
        assert_close(model.unet(x, t, cond["crossattn"], y=cond["vector"]), ref[f"{name}.unet"], 2e-5, "unet")
        assert torch.equal(model.sigmas, ref[f"{name}.sigmas"])  # sgm's float32 rounding of the table
        for i, _ in enumerate(DENOISER_SIGMAS):
            sigma = ref[f"{name}.denoiser.{i}.sigma"]
            # x + eps * (-sigma_q): the UNet's rounding times sigma up to 14.6 (6.1e-5 measured)
            assert_close(model.denoiser(x, sigma, cond), ref[f"{name}.denoiser.{i}"], 3e-4, f"denoiser {i}")


def test_denoiser_quantizes_sigma_as_sgm():
    sigmas = schedules.sgm_sigmas(schedules.sgm_alphas_cumprod())
    seen = []

    def model_fn(x, t, cond):
        seen.append(t)
        return torch.ones_like(x)

    denoiser = Denoiser(model_fn, schedules.sgm_alphas_cumprod().float(), quantize_sigma=True, sigmas=sigmas)
    # between table entries 500 and 501, nearer 500 in sigma but nearer 501 in log sigma (the geometric mean
    # of the two lies at 0.49958 of the interval)
    lo, hi = sigmas[500].double(), sigmas[501].double()
    sigma = torch.tensor([lo + 0.4999 * (hi - lo), 0.5, 100.0], dtype=torch.float32)
    x = torch.zeros(3, 1, 1, 1)
    denoised = denoiser(x, sigma)
    index = seen[0]
    assert index.dtype == torch.int64 and index[0] == 500 and index[2] == 999
    assert schedules.sigma_to_t(sigma[:1], sigmas, quantize=True) == 501  # log sigma would pick the other
    # c_out = -sigma_q: the QUANTIZED sigma
    assert torch.equal(denoised.flatten(), -sigmas[index])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vae_matches_sgm(models, reference, name):
    ref, _ = reference
    model = models[name]
    image = ref[f"{name}.vae.image"]
    with torch.no_grad():
        posterior = model.vae.encode(image)
        assert_close(posterior.parameters, ref[f"{name}.vae.moments"], 2e-5, "moments")  # 2.9e-6 measured
        # sgm's regularizer draws randn(mean.shape) from the seeded global generator: ours from the generator
        z = model.get_first_stage_encoding(posterior, torch.Generator().manual_seed(SEED))
        assert_close(z, ref[f"{name}.vae.z"], 5e-6, "z")  # 4.2e-7 measured
        assert_close(model.decode_first_stage(ref[f"{name}.vae.z"]), ref[f"{name}.vae.decoded"], 2e-5, "decode")


# ------------------------------------------------------------------------------------------ discretizations
def test_discretizations_and_wrappers_are_sgm_bit_for_bit(reference):
    ref, _ = reference
    sigmas = schedules.sgm_sigmas(schedules.sgm_alphas_cumprod())
    for n in GRID_STEPS:
        for schedule in ("uniform", "karras"):
            got = schedules.sgm_sigma_list(sigmas, n, schedule)
            assert torch.equal(got, ref[f"grid.{schedule}.{n}"]), (schedule, n)
        full = schedules.sgm_sigma_list(sigmas, n)
        for s in STRENGTHS if n in WRAPPED_STEPS else []:
            assert torch.equal(schedules.img2img_sigmas(full, s), ref[f"grid.img2img.{n}.{s}"]), (n, s)
            assert torch.equal(schedules.txt2noisy_sigmas(full, s, n), ref[f"grid.txt2noisy.{n}.{s}"]), (n, s)
    # the examples: no +1 offset, 0.3 of 10 steps keeps 2 steps
    ac = schedules.sgm_alphas_cumprod()
    assert torch.equal(schedules.sgm_sigma_list(sigmas, 10)[:2], sigmas[[999, 899]])
    assert len(schedules.img2img_sigmas(schedules.sgm_sigma_list(sigmas, 10), 0.3)) == 3
    assert float(sigmas[999]) == pytest.approx(float(((1 - ac[999]) / ac[999]).sqrt()), rel=1e-6)


class _ToyDenoiser:
    """The fixture's toy_denoiser behind ldm's denoiser interface (sigmas: sgm's table)."""

    sigmas = schedules.sgm_sigmas(schedules.sgm_alphas_cumprod())
    alphas_cumprod = schedules.sgm_alphas_cumprod().float()

    def replace(self, **changes):
        return self

    def __call__(self, x, sigma, cond=None):
        s = sigma[:, None, None, None]
        return (x + cond["vector"][:, :1, None, None] * s**2) / (1 + s**2)


@pytest.mark.parametrize("case", list(TOY_CASES))
def test_samplers_are_sgm_op_for_op(reference, case):
    """sgm's samplers as the demo builds them, on a closed-form denoiser: the samplers' arithmetic (grids, the
    start x_T * sqrt(1 + sigma_0^2), steps, per-step noise draws, churn) bit for bit."""
    ref, _ = reference
    ours, schedule, settings = TOY_CASES[case]
    cond, uncond = toy_conditioning()
    denoiser = CFGDenoiser(_ToyDenoiser(), 5.0, cond=cond, uncond=uncond, skip_at_one=False)
    options = {k.split(" #")[0]: v for k, v in settings.items()}
    if options:
        options.setdefault("s_tmax", 999.0)  # the demo's default
    generator = torch.Generator().manual_seed(SEED)
    x_T = torch.randn(2, 4, 8, 8, generator=generator)
    got = samplers.sample(denoiser, x_T, sampler=samplers.resolve(ours, "sgm"), steps=TOY_STEPS, schedule=schedule,
                          options=options, generator=generator, disable=True)
    # lms too: its coefficients integrate the same polynomial exactly here and by quadrature there, with the
    # same float32 denominators (k-diffusion's float64 ones, ldm.samplers.k, differ by 7.6e-6 on |x| <= 8.3)
    assert_close(got, ref[f"toy.{case}"], 0.0, case)


def test_ancestral_samplers_draw_at_every_step():
    """sgm draws randn_like at the last step too (and adds it only where sigma_next > 0): after a run the
    generator has moved by one draw per step, one more than k-diffusion's euler_a."""
    cond, uncond = toy_conditioning()
    denoiser = CFGDenoiser(_ToyDenoiser(), 5.0, cond=cond, uncond=uncond, skip_at_one=False)
    states = {}
    for name in ("sgm_euler_a", "euler_a"):
        generator = torch.Generator().manual_seed(0)
        samplers.sample(denoiser, torch.zeros(2, 4, 8, 8), sampler=name, steps=4,
                        schedule="uniform", generator=generator, disable=True)
        states[name] = torch.randn(1, generator=generator)
    reference = torch.Generator().manual_seed(0)
    for _ in range(4):
        torch.randn(2, 4, 8, 8, generator=reference)
    assert torch.equal(states["sgm_euler_a"], torch.randn(1, generator=reference))
    assert not torch.equal(states["sgm_euler_a"], states["euler_a"])
