"""Training (ldm/train): loss goes down, runs are deterministic, resume equals an uninterrupted run, and what is
saved loads through ldm.load_model (full checkpoint with EMA, raw weights, pruned export).

All on tests/configs/tiny-v1.yaml (f = 2) with 32 px images of the demo world, float32 on CPU, a few steps.
"""

from __future__ import annotations

import math

import pytest
import torch

import ldm
from ldm.config import load_config
from ldm.demo import world
from ldm.demo import DEMO_CONFIG

from ldm.models.latent_diffusion import build_model
from ldm.train.autoencoder import AutoencoderTrainer, autoencoder_loss
from ldm.train.checkpoint_io import export_pruned, write_config
from ldm.train.diffusion import (DiffusionTrainer, diffusion_target, foreground_mask, init_token_embeddings,
                                 q_sample)
from ldm.train.ema import LitEma
from ldm.train.loop import TrainOptions, learning_rate
from tiny_models import ema_key, tiny_config_path  # the test's own copy of LitEma's naming

CONFIG = tiny_config_path("tiny-v1")


def data(n, generator):
    images, captions, _ = world.batch(n, generator, size=32)
    return images, captions


def make_model(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(load_config(CONFIG))


def diffusion_trainer(steps=4, seed=0, **extra):
    opts = TrainOptions(steps=steps, batch_size=4, lr=1e-3, warmup=2, seed=seed, log_every=1,
                        extra={"ema_decay": 0.99, **extra})
    return DiffusionTrainer(make_model(seed), data, opts)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_warmup_then_cosine():
    opts = TrainOptions(steps=110, lr=1e-3, lr_min=1e-4, warmup=10)
    assert learning_rate(0, opts) == pytest.approx(1e-4)  # (0 + 1) / 10 of lr
    assert learning_rate(10, opts) == pytest.approx(1e-3)
    assert learning_rate(60, opts) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert learning_rate(110, opts) == pytest.approx(1e-4) == learning_rate(500, opts)


def test_ema_names_and_update_rule():
    model = make_model()
    ema = LitEma(model.model, decay=0.9)
    keys = {"model_ema." + k for k in ema.state_dict()}
    unet_keys = [k for k in model.state_dict() if k.startswith("model.diffusion_model.")]
    # the loader's EMA naming (LitEma: "model." dropped, dots removed) covers every UNet parameter
    assert keys == {ema_key(k) for k in unet_keys} | {"model_ema.decay", "model_ema.num_updates"}
    assert ema.num_updates.dtype == torch.int32 and ema.decay.dtype == torch.float32

    param = model.model.diffusion_model.out[2].bias
    start = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    for _ in range(3):
        ema.update(model.model)
    # shadow_n = shadow_{n-1} + (1 - d_n) (p - shadow_{n-1}) with d_n = min(0.9, (1 + n) / (10 + n)), p = start + 1:
    # the distance to p shrinks by the factor d_n each update
    remaining = math.prod(min(0.9, (1 + n) / (10 + n)) for n in (1, 2, 3))
    expected = start + 1.0 - remaining
    torch.testing.assert_close(ema.averaged_state()["diffusion_model.out.2.bias"], expected, rtol=0, atol=1e-6)
    assert int(ema.num_updates) == 3


def test_q_sample_matches_the_forward_process():
    ac = torch.tensor([0.25, 0.64])
    z0, noise = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 2.0)
    out = q_sample(z0, torch.tensor([0, 1]), noise, ac)
    # sqrt(a) z0 + sqrt(1 - a) noise: 0.5 + 0.866 * 2, 0.8 + 0.6 * 2
    torch.testing.assert_close(out.flatten(), torch.tensor([0.5 + 2 * 0.75**0.5, 0.8 + 1.2]))


def test_v_target_inverts_to_the_clean_latent_and_the_noise():
    # Salimans & Ho 2022, eq. 9 and the original's predict_start_from_z_and_v / predict_eps_from_z_and_v:
    # z0 = sqrt(a) z_t - sqrt(1 - a) v and eps = sqrt(1 - a) z_t + sqrt(a) v, for every timestep
    ac = torch.tensor([0.9991, 0.5, 0.0047])
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.arange(3)
    z_t, v = q_sample(z0, t, noise, ac), diffusion_target(z0, t, noise, ac, "v")
    a = ac[:, None, None, None]
    torch.testing.assert_close(a.sqrt() * z_t - (1 - a).sqrt() * v, z0)
    torch.testing.assert_close((1 - a).sqrt() * z_t + a.sqrt() * v, noise)
    assert torch.equal(diffusion_target(z0, t, noise, ac, "eps"), noise)
    with pytest.raises(ValueError, match="parameterization"):
        diffusion_target(z0, t, noise, ac, "x0")


def test_write_config_sets_scale_and_parameterization(tmp_path):
    out = write_config(DEMO_CONFIG, tmp_path / "c.yaml", 0.125, parameterization="v")
    cfg = load_config(out)
    assert cfg.scale_factor == 0.125 and cfg.parameterization == "v"
    assert "# The demo model" in out.read_text()  # comments kept
    again = write_config(out, tmp_path / "d.yaml", parameterization="eps")
    assert load_config(again).parameterization == "eps" and load_config(again).scale_factor == 0.125
    (tmp_path / "bad.yaml").write_text("model:\n  params:\n    timesteps: 1000\n")
    with pytest.raises(ValueError, match="scale_factor"):
        write_config(tmp_path / "bad.yaml", tmp_path / "e.yaml", 1.0)


def test_init_token_embeddings_redraws_only_the_token_table():
    model = make_model()
    text = model.cond_stage_model
    before = {k: v.clone() for k, v in text.state_dict().items()}
    init_token_embeddings(text, 1.0, torch.Generator().manual_seed(5))
    key = "transformer.text_model.embeddings.token_embedding.weight"
    table = text.state_dict()[key]
    # a (vocab x width) table of N(0, 1) draws: the sample std is within a few 1/sqrt(n) of 1
    assert abs(float(table.std()) - 1.0) < 0.05
    assert all(torch.equal(v, before[k]) for k, v in text.state_dict().items() if k != key)
    again = make_model().cond_stage_model
    init_token_embeddings(again, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(again.state_dict()[key], table)  # deterministic given the generator


def test_short_autoencoder_run_lowers_the_loss():
    torch.manual_seed(0)
    vae = make_model().first_stage_model
    opts = TrainOptions(steps=25, batch_size=4, lr=2e-3, warmup=5, log_every=25, extra={"crop": 16})
    trainer = AutoencoderTrainer(vae, data, opts)
    images, _ = data(8, torch.Generator().manual_seed(123))

    def held_out_loss():
        with torch.no_grad():
            return float(autoencoder_loss(vae, images, 1e-6, torch.Generator().manual_seed(0))[0])

    before = held_out_loss()
    trainer.fit(disable=True)
    # 25 steps bring the L1 reconstruction error of a random VAE (~0.7 in [-1, 1] units) down on images it never
    # saw (measured: 0.68 -> 0.60); the same images and posterior noise before and after, so 0.9x is a real drop
    assert held_out_loss() < 0.9 * before


def test_logvar_init_starts_the_posterior_narrow():
    vae = make_model().first_stage_model
    half = vae.quant_conv.bias.shape[0] // 2
    mean_bias = vae.quant_conv.bias[:half].detach().clone()
    AutoencoderTrainer(vae, data, TrainOptions(steps=1, batch_size=2, extra={"logvar_init": -8.0}))
    bias = vae.quant_conv.bias.detach()
    assert torch.equal(bias[:half], mean_bias)  # the posterior means are left alone
    assert torch.equal(bias[half:], torch.full((half,), -8.0))
    images, _ = data(2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        logvar = vae.encode(images).logvar
    # the random 1x1 weights add a spread of order 1 around the bias: the default init is centred near 0
    assert -9.5 < float(logvar.mean()) < -6.5


def test_short_diffusion_run_lowers_the_loss():
    trainer = diffusion_trainer(steps=30, train_text=True)
    fixed = torch.Generator()

    def fixed_loss():
        fixed.manual_seed(99)  # the same batch, timesteps and noise before and after
        with torch.no_grad():
            return float(trainer.loss(fixed)[0])

    before = fixed_loss()
    records = trainer.fit(disable=True)
    assert len(records) == 30 and all(math.isfinite(r["loss"]) for r in records)
    # a random UNet's eps-prediction error is above the 1.0 of predicting zero; 30 steps get it well below
    assert fixed_loss() < 0.8 * before


def test_offset_noise_adds_a_per_channel_constant():
    def noise_power(offset):
        trainer = diffusion_trainer(steps=1, offset_noise=offset)
        trainer.opts = trainer.opts.with_(batch_size=32)
        # a model that predicts 0: the eps loss is then the mean square of the noise it was trained against
        trainer.model.apply_model = lambda z_t, t, context: torch.zeros_like(z_t)
        with torch.no_grad():
            return float(trainer.loss(torch.Generator().manual_seed(3))[0])

    # E[(n + s o)^2] = 1 + s^2 for n, o ~ N(0, 1); 32 x 4 offsets drawn, so the s = 1 term has a relative
    # standard deviation of sqrt(2 / 128) = 0.125: the bounds are 4 of those apart from 2
    assert 0.95 < noise_power(0.0) < 1.05
    assert 1.5 < noise_power(1.0) < 2.5


def test_foreground_mask_covers_the_shape_and_its_box():
    # canonical 24 px shapes at the top-left anchor (19.2, 19.2) of a 64 px image: the box spans pixels
    # 7.2..31.2, i.e. latent (f = 4) cells 1..7. The square fills them; the circle's mask, dilated by one cell,
    # holds all of them too (the corners a square would add) and nothing outside cells 0..8
    lo, hi = int((19.2 - 12) // 4), int((19.2 + 12) // 4)
    for shape in ("circle", "square"):
        image = world.render(world.Attributes("red", shape, "blue", "top left"))[None]
        mask = foreground_mask(image, (16, 16))[0, 0]
        assert mask[lo:hi + 1, lo:hi + 1].all(), shape
        assert mask.sum() == mask[lo - 1:hi + 2, lo - 1:hi + 2].sum(), shape
    assert foreground_mask(image, (16, 16))[0, 0, lo - 1:hi + 2, lo - 1:hi + 2].all()  # the square, dilated
    assert foreground_mask(torch.zeros(1, 3, 64, 64), (16, 16)).sum() == 0  # a flat image has no foreground


@pytest.mark.parametrize("pool", [0, 16])
def test_foreground_weight_counts_the_shape_more(pool):
    def losses(weight):
        trainer = diffusion_trainer(steps=1, foreground_weight=weight, latent_pool=pool)
        z0, captions, t, noise, mask = trainer.batch(torch.Generator().manual_seed(3))
        if not weight:
            assert mask is None
            return trainer.compute_loss(z0, captions, t, noise)[0], None
        # only the shape's error: a prediction equal to the target outside the mask
        target = diffusion_target(z0, t, noise, trainer.model.alphas_cumprod, trainer.model.parameterization)
        z_t = q_sample(z0, t, noise, trainer.model.alphas_cumprod)
        trainer.model.apply_model = lambda z_t_, t_, context: target + mask * (z_t - target)
        with torch.no_grad():
            loss = trainer.compute_loss(z0, captions, t, noise, mask)[0]
        error = ((mask * (z_t - target)) ** 2).mean()
        return loss, (error, mask)

    plain, _ = losses(0)
    assert torch.isfinite(plain)
    weighted, (error, mask) = losses(3.0)
    assert 0 < mask.mean() < 1
    # the loss is mean(w e^2) / mean(w) with w = 1 + 3 m and e zero off the mask: 4 mean(m e^2) / mean(w)
    assert torch.allclose(weighted, 4 * error / (1 + 3 * mask.mean()), rtol=1e-5)  # float32 reductions


def test_training_is_deterministic_given_the_seed():
    a, b = diffusion_trainer(steps=2, train_text=True), diffusion_trainer(steps=2, train_text=True)
    a.fit(disable=True)
    b.fit(disable=True)
    assert states_equal(a.checkpoint_state(), b.checkpoint_state())
    c = diffusion_trainer(steps=2, seed=1, train_text=True)
    c.fit(disable=True)
    assert not states_equal(a.checkpoint_state(), c.checkpoint_state())


def test_resume_continues_exactly(tmp_path):
    straight = diffusion_trainer(steps=4, train_text=True, latent_pool=16)
    straight.fit(disable=True)

    first = diffusion_trainer(steps=2, train_text=True, latent_pool=16)
    first.fit(tmp_path / "run.ckpt", disable=True)
    second = diffusion_trainer(steps=4, train_text=True, latent_pool=16)  # fresh weights, then resume
    second.resume(tmp_path / "run.ckpt")
    assert second.step == 2
    second.fit(disable=True)
    # weights, EMA (incl. num_updates), schedule buffers: bit-identical to the uninterrupted run
    assert states_equal(straight.checkpoint_state(), second.checkpoint_state())
    assert int(second.ema.num_updates) == 4


def test_checkpoints_load_through_load_model(tmp_path):
    trainer = diffusion_trainer(steps=2)
    trainer.fit(tmp_path / "ldm.ckpt", disable=True)
    payload = torch.load(tmp_path / "ldm.ckpt", weights_only=True)
    assert payload["global_step"] == 2
    state = payload["state_dict"]
    assert {"model_ema.decay", "model_ema.num_updates", "betas", "alphas_cumprod"} <= state.keys()
    assert any(k.startswith("first_stage_model.") for k in state)
    assert any(k.startswith("cond_stage_model.") for k in state)

    raw = {k: v for k, v in trainer.model.state_dict().items()}
    ema = trainer.ema.averaged_state("model.")
    with_ema = ldm.load_model(CONFIG, tmp_path / "ldm.ckpt").state_dict()
    without = ldm.load_model(CONFIG, tmp_path / "ldm.ckpt", ema=False).state_dict()
    for key, value in raw.items():
        assert torch.equal(without[key], value), key
        assert torch.equal(with_ema[key], ema.get(key, value)), key
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the EMA really differs from the raw weights

    export_pruned(tmp_path / "ldm.ckpt", tmp_path / "pruned.safetensors")
    pruned = ldm.load_model(CONFIG, tmp_path / "pruned.safetensors").state_dict()
    for key, value in with_ema.items():
        # float16 storage: round-to-nearest, relative error <= 2^-11 (denormals aside)
        torch.testing.assert_close(pruned[key], value, rtol=2**-11, atol=1e-7)
