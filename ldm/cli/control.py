"""ControlNet on the command line: the --control flags checked (`validate`), the hints read (`read_hints`), the
ControlNets loaded into conditioning entries (`load_controls`), and their PNG parameters (`fields`, read back by
`options_from_fields` for rerun).

Two ways in, as the originals:
- `--control PATH[:STRENGTH]` (repeatable): ControlNet files in any released layout, each with a ControlLDM yaml
  (`--control_config`, default `--config`); the Stable Diffusion model comes from --config / --ckpt alone (a
  ControlLDM --config gives its Stable Diffusion part; a v1.0 --ckpt's own ControlNet is then unused);
- a ControlLDM `--config` without --control: the whole model, ControlNet included, comes from --ckpt (v1.0),
  at strength 1.

Either way the UNet takes the checkpoint's RAW weights (--no-ema is implied): the original loads the checkpoint
into a ControlLDM whose yaml says use_ema: False (the v1.1 demos load v1-5-pruned.ckpt with strict=False, which
skips its model_ema.* weights), and its demos sample without ema_scope.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch

from ldm.cli import images
from ldm.cli.flags import PRECISIONS, CLIError


def split_strength(spec: str) -> tuple[str, float]:
    """PATH[:STRENGTH]: the strength is split off at the last ':' only when what follows is a number."""
    path, colon, tail = spec.rpartition(":")
    if colon and path:
        try:
            strength = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(strength):
            raise CLIError(f"--control {spec}: the strength must be a finite number")
        return path, strength
    return spec, 1.0


def _is_control_ldm(path: str) -> bool:
    from ldm.config import load_config

    return hasattr(load_config(path), "control_stage")


def _per_control(values: list[str] | None, n: int, flag: str, what: str) -> list[str] | None:
    """One value for all ControlNets or one per ControlNet, as a list of n."""
    if not values:
        return None
    if len(values) not in (1, n):
        raise CLIError(f"give one {flag} for all ControlNets or one per ControlNet ({n}), got {len(values)} {what}")
    return values * n if len(values) == 1 else list(values)


def validate(opts: argparse.Namespace) -> None:
    """Check the ControlNet flags (after --config is known to exist) and normalise them to one value per
    ControlNet: opts.controls [(path, strength)], control_config, control_image, control_preprocess."""
    opts.controls = [split_strength(spec) for spec in opts.control or []]
    cldm_config = _is_control_ldm(opts.config)
    used = bool(opts.controls) or cldm_config
    given = [flag for flag, value in (("--control_image", opts.control_image),
                                      ("--control_config", opts.control_config),
                                      ("--control_preprocess", opts.control_preprocess),
                                      ("--guess_mode", opts.guess_mode)) if value]
    if not used:
        if given:
            raise CLIError(f"{given[0]} needs a ControlNet: --control PATH, or a ControlLDM --config")
        return
    if opts.control_config and not opts.controls:
        raise CLIError("--control_config applies to --control files (a ControlLDM --config alone brings its own)")
    if opts.offload:
        raise CLIError("--offload does not move ControlNets between devices; run without it")
    n = max(len(opts.controls), 1)
    opts.control_image = _per_control(opts.control_image, n, "--control_image", "images")
    if opts.control_image is None:
        raise CLIError("a ControlNet needs its hint: --control_image PNG")
    opts.control_preprocess = _per_control(opts.control_preprocess, n, "--control_preprocess", "values") or ["none"] * n
    if opts.controls:
        configs = _per_control(opts.control_config, n, "--control_config", "configs")
        if configs is None:
            if not cldm_config:
                raise CLIError("--control needs --control_config (a ControlLDM yaml, e.g. "
                               "configs/controlnet/control_v11p_sd15_canny.yaml) when --config is not one")
            configs = [opts.config] * n
        opts.control_config = configs
        for path, _ in opts.controls:
            _require(path, "ControlNet (--control)")
        for path in configs:
            _require(path, "ControlNet config (--control_config)")
            if not _is_control_ldm(path):
                raise CLIError(f"--control_config {path} is not a ControlLDM yaml (model.target cldm.cldm.ControlLDM)")
    for path in opts.control_image:
        _require(path, "control image (--control_image)")
    opts.no_ema = True  # the original samples with the raw UNet weights (module docstring)


def _require(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise CLIError(f"{what} not found: {path}")


def uses_controlnet(opts: argparse.Namespace) -> bool:
    return bool(getattr(opts, "control_image", None))


def read_hints(opts: argparse.Namespace) -> list[torch.Tensor] | None:
    """The hints, (1, 3, H, W) float32 in [0, 1] on the CPU, checked against the image size (opts.H, opts.W):
    the ControlNet's hint encoder halves three times, so the hint is 8x the latent, the image's size for f = 8.

    As the demos: the file is read as RGB (gradio's numpy images; an alpha channel is dropped by PIL's
    convert, a grey image repeated), optionally preprocessed (ldm/preprocess.py), then uint8 / 255, NCHW."""
    if not uses_controlnet(opts):
        return None
    from ldm.preprocess import preprocess

    height, width = 8 * (opts.H // opts.f), 8 * (opts.W // opts.f)
    hints = []
    for path, name in zip(opts.control_image, opts.control_preprocess):
        rgb = images.read_uint8(path, "control image", "RGB")
        if rgb.shape[:2] != (height, width):
            raise CLIError(f"control image {path} is {rgb.shape[1]}x{rgb.shape[0]}, the ControlNet needs "
                           f"{width}x{height} for a {opts.W}x{opts.H} image (8x the latent): resize it, or pass "
                           f"--W {rgb.shape[1] * opts.f // 8} --H {rgb.shape[0] * opts.f // 8}")
        try:
            rgb = preprocess(name, rgb)
        except RuntimeError as e:
            raise CLIError(str(e)) from None
        hints.append(torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None])
    return hints


def load_controls(opts: argparse.Namespace, model, hints: list[torch.Tensor] | None) -> list | None:
    """The conditioning entries (ldm.models.controlnet.Control) of the run's ControlNets, on the model's device
    in the model's dtype."""
    if hints is None:
        return None
    import ldm
    from ldm.config_controlnet import encoder_mismatch
    from ldm.models.controlnet import make_controls

    if opts.controls:
        nets, strengths = [], []
        for (path, strength), config in zip(opts.controls, opts.control_config):
            net = ldm.load_controlnet(config, path, device=opts.device, dtype=PRECISIONS[opts.precision])
            mismatch = encoder_mismatch(net.cfg, model.config.unet)
            if net.cfg.hint_channels != 3:
                mismatch = f"it takes a hint of {net.cfg.hint_channels} channels, the command line gives RGB images"
            if mismatch:
                raise CLIError(f"ControlNet {path} ({config}) does not fit the model of {opts.config}: {mismatch}")
            nets.append(net)
            strengths.append(strength)
    else:
        nets, strengths = [model.control_model], [1.0]
    device = next(model.parameters()).device
    return make_controls(nets, [hint.to(device) for hint in hints], strengths, opts.guess_mode)


def fields(opts: argparse.Namespace) -> dict[str, str]:
    """The PNG parameters of the run's ControlNets: per ControlNet i (from 0) its file, hash, config and
    strength (files of --control only), its hint and the hint's hash, its preprocessor; and Guess mode."""
    from ldm.png_info import file_hash

    if not uses_controlnet(opts):
        return {}
    out = {}
    for i, (image, name) in enumerate(zip(opts.control_image, opts.control_preprocess)):
        if opts.controls:
            path, strength = opts.controls[i]
            out.update({f"ControlNet {i}": path, f"ControlNet {i} hash": file_hash(path),
                        f"ControlNet {i} config": opts.control_config[i]})
        else:
            strength = 1.0
        out[f"ControlNet {i} strength"] = repr(float(strength))
        out.update({f"Control image {i}": image, f"Control image {i} hash": file_hash(image)})
        if name != "none":
            out[f"Control preprocess {i}"] = name
    if opts.guess_mode:
        out["Guess mode"] = "True"
    return out


def options_from_fields(fields: dict[str, str]) -> dict:
    """The ControlNet options a PNG's parameters record (inverse of `fields`), as command-line values."""
    controls, configs, images, preprocess = [], [], [], []
    i = 0
    while f"Control image {i}" in fields:
        images.append(fields[f"Control image {i}"])
        preprocess.append(fields.get(f"Control preprocess {i}", "none"))
        if f"ControlNet {i}" in fields:
            controls.append(f"{fields[f'ControlNet {i}']}:{float(fields[f'ControlNet {i} strength'])!r}")
            configs.append(fields[f"ControlNet {i} config"])
        i += 1
    return {"control": controls or None, "control_config": configs or None, "control_image": images or None,
            "control_preprocess": preprocess or None, "guess_mode": fields.get("Guess mode") == "True"}


def path_fields(fields: dict[str, str]) -> dict[str, str]:
    """The recorded file names of a PNG's ControlNet parameters (kept by rerun when files are given elsewhere)."""
    return {key: value for key, value in fields.items() if key.startswith(("ControlNet ", "Control image "))
            and (key.split()[-1].isdigit() or key.endswith(" config"))}
