"""ldm.config: the original yaml files read into frozen dataclasses; unknown fields and targets fail loudly."""

import dataclasses
import hashlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.config import (
    CLIPTextConfig, ConfigError, LatentDiffusionConfig, OpenCLIPTextConfig, load_config, parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = sorted((ROOT / "configs" / "stable-diffusion").glob("*.yaml"))
CONTROLNET = sorted((ROOT / "configs" / "controlnet").glob("*.yaml"))  # checked by tests/test_controlnet.py
# the CompVis / Stability layout ones (the sgm (SDXL) ones: tests/test_sdxl_modules.py)
TINY = sorted(p for p in (ROOT / "tests" / "configs").glob("*.yaml") if not p.name.startswith("tiny-sdxl"))
# The shipped configs are byte-for-byte copies of the originals. Recorded here: the sha256 of each original file as
# the upstream repository has it (repository @ commit, path), computed from those trees when they were copied.
ORIGINAL_SHA256 = {
    "v1-inference.yaml": ("20b7f0acae54d1f88384a6ca15b5d62c0ee4fbbca07ff72f3761fe936083210d",
                          "CompVis/stable-diffusion@21f890f9da3cfbeaba8e2ac3c425ee9e998d5229"),
    "v1-inpainting-inference.yaml": ("baf37f7d667df422eb370712ed98eb2c590499752ae454568d72b293549253d7",
                                     "runwayml/stable-diffusion@08ab4d326c96854026c4eb3454cd3b02109ee982"),
    "v2-inference.yaml": ("ec4094bd36ef558cd9d52c9985471ac91d2c0c5bd071717411a4ccd5adf4f311",
                          "Stability-AI/stablediffusion@cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf"),
    "v2-inference-v.yaml": ("72b092aadfe146f5d3f395a720c0aa3b2354b2095e3f10dc18f0e9716d286dcb",
                            "Stability-AI/stablediffusion@cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf"),
    "v2-inpainting-inference.yaml": ("821a51ee6a8f3a62e7f2002557fcb4f4ae97a2ab3cb3fb85942897d536fa8b2c",
                                     "Stability-AI/stablediffusion@cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf"),
}
SECTION_FIELD = {"unet_config": "unet", "first_stage_config": "first_stage", "cond_stage_config": "cond_stage",
                 "control_stage_config": "control_stage"}


def _yaml(path):
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _as_config_value(value):
    return tuple(_as_config_value(v) for v in value) if isinstance(value, list) else value


def _check_leaves(obj, data, where):
    """Every value in the yaml mapping `data` is the same value on the dataclass `obj`."""
    for key, value in data.items():
        attr = getattr(obj, SECTION_FIELD.get(key, key))
        if dataclasses.is_dataclass(attr) and isinstance(value, dict):
            if "params" in value or "target" in value and hasattr(attr, "target"):  # {target, params} section
                if hasattr(attr, "target"):
                    assert attr.target == value["target"], f"{where}.{key}.target"
                if key == "lossconfig" or key == "scheduler_config":
                    assert attr.params == value.get("params", {}), f"{where}.{key}.params"
                else:
                    _check_leaves(attr, value.get("params") or {}, f"{where}.{key}.params")
            else:
                _check_leaves(attr, value, f"{where}.{key}")
        else:
            assert attr == _as_config_value(value), f"{where}.{key}: {attr!r} != {value!r}"


@pytest.mark.parametrize("path", ORIGINAL + CONTROLNET + TINY, ids=lambda p: p.name)
def test_every_yaml_value_lands_in_the_dataclass(path):
    cfg = load_config(path)
    data = _yaml(path)["model"]
    assert cfg.target == data["target"]
    assert cfg.base_learning_rate == data.get("base_learning_rate")  # the ControlNet yamls have none
    _check_leaves(cfg, data["params"], "model.params")


def test_the_original_configs_are_shipped():
    assert [p.name for p in ORIGINAL] == [
        "v1-inference.yaml", "v1-inpainting-inference.yaml", "v2-inference-v.yaml", "v2-inference.yaml",
        "v2-inpainting-inference.yaml"]
    assert [p.name for p in TINY] == sorted(p.name for p in TINY) and {p.name for p in TINY} >= {
        "tiny-cldm-13.yaml", "tiny-cldm.yaml", "tiny-v1-inpainting-f8.yaml", "tiny-v1-inpainting.yaml", "tiny-v1-lora.yaml", "tiny-v1.yaml",
        "tiny-v2-inpainting.yaml", "tiny-v2-lora.yaml", "tiny-v2-v.yaml", "tiny-v2.yaml"}


@pytest.mark.parametrize("name", sorted(ORIGINAL_SHA256))
def test_shipped_configs_are_the_original_files(name):
    """configs/stable-diffusion/<name> is the upstream file, byte for byte (configs/stable-diffusion/<name> of
    the repository and commit recorded in ORIGINAL_SHA256)."""
    digest, source = ORIGINAL_SHA256[name]
    assert hashlib.sha256((ROOT / "configs" / "stable-diffusion" / name).read_bytes()).hexdigest() == digest, source
    assert {p.name for p in ORIGINAL} == set(ORIGINAL_SHA256)


def test_what_distinguishes_the_original_configs():
    v1, inpaint, v2, v2v = (load_config(ROOT / "configs" / "stable-diffusion" / f"{n}.yaml") for n in
                            ("v1-inference", "v1-inpainting-inference", "v2-inference", "v2-inference-v"))
    # defaults of ddpm.DDPM when the yaml omits them
    assert (v1.parameterization, v2.parameterization, v2v.parameterization) == ("eps", "eps", "v")
    assert (v1.conditioning_key, inpaint.conditioning_key) == ("crossattn", "hybrid")
    assert (v1.unet.in_channels, inpaint.unet.in_channels) == (4, 9)
    assert (v1.unet.num_heads, v1.unet.num_head_channels, v1.unet.use_linear_in_transformer) == (8, -1, False)
    assert (v2.unet.num_heads, v2.unet.num_head_channels, v2.unet.use_linear_in_transformer) == (-1, 64, True)
    assert v1.unet.attention_resolutions == (4, 2, 1) and v1.unet.channel_mult == (1, 2, 4, 4)
    assert v1.first_stage.ddconfig.ch_mult == (1, 2, 4, 4) and v1.first_stage.ddconfig.attn_resolutions == ()
    # text encoders: absent size extensions resolve to CLIP ViT-L/14 and OpenCLIP ViT-H/14
    assert not v1.cond_stage.is_openclip and v1.cond_stage.text_config == CLIPTextConfig()
    assert (v1.cond_stage.text_config.hidden_size, v1.cond_stage.text_config.num_hidden_layers) == (768, 12)
    assert v1.cond_stage.text_cfg is None and v1.cond_stage.embed_dim is None and v1.cond_stage.layer == "last"
    assert v2.cond_stage.is_openclip and v2.cond_stage.text_cfg == OpenCLIPTextConfig()
    assert (v2.cond_stage.embed_dim, v2.cond_stage.text_cfg.width, v2.cond_stage.text_cfg.layers) == (1024, 1024, 24)
    assert v2.cond_stage.text_config is None and v2.cond_stage.layer == "penultimate"
    assert v1.scale_factor == 0.18215 and (v1.linear_start, v1.linear_end, v1.timesteps) == (0.00085, 0.012, 1000)


def test_configs_are_frozen_and_hashable():
    cfg = load_config(ORIGINAL[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.scale_factor = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.unet.model_channels = 1
    assert hash(cfg) == hash(load_config(ORIGINAL[0])) and cfg == load_config(ORIGINAL[0])
    assert isinstance(cfg, LatentDiffusionConfig)


def _write_variant(tmp_path, old, new, count=1):
    text = (ROOT / "tests" / "configs" / "tiny-v1.yaml").read_text()
    assert text.count(old) == count, old
    path = tmp_path / "variant.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("old, new, field", [
    ("        num_res_blocks: 1\n        channel_mult", "        num_res_block: 1\n        channel_mult",
     "model.params.unet_config.params.'num_res_block'"),
    ("    scale_factor: 0.18215", "    scale_facter: 0.18215", "model.params.'scale_facter'"),
    ("          z_channels: 4", "          z_channel: 4", "model.params.first_stage_config.params.ddconfig.'z_channel'"),
    ("          hidden_size: 32", "          hidden_sise: 32",
     "model.params.cond_stage_config.params.text_config.'hidden_sise'"),
    ("  base_learning_rate: 1.0e-04", "  base_lr: 1.0e-04", "model.'base_lr'"),
    ("    unet_config:\n      target", "    unet_config:\n      tagret", "model.params.unet_config.'tagret'"),
])
def test_misspelled_field_names_the_field_and_the_file(tmp_path, old, new, field):
    path = _write_variant(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert field in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("old, new, where", [
    ("ldm.modules.diffusionmodules.openaimodel.UNetModel", "ldm.modules.diffusionmodules.openaimodel.UNetModle",
     "model.params.unet_config.target"),
    ("ldm.models.autoencoder.AutoencoderKL", "ldm.models.autoencoder.VQModel", "model.params.first_stage_config.target"),
    ("ldm.modules.encoders.modules.FrozenCLIPEmbedder", "ldm.modules.encoders.modules.FrozenT5Embedder",
     "model.params.cond_stage_config.target"),
    ("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.models.diffusion.ddpm.DDPM", "model.target"),
])
def test_unknown_target_names_the_target_and_the_file(tmp_path, old, new, where):
    path = _write_variant(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert where in str(info.value) and new in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("old, new, message", [
    ("        num_heads: 2", "        num_heads: two", "num_heads must be of type int"),
    ("        attention_resolutions: [ 1, 2 ]", "        attention_resolutions: 2", "attention_resolutions must be a list"),
    ("        in_channels: 4\n", "", "missing required field model.params.unet_config.params.in_channels"),
    ("    conditioning_key: crossattn", "    conditioning_key: concat", "unsupported value model.params.conditioning_key"),
    ("    linear_start", "    parameterization: x0\n    linear_start", "unsupported value model.params.parameterization"),
    # Stability-AI util.py's extra schedule (the karlo prior's); ldm/schedules.py does not build it
    ("    linear_start", "    beta_schedule: squaredcos_cap_v2\n    linear_start",
     "unsupported value model.params.beta_schedule"),
    ("    scale_factor: 0.18215", "    scale_factor: 0.18215\n    finetune_keys: null", "only accepted by"),
    ("      params:\n        text_config:", "      params:\n        embed_dim: 32\n        text_config:",
     "embed_dim is not accepted by target ldm.modules.encoders.modules.FrozenCLIPEmbedder"),
    ("      params:\n        text_config:", "      params:\n        layer: penultimate\n        text_config:",
     "layer='penultimate' must be one of"),
    ("        num_heads: 2\n", "", "needs num_heads or num_head_channels"),
])
def test_bad_values_are_clear_errors(tmp_path, old, new, message):
    path = _write_variant(tmp_path, old, new)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_parse_config_without_a_file_and_bad_top_level():
    data = _yaml(ROOT / "tests" / "configs" / "tiny-v2.yaml")
    assert parse_config(data) == load_config(ROOT / "tests" / "configs" / "tiny-v2.yaml")
    with pytest.raises(ConfigError, match="<config>: expected a top-level section 'model'"):
        parse_config({"lightning": {}})
    with pytest.raises(ConfigError, match="cannot read yaml"):
        load_config(ROOT / "tests" / "configs" / "missing.yaml")


def test_training_sections_are_ignored_as_the_original_scripts_do(tmp_path):
    # Regression: the released v2-inpainting-inference.yaml (and every training yaml) also has `data` and
    # `lightning` sections, which the original scripts never read (they use config.model); those sections may
    # even hold interpolations that only resolve in a training run, so only `model` is resolved.
    tiny = ROOT / "tests" / "configs" / "tiny-v2.yaml"
    text = tiny.read_text().replace("        model_channels: 32", "        model_channels: ${lightning.width}")
    path = tmp_path / "with-training-sections.yaml"
    path.write_text(text + "\ndata:\n  target: main.DataModuleFromConfig\n  params: {batch_size: 4}\n"
                    "lightning:\n  width: 32\n  trainer:\n    gpus: ${oc.env:UNSET_FOR_THIS_TEST}\n")
    assert load_config(path) == load_config(tiny)
    assert parse_config({**_yaml(tiny), "lightning": {}}) == load_config(tiny)


def test_per_level_num_res_blocks_and_other_beta_schedules(tmp_path):
    # Regression: Stability-AI openaimodel.py takes num_res_blocks as an int or a per-level list, and ddpm.py
    # register_schedule takes every schedule of util.py make_beta_schedule (cosine with its cosine_s).
    path = _write_variant(tmp_path, "        num_res_blocks: 1\n        channel_mult",
                          "        num_res_blocks: [ 1, 2 ]\n        channel_mult")
    assert load_config(path).unet.num_res_blocks == (1, 2)
    path = _write_variant(tmp_path, "    linear_start",
                          "    beta_schedule: cosine\n    cosine_s: 0.01\n    linear_start")
    cfg = load_config(path)
    assert (cfg.beta_schedule, cfg.cosine_s) == ("cosine", 0.01)


def test_yaml_syntax_error_is_one_line(tmp_path):
    # Regression: yaml's parser messages span several lines (problem and context marks)
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  params: {a: [1\n")
    with pytest.raises(ConfigError, match="cannot read yaml") as info:
        load_config(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
