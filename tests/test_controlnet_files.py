"""ControlNet files and configs: the full-size manifests of the four released file kinds loaded key by key, the
three layouts giving the same network, loading errors, and the original yamls of configs/controlnet/ (byte for
byte, read strictly). The parity with the original code is tests/test_controlnet.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import ldm
import make_fixtures_controlnet as mf
from ldm.checkpoint import CheckpointError
from ldm.config import ConfigError, load_config
from ldm.controlnet_loader import layout, plan_controlnet_load
from ldm.loader import plan_load
from ldm.models.controlnet import ControlNet
from ldm.models.latent_diffusion import build_model
from manifests import load_manifest
from test_controlnet import files, fixture  # noqa: F401 (the tiny files the fixture was made from)
from tiny_models import tiny_config_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "controlnet"


# ---------------------------------------------------------------------------------------------- loading
MANIFEST_CONFIGS = {"control_sd15_canny": "cldm_v15", "control_v11p_sd15_canny": "control_v11p_sd15_canny",
                    "control_sd15_extracted": "control_v11p_sd15_canny", "control_sd21": "cldm_v21"}


@pytest.mark.parametrize("name", list(MANIFEST_CONFIGS))
def test_every_key_of_the_released_files_is_accounted_for(name):
    shapes = load_manifest(name)
    cfg = load_config(CONFIGS / f"{MANIFEST_CONFIGS[name]}.yaml")
    with torch.device("meta"):
        net = ControlNet(cfg.control_stage)
    plan = plan_controlnet_load(net, shapes)
    assert plan.missing == plan.unexpected == plan.mismatched == [] and not plan.reshaped
    targets = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert set(plan.sources) == set(targets) and len(set(plan.sources.values())) == len(targets) == 340
    for key, source in plan.sources.items():
        assert shapes[source] == targets[key]
    assert set(plan.sources.values()) | set(plan.ignored) == set(shapes)
    expected_layout = {"control_v11p_sd15_canny": "v1.1 control_model", "control_sd15_extracted": "extracted"}
    assert layout(shapes) == expected_layout.get(name, "v1.0 ControlLDM")
    if layout(shapes) == "v1.0 ControlLDM":  # the Stable Diffusion part by name; its schedule and logvar
        assert set(plan.ignored.values()) == {"Stable Diffusion part of a ControlLDM file", "schedule buffer",
                                              "training state"}
        # ... and the whole file as the model of its yaml, with or without the ControlNet
        for with_control in (True, False):
            model = build_model(cfg, device="meta", with_control=with_control)
            plan = plan_load(model, shapes)
            assert plan.missing == plan.unexpected == plan.mismatched == []
            assert set(plan.sources) == set(model.state_dict())
            assert ("ControlNet weights" in plan.ignored.values()) != with_control
            assert not plan.use_ema  # tool_add_control.py copies SD's raw UNet; there is no model_ema
    else:
        assert plan.ignored == {}


def test_the_three_layouts_load_the_same_controlnet(files):
    config = tiny_config_path(mf.CONFIG)
    nets = {name: ldm.load_controlnet(config, files[name]) for name in ("v10", "v10_wrapped", "v11", "extracted")}
    reference = nets["v11"].state_dict()
    assert all(not p.requires_grad for p in nets["v11"].parameters())
    for name, net in nets.items():
        state = net.state_dict()
        for key, value in reference.items():
            assert state[key].dtype == torch.float32
            if name == "extracted":  # the fp16 file: the float32 weights rounded to half precision
                assert torch.equal(state[key], value.half().float()), key
            else:
                assert torch.equal(state[key], value), key
    half = ldm.load_controlnet(config, files["v11"], dtype=torch.float16)  # weights in the UNet's dtype
    assert next(half.parameters()).dtype == torch.float16


def test_loading_errors_name_the_file(files, tmp_path):
    config = tiny_config_path(mf.CONFIG)
    with pytest.raises(CheckpointError, match="no ControlNet"):
        ldm.load_controlnet(config, files["sd"])
    with pytest.raises(ConfigError, match="not a ControlLDM config"):
        ldm.load_controlnet(tiny_config_path("tiny-v1"), files["v11"])
    with pytest.raises(CheckpointError, match="shape mismatch"):  # a ControlNet of another shape
        ldm.load_controlnet(tiny_config_path(mf.CONFIG_13), files["v11"])
    state = torch.load(files["v11"], weights_only=True)
    state["control_model.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="1 unexpected .*control_model.extra.weight"):
        ldm.load_controlnet(config, tmp_path / "extra.pth")
    # a ControlLDM yaml whose checkpoint lacks the ControlNet: missing keys, unless only the SD part is asked for
    with pytest.raises(CheckpointError, match="missing .*control_model"):
        ldm.load_model(config, files["sd"])
    assert type(ldm.load_model(config, files["sd"], with_control=False)).__name__ == "LatentDiffusion"


# ---------------------------------------------------------------------------------------------- configs
# configs/controlnet/ holds the original files byte for byte: sha256 of each as the upstream repository has it
# (repository @ commit, models/<name>), computed from those trees when they were copied.
V10 = "lllyasviel/ControlNet@ed85cd1e25a5ed592f7d8178495b4483de0331bf"
V11 = "lllyasviel/ControlNet-v1-1-nightly@e2b44154b72965c5e11b1ccee941d550682e4701"
CLDM_V15 = "39e1338c4143618adb17604f96c3a3f740c1ab5d1557d71b044f0307a0a6adb4"
AVG_POOL = "60660e14e69b5bcb79f205861a0c87af09ed02d63bf9101e28123976687e2da9"
ORIGINAL_SHA256 = {
    "cldm_v15.yaml": (CLDM_V15, V10),
    "cldm_v21.yaml": ("0535d1cc6300dd19cfd3ebdee697b3aa384f9965e573e80506bea28bcbaf4559", V10),
    "cldm_v15_avg_pool.yaml": (AVG_POOL, V11),
    "control_v11e_sd15_shuffle.yaml": (AVG_POOL, V11),
    **{f"control_v11{name}.yaml": (CLDM_V15, V11) for name in (
        "e_sd15_ip2p", "f1e_sd15_tile", "f1p_sd15_depth", "p_sd15_canny", "p_sd15_inpaint", "p_sd15_lineart",
        "p_sd15_mlsd", "p_sd15_normalbae", "p_sd15_openpose", "p_sd15_scribble", "p_sd15_seg", "p_sd15_softedge",
        "p_sd15s2_lineart_anime")},
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_SHA256))
def test_shipped_configs_are_the_original_files(name):
    digest, source = ORIGINAL_SHA256[name]
    assert hashlib.sha256((CONFIGS / name).read_bytes()).hexdigest() == digest, source
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(ORIGINAL_SHA256)


def test_what_the_controlnet_configs_say():
    v15, v21, pool = (load_config(CONFIGS / n) for n in ("cldm_v15.yaml", "cldm_v21.yaml", "cldm_v15_avg_pool.yaml"))
    assert (v15.control_key, v15.only_mid_control, v15.global_average_pooling) == ("hint", False, False)
    assert pool.global_average_pooling and not v21.global_average_pooling
    assert v15.control_stage.hint_channels == 3 and v15.control_stage.model_channels == 320
    assert v15.control_stage.context_dim == 768 and v21.control_stage.context_dim == 1024
    assert v21.control_stage.use_linear_in_transformer and v21.cond_stage.is_openclip
    assert not v15.use_ema and v15.scale_factor == 0.18215


@pytest.mark.parametrize("old, new, message", [
    ("        hint_channels: 3", "        hint_channel: 3", "control_stage_config.params.'hint_channel'"),
    ("      target: cldm.cldm.ControlNet", "      target: cldm.cldm.ControlNett", "control_stage_config.target"),
    ("      target: cldm.cldm.ControlledUnetModel", "      target: ldm.modules.diffusionmodules.openaimodel.UNetModel",
     "unet_config.target"),
    ("    control_key: \"hint\"\n", "", "missing required field model.params.control_key"),
    ("    only_mid_control: False", "    only_mid_control: False\n    ony_mid: 1", "model.params.'ony_mid'"),
    ("        hint_channels: 3\n        model_channels: 32", "        hint_channels: 3\n        model_channels: 64",
     "model_channels=64 differs from the UNet's 32"),
    ("    conditioning_key: crossattn", "    conditioning_key: hybrid", "needs model.params.conditioning_key"),
])
def test_bad_controlnet_configs_are_clear_errors(tmp_path, old, new, message):
    text = tiny_config_path(mf.CONFIG).read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)
