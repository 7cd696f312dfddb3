"""Generate tests/fixtures/pipeline_<model>.safetensors: expected images of the whole txt2img / img2img CLI.

Run with the reference environment (none of these packages is a dependency of ldm):

    .venv-ref/bin/python tests/make_fixtures_pipeline.py --compvis DIR --stability DIR

with DIR a checkout of CompVis/stable-diffusion and of Stability-AI/stablediffusion.

For the tiny v1, v2 and v2-v models (tests/configs/tiny-*.yaml, random checkpoints from
tests/tiny_models.make_tiny_checkpoint, EMA weights as the original's ema_scope) this builds an INDEPENDENT
reference pipeline from reference parts and runs the original scripts' steps with the team's noise convention:

- text: transformers' CLIPTextModel (v1, last hidden state, as FrozenCLIPEmbedder) on ids of transformers'
  CLIPTokenizer; open_clip's text tower (v2, penultimate block then ln_final, as Stability-AI
  FrozenOpenCLIPEmbedder) on open_clip.tokenize ids; weights taken from the checkpoint's cond_stage_model.*;
- UNet and VAE: diffusers' UNet2DConditionModel and AutoencoderKL, configured and loaded through diffusers'
  own converter of original checkpoints (single_file_utils.create_*_diffusers_config_from_ldm,
  convert_ldm_*_checkpoint; strict loading);
- samplers: the ORIGINAL DDIM / PLMS classes (CompVis/stable-diffusion for v1, Stability-AI/stablediffusion
  for v2, which adds v-prediction to DDIM), imported from those checkouts under the package name `ldm` while our
  own `ldm` is set aside; k-diffusion 0.1.1 (CompVisDenoiser / CompVisVDenoiser, get_sigmas,
  sample_euler_ancestral, sample_dpmpp_2m) for the k-family, with the usual CFG wrapper of its scripts.
  Stability's PLMS has no v-prediction branch (it would treat v as eps); for tiny-v2-v the PLMS reference
  gets the eps the v output implies (DDPM.predict_eps_from_z_and_v), which is what a v-aware PLMS computes.
- noise: one CPU torch.Generator seeded with the seed; txt2img draws x_T = randn([n, C, H/f, W/f]) first
  (k-family: x = x_T * sigmas[0]) and per-step noise from the same generator; img2img draws the posterior
  sample of the init image first, then the forward-noising noise.
- images: clamp((x + 1) / 2, 0, 1), 255 * x truncated to uint8, as the original scripts.

Generated with torch 2.14.1, diffusers 0.42.1, transformers 5.23.0, open_clip_torch 3.3.0, k-diffusion 0.1.1
(also recorded in each file's metadata). Each file holds, per case, the uint8 images `<case>` (n, H, W, 3) and records the CLI flags (`argv.<case>`),
the package versions, the sha256 of the original source files used and a digest of the tiny checkpoint's
tensors (the test regenerates the checkpoint and checks that digest before comparing).
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from originals import import_original  # noqa: E402
FIXTURES = ROOT / "tests" / "fixtures"

# Shared with tests/test_pipeline.py (which imports these constants).
MODELS = {"v1": "tiny-v1", "v2": "tiny-v2", "v2-v": "tiny-v2-v"}
CKPT_SEED = 0
PROMPT = "a painting of a virus monster playing guitar"
NEGATIVE = "blurry, low quality"
H = W = 32
C, F = 4, 2  # tiny VAE: ch_mult [1, 2] -> f = 2
N_SAMPLES, STEPS, SEED = 2, 5, 1234
INIT_IMAGE = FIXTURES / "pipeline_init.png"
CASES = {  # name: (mode, sampler, extra CLI flags)
    "ddim": ("txt2img", "ddim", []),
    "plms": ("txt2img", "plms", []),
    "euler_a": ("txt2img", "euler_a", []),
    "dpmpp_2m": ("txt2img", "dpmpp_2m", []),
    "negative": ("txt2img", "ddim", ["--negative_prompt", NEGATIVE]),
    "img2img": ("img2img", "ddim", ["--strength", "0.75"]),
}
TXT2IMG_SCALE, IMG2IMG_SCALE, STRENGTH = 7.5, 5.0, 0.75  # the original scripts' defaults


def cli_args(mode: str, sampler: str, extra: list[str]) -> list[str]:
    """Flags of our CLI for one case (without --config/--ckpt/--outdir, which the test adds)."""
    args = ["--prompt", PROMPT, "--sampler", sampler, "--ddim_steps", str(STEPS), "--seed", str(SEED),
            "--n_samples", str(N_SAMPLES), "--n_iter", "1", "--C", str(C), "--f", str(F),
            "--precision", "full", "--device", "cpu", "--skip_grid"]
    if mode == "txt2img":
        args += ["--H", str(H), "--W", str(W)]
    else:
        args += ["--init-img", INIT_IMAGE.relative_to(ROOT).as_posix()]  # the test resolves it from the root
    return args + extra


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, dtypes, shapes and bytes: identifies the tiny checkpoint's contents."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_init_image(path: Path) -> None:
    """A smooth deterministic 32x32 RGB image (gradients and a disc), stored as PNG."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64) / (H - 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float64)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], axis=-1)
    Image.fromarray((255 * rgb).round().astype(np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------- originals
def import_k_diffusion():
    # k-diffusion 0.1.1 imports `clip`, which imports pkg_resources (gone from setuptools >= 81) only for
    # packaging.version; give it that much so k_diffusion.sampling / external import.
    if "pkg_resources" not in sys.modules:
        import packaging.version

        stub = types.ModuleType("pkg_resources")
        stub.packaging = packaging
        sys.modules["pkg_resources"] = stub
    import k_diffusion

    return k_diffusion


class OriginalModel:
    """What the original samplers read from a LatentDiffusion (ddpm.py DDPM.register_schedule buffers,
    apply_model, parameterization), around the diffusers UNet."""

    def __init__(self, unet, cfg: dict, util, parameterization: str, eps_only: bool = False):
        params = cfg["model"]["params"]
        betas = util.make_beta_schedule("linear", params["timesteps"], linear_start=params["linear_start"],
                                        linear_end=params["linear_end"])
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        to_torch = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731 (as register_schedule)
        self.unet, self.num_timesteps, self.device = unet, int(params["timesteps"]), torch.device("cpu")
        self.betas = to_torch(betas)
        self.alphas_cumprod = to_torch(alphas_cumprod)
        self.alphas_cumprod_prev = to_torch(np.append(1.0, alphas_cumprod[:-1]))
        self.sqrt_alphas_cumprod = to_torch(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = to_torch(np.sqrt(1.0 - alphas_cumprod))
        self.v_model = parameterization == "v"
        self.eps_only = eps_only and self.v_model
        self.parameterization = "eps" if self.eps_only else parameterization
        self._extract = util.extract_into_tensor

    def predict_eps_from_z_and_v(self, x_t, t, v):  # ddpm.py DDPM.predict_eps_from_z_and_v
        return (self._extract(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def predict_start_from_z_and_v(self, x_t, t, v):  # ddpm.py DDPM.predict_start_from_z_and_v
        return (self._extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def apply_model(self, x, t, cond):
        out = self.unet(x, t, encoder_hidden_states=cond).sample
        return self.predict_eps_from_z_and_v(x, t.long(), out) if self.eps_only else out


def cpu_sampler(cls):
    """The original sampler classes move their buffers to CUDA (CompVis) or to `device`; keep them here."""

    class Sampler(cls):
        def register_buffer(self, name, attr):
            setattr(self, name, attr)

    return Sampler


class CFGDenoiser(torch.nn.Module):
    """Classifier-free guidance around a k-diffusion denoiser, as in k-diffusion's sample_clip_guided /
    A1111: one batched call on [uncond, cond], then uncond + (cond - uncond) * scale."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma, uncond, cond, cond_scale):
        if uncond is None:
            return self.inner(x, sigma, cond=cond)
        x_in, sigma_in, cond_in = torch.cat([x] * 2), torch.cat([sigma] * 2), torch.cat([uncond, cond])
        out_uncond, out_cond = self.inner(x_in, sigma_in, cond=cond_in).chunk(2)
        return out_uncond + (out_cond - out_uncond) * cond_scale


# ------------------------------------------------------------------------------------------ reference parts
def lit_ema_key(unet_key: str) -> str:
    # ldm/modules/ema.py LitEma: buffer name = parameter name of the DiffusionWrapper without dots
    return "model_ema." + unet_key[len("model."):].replace(".", "")


class Reference:
    """Text encoder, UNet and VAE of one tiny checkpoint, built from the reference packages."""

    def __init__(self, cfg: dict, state: dict[str, torch.Tensor]):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import (
            convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
            create_vae_diffusers_config_from_ldm)
        from diffusers.models.attention_processor import AttnProcessor

        params = cfg["model"]["params"]
        self.scale_factor = params["scale_factor"]
        self.parameterization = params.get("parameterization", "eps")
        # the original's ema_scope: the UNet runs with the EMA weights
        unet_ckpt = {k: state[lit_ema_key(k)] for k in state if k.startswith("model.diffusion_model.")}
        config = create_unet_diffusers_config_from_ldm(cfg, unet_ckpt, image_size=H)
        self.unet = UNet2DConditionModel(**config)
        self.unet.load_state_dict(convert_ldm_unet_checkpoint(unet_ckpt, config), strict=True)
        self.unet.set_attn_processor(AttnProcessor())
        self.unet.eval()
        vae_ckpt = {k: v for k, v in state.items() if k.startswith("first_stage_model.")}
        vconfig = create_vae_diffusers_config_from_ldm(cfg, vae_ckpt, image_size=H)
        self.vae = AutoencoderKL(**vconfig)
        self.vae.load_state_dict(convert_ldm_vae_checkpoint(vae_ckpt, vconfig), strict=True)
        self.vae.eval()
        text = params["cond_stage_config"]
        self.encode = self._openclip(text, state) if "OpenCLIP" in text["target"] else self._clip(text, state)

    @staticmethod
    def _clip(text: dict, state):
        """FrozenCLIPEmbedder (CompVis encoders/modules.py): CLIPTokenizer(truncation, max_length 77,
        padding max_length) -> CLIPTextModel(...).last_hidden_state."""
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
        from make_fixtures_text import reference_tokenizer
        from transformers import CLIPTextConfig, CLIPTextModel

        model = CLIPTextModel(CLIPTextConfig(**text["params"]["text_config"], attn_implementation="eager"))
        weights = convert_ldm_clip_checkpoint(state)
        own = model.state_dict()
        if not any(k.startswith("text_model.") for k in own):  # transformers 5 flattens CLIPTextModel
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        weights = {k: v for k, v in weights.items() if k in own or not k.endswith("position_ids")}
        model.load_state_dict(weights, strict=True)
        model.eval()
        tokenizer = reference_tokenizer()

        def encode(prompts: list[str]) -> torch.Tensor:
            ids = tokenizer(prompts, truncation=True, max_length=77, padding="max_length",
                            return_tensors="pt").input_ids
            return model(input_ids=ids).last_hidden_state

        return encode

    @staticmethod
    def _openclip(text: dict, state):
        """FrozenOpenCLIPEmbedder (Stability-AI encoders/modules.py), layer "penultimate"."""
        import open_clip
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)  # deleted below
        model = CLIP(text["params"]["embed_dim"], vision, CLIPTextCfg(**text["params"]["text_cfg"]))
        del model.visual
        prefix = "cond_stage_model.model."
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        model.eval()

        def encode(prompts: list[str]) -> torch.Tensor:
            x = model.token_embedding(open_clip.tokenize(prompts)) + model.positional_embedding
            x = x if model.transformer.batch_first else x.transpose(0, 1)
            for block in model.transformer.resblocks[:-1]:  # layer_idx 1: all blocks but the last
                x = block(x, attn_mask=model.attn_mask)
            x = x if model.transformer.batch_first else x.transpose(0, 1)
            return model.ln_final(x)

        return encode


def load_img(path: Path) -> torch.Tensor:
    """As img2img.py load_img: RGB, size rounded down to a multiple of 32 (LANCZOS), [-1, 1], (1, 3, H, W)."""
    image = Image.open(path).convert("RGB")
    w, h = (v - v % 32 for v in image.size)
    image = image.resize((w, h), resample=Image.LANCZOS)
    array = np.array(image).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array[None].transpose(0, 3, 1, 2)) - 1.0


def run_case(ref: Reference, cfg: dict, originals: dict, mode: str, sampler: str, negative: str) -> np.ndarray:
    util, ddim, plms = originals["util"], originals["ddim"], originals["plms"]
    kd = import_k_diffusion()
    gen = torch.Generator().manual_seed(SEED)
    scale = TXT2IMG_SCALE if mode == "txt2img" else IMG2IMG_SCALE
    cond = ref.encode([PROMPT] * N_SAMPLES)
    uncond = ref.encode([negative] * N_SAMPLES) if scale != 1.0 else None
    model = OriginalModel(ref.unet, cfg, util, ref.parameterization, eps_only=sampler == "plms")
    shape = [C, H // F, W // F]
    if mode == "img2img":
        image = load_img(INIT_IMAGE).repeat(N_SAMPLES, 1, 1, 1)
        init_latent = ref.scale_factor * ref.vae.encode(image).latent_dist.sample(generator=gen)
        noise = torch.randn(init_latent.shape, generator=gen)
        s = cpu_sampler(ddim.DDIMSampler)(model)
        s.make_schedule(ddim_num_steps=STEPS, ddim_eta=0.0, verbose=False)
        t_enc = int(STRENGTH * STEPS)
        z_enc = s.stochastic_encode(init_latent, torch.tensor([t_enc] * N_SAMPLES), noise=noise)
        samples = s.decode(z_enc, cond, t_enc, unconditional_guidance_scale=scale,
                           unconditional_conditioning=uncond)
    elif sampler in ("ddim", "plms"):
        x_T = torch.randn([N_SAMPLES, *shape], generator=gen)
        cls = ddim.DDIMSampler if sampler == "ddim" else plms.PLMSSampler
        samples, _ = cpu_sampler(cls)(model).sample(
            S=STEPS, conditioning=cond, batch_size=N_SAMPLES, shape=shape, verbose=False,
            unconditional_guidance_scale=scale, unconditional_conditioning=uncond, eta=0.0, x_T=x_T)
    else:
        x_T = torch.randn([N_SAMPLES, *shape], generator=gen)
        wrapper = kd.external.CompVisVDenoiser if ref.parameterization == "v" else kd.external.CompVisDenoiser
        denoiser = wrapper(model)
        sigmas = denoiser.get_sigmas(STEPS)
        x = x_T * sigmas[0]
        extra = dict(cond=cond, uncond=uncond, cond_scale=scale)
        if sampler == "euler_a":
            samples = kd.sampling.sample_euler_ancestral(
                CFGDenoiser(denoiser), x, sigmas, extra_args=extra, disable=True,
                noise_sampler=lambda sigma, sigma_next: torch.randn(x.shape, generator=gen))
        else:
            samples = kd.sampling.sample_dpmpp_2m(CFGDenoiser(denoiser), x, sigmas, extra_args=extra, disable=True)
    images = ref.vae.decode(samples / ref.scale_factor).sample
    images = torch.clamp((images + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * images.permute(0, 2, 3, 1).numpy()).astype(np.uint8)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", "diffusers", "transformers", "open_clip_torch", "k-diffusion", "numpy", "Pillow"]
    return {name: version(name) for name in names}


def main(argv=None) -> None:
    import argparse

    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compvis", type=Path, required=True, help="checkout of CompVis/stable-diffusion")
    p.add_argument("--stability", type=Path, required=True, help="checkout of Stability-AI/stablediffusion")
    args = p.parse_args(argv)

    from tiny_models import tiny_config_path, tiny_state_dict

    FIXTURES.mkdir(parents=True, exist_ok=True)
    make_init_image(INIT_IMAGE)
    sources = {"compvis": args.compvis, "stability": args.stability}
    modules = ["ldm.modules.diffusionmodules.util", "ldm.models.diffusion.ddim", "ldm.models.diffusion.plms"]
    originals = {}
    for name, repo in sources.items():
        util, ddim, plms = import_original(repo, modules)
        originals[name] = {"util": util, "ddim": ddim, "plms": plms}
    files = [f"{name}:{rel}" for name in sources for rel in
             ("ldm/modules/diffusionmodules/util.py", "ldm/models/diffusion/ddim.py", "ldm/models/diffusion/plms.py")]
    hashes = {f: hashlib.sha256((sources[f.split(":")[0]] / f.split(":")[1]).read_bytes()).hexdigest() for f in files}
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # deterministic op order; the machine is shared
    for model_name, config_name in MODELS.items():
        config_path = tiny_config_path(config_name)
        cfg = yaml.safe_load(config_path.read_text())
        state = tiny_state_dict(config_path, seed=CKPT_SEED)
        ref = Reference(cfg, state)
        original = originals["compvis" if model_name == "v1" else "stability"]
        tensors, metadata = {}, {}
        for case, (mode, sampler, extra) in CASES.items():
            negative = NEGATIVE if case == "negative" else ""
            tensors[case] = torch.from_numpy(run_case(ref, cfg, original, mode, sampler, negative))
            metadata[f"argv.{case}"] = json.dumps([mode] + cli_args(mode, sampler, extra))
            print(f"{model_name} {case}: mean {tensors[case].float().mean():.1f}, "
                  f"std {tensors[case].float().std():.1f}")
        metadata.update({
            "generator": "tests/make_fixtures_pipeline.py",
            "config": str(config_path.relative_to(ROOT)),
            "checkpoint": f"tests/tiny_models.make_tiny_checkpoint(config, seed={CKPT_SEED})",
            "checkpoint_digest": state_digest(state),
            "original_sources": json.dumps(hashes),
            "versions": json.dumps(versions()),
        })
        path = FIXTURES / f"pipeline_{model_name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
