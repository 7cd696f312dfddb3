"""Ranges of a config's numbers, checked when the yaml is read: the values the original code divides by or
allocates with, each refused with one line naming its yaml path instead of a ZeroDivisionError inside the model
(`model_channels: 0`, `num_heads: 0`), a run that only fails after sampling (`scale_factor: 0`), an all-black
image (`linear_start: 5.0` makes betas above 1) or an 8 GB schedule (`timesteps: 1000000000`).

A new field with such a role adds one line to RANGES. Non-finite floats are refused for every field by the
reader (ldm/config_reader.py `convert`).
"""

from __future__ import annotations

from ldm.config_reader import ConfigError

MAX_TIMESTEPS = 100_000  # the schedule is built in float64 at load; SD trains with 1000


def _ints(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _heads(value) -> bool:  # openaimodel: -1 means "derive from the other of num_heads / num_head_channels"
    return value == -1 or value >= 1


# (yaml path below model.params, value of the config, valid, requirement)
RANGES = (
    ("timesteps", lambda c: c.timesteps, lambda v: 1 <= v <= MAX_TIMESTEPS, f"between 1 and {MAX_TIMESTEPS}"),
    ("scale_factor", lambda c: c.scale_factor, lambda v: v != 0, "non-zero (latents are divided by it)"),
    ("unet_config.params.model_channels", lambda c: c.unet.model_channels, lambda v: v >= 1, "at least 1"),
    ("unet_config.params.in_channels", lambda c: c.unet.in_channels, lambda v: v >= 1, "at least 1"),
    ("unet_config.params.out_channels", lambda c: c.unet.out_channels, lambda v: v >= 1, "at least 1"),
    ("unet_config.params.channel_mult", lambda c: c.unet.channel_mult, lambda v: len(v) >= 1 and min(v) >= 1,
     "a non-empty list of positive numbers"),
    ("unet_config.params.num_res_blocks", lambda c: _ints(c.unet.num_res_blocks), lambda v: min(v) >= 0,
     "at least 0"),
    ("unet_config.params.num_heads", lambda c: c.unet.num_heads, _heads, "at least 1, or -1"),
    ("unet_config.params.num_head_channels", lambda c: c.unet.num_head_channels, _heads, "at least 1, or -1"),
    ("unet_config.params.transformer_depth", lambda c: _ints(c.unet.transformer_depth), lambda v: min(v) >= 0,
     "at least 0"),
    ("unet_config.params.context_dim", lambda c: _ints(c.unet.context_dim or 1), lambda v: min(v) >= 1,
     "at least 1"),
    ("first_stage_config.params.embed_dim", lambda c: c.first_stage.embed_dim, lambda v: v >= 1, "at least 1"),
    ("first_stage_config.params.ddconfig.ch", lambda c: c.first_stage.ddconfig.ch, lambda v: v >= 1, "at least 1"),
    ("first_stage_config.params.ddconfig.ch_mult", lambda c: c.first_stage.ddconfig.ch_mult,
     lambda v: len(v) >= 1 and min(v) >= 1, "a non-empty list of positive numbers"),
    ("first_stage_config.params.ddconfig.z_channels", lambda c: c.first_stage.ddconfig.z_channels,
     lambda v: v >= 1, "at least 1"),
    ("first_stage_config.params.ddconfig.num_res_blocks", lambda c: c.first_stage.ddconfig.num_res_blocks,
     lambda v: v >= 0, "at least 0"),
    ("cond_stage_config.params.max_length", lambda c: c.cond_stage.max_length, lambda v: v >= 2, "at least 2"),
    ("cond_stage_config.params.text_config.hidden_size",
     lambda c: c.cond_stage.text_config and c.cond_stage.text_config.hidden_size, lambda v: v is None or v >= 1,
     "at least 1"),
    ("cond_stage_config.params.text_config.num_attention_heads",
     lambda c: c.cond_stage.text_config and c.cond_stage.text_config.num_attention_heads,
     lambda v: v is None or v >= 1, "at least 1"),
    ("cond_stage_config.params.text_config.layer_norm_eps",
     lambda c: c.cond_stage.text_config and c.cond_stage.text_config.layer_norm_eps,
     lambda v: v is None or v > 0, "positive"),
    ("cond_stage_config.params.text_cfg.width", lambda c: c.cond_stage.text_cfg and c.cond_stage.text_cfg.width,
     lambda v: v is None or v >= 1, "at least 1"),
    ("cond_stage_config.params.text_cfg.heads", lambda c: c.cond_stage.text_cfg and c.cond_stage.text_cfg.heads,
     lambda v: v is None or v >= 1, "at least 1"),
    ("cond_stage_config.params.text_cfg.mlp_ratio",
     lambda c: c.cond_stage.text_cfg and c.cond_stage.text_cfg.mlp_ratio, lambda v: v is None or v > 0, "positive"),
)


def check_ranges(cfg, src: str) -> None:
    """Raise ConfigError (naming the yaml path and the file) for the first value outside its range, then
    for a noise schedule whose betas leave (0, 1) (the original would sample NaNs from it)."""
    for path, get, valid, requirement in RANGES:
        value = get(cfg)
        if not valid(value):
            shown = value[0] if isinstance(value, tuple) and len(value) == 1 else value
            raise ConfigError(f"{src}: model.params.{path} must be {requirement}, got {shown!r}")
    import torch

    from ldm.schedules import make_beta_schedule

    with torch.device("cpu"):  # real values even when read inside a meta-device build
        betas = make_beta_schedule(cfg.timesteps, linear_start=cfg.linear_start, linear_end=cfg.linear_end,
                                   schedule=cfg.beta_schedule, cosine_s=cfg.cosine_s)
    if not (betas > 0).all() or not (betas < 1).all():
        raise ConfigError(f"{src}: the {cfg.beta_schedule} noise schedule of model.params (linear_start "
                          f"{cfg.linear_start}, linear_end {cfg.linear_end}) has betas outside (0, 1) "
                          f"({betas.min().item():.3g} to {betas.max().item():.3g})")
