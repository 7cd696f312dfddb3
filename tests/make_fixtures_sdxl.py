"""Generate tests/fixtures/sdxl_modules.safetensors and sdxl_pipeline.safetensors by EXECUTING the original
generative-models (sgm) code on the tiny SDXL base and refiner (tests/configs/tiny-sdxl-*.yaml).

Run with the reference environment and a checkout of Stability-AI/generative-models:

    .venv-ref/bin/python tests/make_fixtures_sdxl.py --sgm DIR

The reference models are the ORIGINAL classes: `instantiate_from_config` of the tiny yaml builds sgm's
DiffusionEngine (UNetModel, DiscreteDenoiser + EpsScaling + LegacyDDPMDiscretization, GeneralConditioner with
FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder2 / ConcatTimestepEmbedderND, AutoencoderKL), loaded with the tiny
random checkpoint of tests/tiny_models.py as sgm's init_from_ckpt does (load_state_dict(strict=False); the
leftovers are checked). Sampling runs the demo itself: scripts/demo/sampling.py run_txt2img, run_img2img and
apply_refiner, with streamlit_helpers.py's init_sampling / get_sampler / do_sample / do_img2img / get_batch
and scripts/demo/discretization.py's wrappers. What the reference environment lacks is stood in for, without
touching any computation:

- no downloads: transformers' CLIPTokenizer.from_pretrained returns the tokenizer built offline from
  open_clip's BPE table (tests/make_fixtures_text.py reference_tokenizer), CLIPTextModel.from_pretrained a
  CLIPTextModel of the yaml's `text_config` (eager attention, as transformers 4.19), and
  open_clip.create_model_and_transforms a CLIP of the yaml's `embed_dim` / `text_cfg`. Those three size
  extensions are removed from the params before sgm sees them (its constructors take no such arguments).
  open_clip 3.x builds its text attention batch-first; sgm's encode_with_transformer feeds the blocks
  sequence-first (L, N, D), as open_clip 2.20 (its requirement) expected, so the reference's
  nn.MultiheadAttention modules are set to batch_first=False, open_clip 2.20's layout.
- transformers 5 drops CLIPTextModel's `text_model.` level from its state_dict: the checkpoint's keys (the
  released transformers-4 layout) are renamed for the reference model.
- xformers: sgm falls back to its PyTorch attention for the UNet (BasicTransformerBlock); the VAE's
  "vanilla-xformers" builds MemoryEfficientAttnBlock, which needs xformers at run time, so the generator
  makes make_attn build AttnBlock (the same weights and attention, torch's SDPA) for it.
- pytorch_lightning (LightningModule -> torch.nn.Module, seed_everything), streamlit (widgets return their
  default value or the case's setting, by label), imwatermark, cv2, imageio and the demo's NSFW filter module
  are stubs: import-time names only. The demo's hard-coded "cuda" (.to("cuda"), .cuda(), samplers' device) is
  mapped to the CPU, and autocast("cuda") is off without CUDA.
- the yaml goes to instantiate_from_config as plain Python containers: at this commit sgm's SpatialTransformer
  recognises a list context_dim only as a `list` (commit 059d8e9 dropped OmegaConf's ListConfig from that
  isinstance check), so the refiner's `context_dim: [1280, ...]` read by OmegaConf is wrapped once more and
  nn.Linear fails on it; plain lists take the branch the code means.
- the demo's do_img2img raises UnboundLocalError (`grid`) after decoding; its result is read from the
  model's decode_first_stage (wrapped to record input and output) and the error is checked to be that one.

Noise as the issue's convention: torch.manual_seed(SEED) immediately before the first draw of a case (the
demo seeds before building its models, whose random init would consume draws). Images are the demo's
clamp((x + 1) / 2, 0, 1), 255 * x truncated to uint8 (perform_save_locally, without its watermark).

Recorded: the sgm commit, the sha256 of every original source file used, package versions and the tiny
checkpoints' digests. Generated with torch 2.14.1, transformers 5.25.0, open_clip_torch 3.3.0, numpy 1.26.4,
scipy 1.17.1 (also in the files' metadata).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
FIXTURES = ROOT / "tests" / "fixtures"

# Shared with tests/test_sdxl_*.py (which import these constants).
CONFIGS = {"base": "tiny-sdxl-base", "refiner": "tiny-sdxl-refiner"}
CKPT_SEED = 0
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor of a lighthouse at dusk, 8k"]
NEGATIVES = ["blurry, low quality", ""]
VALUES = {"orig_height": 768, "orig_width": 1024, "crop_coords_top": 16, "crop_coords_left": 48,
          "target_height": 1024, "target_width": 960, "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}
# off the table, on it, near a midpoint of two neighbours, beyond both ends
DENOISER_SIGMAS = [(0.0292, 14.6146), (0.5, 1.2345), (3.3, 20.0), (0.01, 0.08)]
GRID_STEPS = [1, 2, 3, 7, 10, 50, 999, 1000]
WRAPPED_STEPS = [1, 2, 3, 7, 10, 50]  # the wrappers' cases (kept small: the long grids cost 4 kB each)
STRENGTHS = [0.0, 0.15, 0.3, 0.5, 0.75, 1.0]

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
H = W = 32
C, F = 4, 2  # tiny VAE: ch_mult [1, 2] -> f = 2
N_SAMPLES, STEPS, SEED = 2, 5, 1234
INIT_IMAGE = FIXTURES / "sdxl_init.png"  # 80x72: the demo resizes it to 64x64 (multiples of 64)
SIZE_FLAGS = {"--orig_height": 48, "--orig_width": 64, "--crop_top": 8, "--crop_left": 4}
# name: (mode, config, sampler, schedule, extra CLI flags); the handoff cases add the refiner's flags
CASES = {
    "euler": ("txt2img", "base", "euler", "uniform", []),
    "heun": ("txt2img", "base", "heun", "uniform", []),
    "euler_a": ("txt2img", "base", "euler_a", "uniform", []),
    "dpmpp_2s_a": ("txt2img", "base", "dpmpp_2s_a", "uniform", []),
    "dpmpp_2m": ("txt2img", "base", "dpmpp_2m", "uniform", []),
    "lms": ("txt2img", "base", "lms", "uniform", []),
    "karras": ("txt2img", "base", "euler", "karras", []),
    "dpmpp_2m_karras": ("txt2img", "base", "dpmpp_2m", "karras", []),
    "negative": ("txt2img", "base", "euler", "uniform", ["--negative_prompt", NEGATIVE]),
    "size_crop": ("txt2img", "base", "euler", "uniform", [str(v) for kv in SIZE_FLAGS.items() for v in kv]),
    "euler_a_n_iter2": ("txt2img", "base", "euler_a", "uniform", ["--n_iter", "2"]),
    "img2img": ("img2img", "base", "euler", "uniform", ["--strength", "0.6"]),
    "refiner_img2img": ("img2img", "refiner", "euler_a", "uniform", ["--strength", "0.75"]),
    "refiner_txt2img": ("txt2img", "refiner", "dpmpp_2m", "uniform", ["--negative_prompt", NEGATIVE]),
    "handoff_euler": ("txt2img", "base", "euler", "uniform", ["--refiner_strength", "0.5", "--ddim_steps", "6"]),
    "handoff_euler_a": ("txt2img", "base", "euler_a", "uniform",
                        ["--refiner_strength", "0.4", "--refiner_steps", "4"]),
}
DEMO_SAMPLERS = {"euler": "EulerEDMSampler", "heun": "HeunEDMSampler", "euler_a": "EulerAncestralSampler",
                 "dpmpp_2s_a": "DPMPP2SAncestralSampler", "dpmpp_2m": "DPMPP2MSampler", "lms": "LinearMultistepSampler"}
SOURCES = ["sgm/models/diffusion.py", "sgm/models/autoencoder.py", "sgm/modules/encoders/modules.py",
           "sgm/modules/diffusionmodules/openaimodel.py", "sgm/modules/diffusionmodules/denoiser.py",
           "sgm/modules/diffusionmodules/denoiser_scaling.py", "sgm/modules/diffusionmodules/discretizer.py",
           "sgm/modules/diffusionmodules/sampling.py", "sgm/modules/diffusionmodules/sampling_utils.py",
           "sgm/modules/diffusionmodules/guiders.py", "sgm/modules/diffusionmodules/wrappers.py",
           "sgm/modules/diffusionmodules/model.py", "sgm/modules/diffusionmodules/util.py",
           "sgm/modules/attention.py", "sgm/inference/helpers.py", "scripts/demo/sampling.py",
           "scripts/demo/streamlit_helpers.py", "scripts/demo/discretization.py"]


def cli_args(case: str) -> tuple[str, str, list[str]]:
    """(mode, config name, our CLI flags without --config/--ckpt/--outdir/refiner paths) of a case."""
    mode, model, sampler, schedule, extra = CASES[case]
    args = ["--prompt", PROMPT, "--sampler", sampler, "--schedule", schedule, "--ddim_steps", str(STEPS),
            "--seed", str(SEED), "--n_samples", str(N_SAMPLES), "--n_iter", "1", "--C", str(C), "--f", str(F),
            "--precision", "full", "--device", "cpu", "--skip_grid"]
    if mode == "txt2img":
        args += ["--H", str(H), "--W", str(W)]
    else:
        args += ["--init-img", INIT_IMAGE.relative_to(ROOT).as_posix()]
    return mode, model, _override(args, extra)


def _override(args: list[str], extra: list[str]) -> list[str]:
    """args with the flags of `extra` replacing their earlier values (e.g. --ddim_steps, --n_iter)."""
    args = list(args)
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    return args


def flag(args: list[str], name: str, default=None):
    return args[args.index(name) + 1] if name in args else default


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, dtypes, shapes and bytes: identifies a tiny checkpoint's contents."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_init_image(path: Path) -> None:
    """A smooth deterministic 80x72 (W x H) RGB image (gradients and a disc)."""
    y, x = np.mgrid[0:72, 0:80].astype(np.float64)
    y, x = y / 71, x / 79
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float64)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], axis=-1)
    Image.fromarray((255 * rgb).round().astype(np.uint8)).save(path)


# ------------------------------------------------------------------------------------------------- stand-ins
class Streamlit(types.ModuleType):
    """streamlit's widgets return `settings[label]` when set (and, for a selectbox, among its options), else
    their default; everything else is a no-op."""

    def __init__(self):
        super().__init__("streamlit")
        self.settings = {}
        self.sidebar = self

    def cache_resource(self, *args, **kwargs):
        return lambda f: f

    def number_input(self, label, *args, value=None, **kwargs):
        return self.settings.get(label, value)

    def text_input(self, label, value="", *args, **kwargs):
        return self.settings.get(label, value)

    def selectbox(self, label, options, index=0, *args, **kwargs):
        chosen = self.settings.get(label)
        return chosen if chosen in options else options[index]

    def checkbox(self, label, value=False, *args, **kwargs):
        return self.settings.get(label, value)

    def button(self, *args, **kwargs):
        return True

    def file_uploader(self, *args, **kwargs):
        return self.settings.get("file_uploader")

    def empty(self):
        return self

    def __getattr__(self, name):  # text, write, info, warning, image, title, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


class _WatermarkEncoder:
    def set_watermark(self, *args):
        pass

    def encode(self, image, method):
        return image


def install_stubs() -> Streamlit:
    _stub("pytorch_lightning", LightningModule=torch.nn.Module, seed_everything=lambda seed: torch.manual_seed(seed))
    _stub("imwatermark", WatermarkEncoder=_WatermarkEncoder)
    _stub("cv2")
    _stub("imageio")
    st = Streamlit()
    sys.modules["streamlit"] = st
    return st


@contextlib.contextmanager
def cuda_on_cpu():
    """The demo's hard-coded "cuda" placements, on the CPU (no CUDA here)."""
    to, tensor_cuda, module_cuda = torch.Tensor.to, torch.Tensor.cuda, torch.nn.Module.cuda

    def cpu(device):
        return "cpu" if isinstance(device, str) and device.startswith("cuda") else device

    def to_cpu(self, *args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = cpu(kwargs["device"])
        return to(self, *(cpu(a) for a in args), **kwargs)

    torch.Tensor.to = to_cpu
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.cuda, torch.nn.Module.cuda = to, tensor_cuda, module_cuda


class Originals:
    """The original modules, imported from the checkout with the stand-ins installed."""

    def __init__(self, sgm_dir: Path):
        self.st = install_stubs()
        sys.path.insert(0, str(sgm_dir))
        import importlib

        names = ["sgm.util", "sgm.models.diffusion", "sgm.modules.diffusionmodules.model",
                 "sgm.modules.diffusionmodules.sampling", "sgm.modules.diffusionmodules.discretizer",
                 "scripts.demo.discretization"]
        mods = {n: importlib.import_module(n) for n in names}
        # the demo's NSFW filter module needs cv2 / models; a name is all the demo imports of it
        _stub("scripts.util.detection.nsfw_and_watermark_dectection", DeepFloydDataFiltering=object)
        self.helpers = importlib.import_module("scripts.demo.streamlit_helpers")
        self.demo = importlib.import_module("scripts.demo.sampling")
        self.util = mods["sgm.util"]
        self.discretizer = mods["sgm.modules.diffusionmodules.discretizer"]
        self.wrappers = mods["scripts.demo.discretization"]
        model = mods["sgm.modules.diffusionmodules.model"]
        model.MemoryEfficientAttnBlock = model.AttnBlock  # "vanilla-xformers" without xformers (see docstring)
        sampling = mods["sgm.modules.diffusionmodules.sampling"]
        init = sampling.BaseDiffusionSampler.__init__

        def init_on_cpu(sampler, *args, **kwargs):  # the samplers' default device is "cuda"
            init(sampler, *args, **kwargs)
            sampler.device = "cpu"

        sampling.BaseDiffusionSampler.__init__ = init_on_cpu


def build_reference(originals: Originals, config_path: Path, state: dict[str, torch.Tensor]):
    """sgm's DiffusionEngine of a tiny yaml with `state` loaded as init_from_ckpt does (strict=False)."""
    import open_clip
    import transformers
    from make_fixtures_text import reference_tokenizer
    from omegaconf import OmegaConf
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    config = OmegaConf.load(config_path)
    clip_sizes, openclip_sizes = [], []
    for emb in config.model.params.conditioner_config.params.emb_models:
        params = emb.get("params", {})
        if emb.target.endswith(".FrozenCLIPEmbedder"):
            clip_sizes.append(OmegaConf.to_container(params.pop("text_config")))
        elif emb.target.endswith(".FrozenOpenCLIPEmbedder2"):
            openclip_sizes.append((params.pop("embed_dim"), OmegaConf.to_container(params.pop("text_cfg"))))

    def clip_model(version, *args, **kwargs):
        config = transformers.CLIPTextConfig(**clip_sizes.pop(0), attn_implementation="eager")
        return transformers.CLIPTextModel(config)

    def openclip_model(arch, device=None, pretrained=None, **kwargs):
        embed_dim, text_cfg = openclip_sizes.pop(0)
        vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)  # deleted by sgm
        model = CLIP(embed_dim, vision, CLIPTextCfg(**text_cfg))
        for block in model.transformer.resblocks:  # open_clip 2.20's sequence-first attention (see docstring)
            block.attn.batch_first = False
        return model, None, None

    patches = [(transformers.CLIPTokenizer, "from_pretrained", lambda *a, **k: reference_tokenizer()),
               (transformers.CLIPTextModel, "from_pretrained", clip_model),
               (open_clip, "create_model_and_transforms", openclip_model)]
    saved = [(obj, name, vars(obj).get(name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        model = originals.util.instantiate_from_config(OmegaConf.to_container(config.model, resolve=True))
    finally:
        for obj, name, value in saved:
            if value is None:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
    own = model.state_dict()
    renamed = {}
    for key, value in state.items():
        flat = key.replace(".transformer.text_model.", ".transformer.")  # transformers 5's CLIPTextModel keys
        renamed[flat if flat in own and key not in own else key] = value
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not missing, missing
    assert all(k.endswith("position_ids") for k in unexpected), unexpected  # a non-persistent buffer now
    return model.eval()


# ---------------------------------------------------------------------------------------------- module parity
def module_fixture(originals: Originals, models: dict) -> dict[str, torch.Tensor]:
    out = {}
    g = torch.Generator().manual_seed(SEED)
    for name, model in models.items():
        keys = originals.helpers.get_unique_embedder_keys_from_conditioner(model.conditioner)
        value_dict = {**VALUES, "prompt": PROMPTS[0], "negative_prompt": NEGATIVES[0]}
        batch, batch_uc = originals.helpers.get_batch(keys, value_dict, [2], device="cpu")
        batch["txt"], batch_uc["txt"] = list(PROMPTS), list(NEGATIVES)
        c, uc_zero = model.conditioner.get_unconditional_conditioning(batch, batch_uc, force_uc_zero_embeddings=["txt"])
        _, uc = model.conditioner.get_unconditional_conditioning(batch, batch_uc)
        for tag, cond in (("cond", c), ("uncond_zero", uc_zero), ("uncond", uc)):
            for k, v in cond.items():
                out[f"{name}.{tag}.{k}"] = v
        x = torch.randn(2, C, 16, 16, generator=g)
        t = torch.tensor([999, 37])
        out[f"{name}.x"], out[f"{name}.t"] = x, t
        out[f"{name}.unet"] = model.model(x, t, c)  # OpenAIWrapper -> UNetModel(x, timesteps, context, y)
        for i, pair in enumerate(DENOISER_SIGMAS):
            sigma = torch.tensor(pair, dtype=torch.float32)
            out[f"{name}.denoiser.{i}.sigma"] = sigma
            out[f"{name}.denoiser.{i}"] = model.denoiser(model.model, x, sigma, c)
        out[f"{name}.sigmas"] = model.denoiser.sigmas
        # the VAE: encoder moments, a seeded posterior sample (the regularizer's randn), the decode
        image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        vae = model.first_stage_model
        out[f"{name}.vae.image"] = image
        out[f"{name}.vae.moments"] = vae.quant_conv(vae.encoder(image))
        torch.manual_seed(SEED)
        out[f"{name}.vae.z"] = model.encode_first_stage(image)  # scale_factor * posterior sample
        out[f"{name}.vae.decoded"] = model.decode_first_stage(out[f"{name}.vae.z"])
    # the discretizations and the demo's wrappers
    sigmas = models["base"].denoiser.sigmas
    legacy = originals.discretizer.LegacyDDPMDiscretization()
    edm = originals.discretizer.EDMDiscretization(sigma_min=float(sigmas[0]), sigma_max=float(sigmas[-1]), rho=7.0)
    for n in GRID_STEPS:
        out[f"grid.uniform.{n}"] = legacy(n)
        out[f"grid.karras.{n}"] = edm(n)
        for s in STRENGTHS if n in WRAPPED_STEPS else []:
            out[f"grid.img2img.{n}.{s}"] = originals.wrappers.Img2ImgDiscretizationWrapper(legacy, s)(n)
            out[f"grid.txt2noisy.{n}.{s}"] = originals.wrappers.Txt2NoisyDiscretizationWrapper(legacy, s, n)(n)
    return out


# ------------------------------------------------------------------------------ samplers on an exact denoiser
TOY_STEPS = 6
TOY_CASES = {  # name: (our sampler, demo sampler settings)
    **{f"{ours}.{schedule}": (ours, schedule, {}) for ours in DEMO_SAMPLERS for schedule in ("uniform", "karras")},
    "euler.churn": ("euler", "uniform", {"s_churn #1": 2.0, "s_tmin #1": 0.5, "s_tmax #1": 10.0}),
    "heun.churn": ("heun", "uniform", {"s_churn #1": 2.0}),
}


def toy_denoiser(x, sigma, c):
    """A denoiser with a closed form (the posterior mean of N(m, 1) data, m read from the conditioning), so
    the samplers' arithmetic is compared alone, bit for bit where they agree op for op."""
    s = sigma[:, None, None, None]
    return (x + c["vector"][:, :1, None, None] * s**2) / (1 + s**2)


def toy_conditioning() -> tuple[dict, dict]:
    return {"vector": torch.tensor([[0.5], [-1.0]])}, {"vector": torch.tensor([[0.0], [0.25]])}


def sampler_fixture(originals: Originals, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
    """sgm's samplers as the demo configures them (get_sampler, VanillaCFG 5.0) on toy_denoiser."""
    out = {}
    cond, uncond = toy_conditioning()
    for case, (ours, schedule, extra) in TOY_CASES.items():
        originals.st.settings = {"sigma_min #1": float(sigmas[0]), "sigma_max #1": float(sigmas[-1]), "rho #1": 7.0,
                                 **extra}
        discretization = {"uniform": "LegacyDDPMDiscretization", "karras": "EDMDiscretization"}[schedule]
        sampler = originals.helpers.get_sampler(
            DEMO_SAMPLERS[ours], TOY_STEPS, originals.helpers.get_discretization(discretization, options={}),
            {"target": "sgm.modules.diffusionmodules.guiders.VanillaCFG", "params": {"scale": 5.0}})
        torch.manual_seed(SEED)
        x = torch.randn(2, 4, 8, 8)
        out[f"toy.{case}"] = sampler(toy_denoiser, x.clone(), cond, uncond)
    return out


# --------------------------------------------------------------------------------------------- demo runs
class Recorder:
    """Wraps a model's decode_first_stage to keep its last input (the sampler's latents) and output."""

    def __init__(self, model):
        self.model, self.decode = model, model.decode_first_stage
        model.decode_first_stage = self

    def __call__(self, z):
        self.z, self.x = z, self.decode(z)
        return self.x


def _expect_grid_bug(run):
    """Run a demo img2img call; its do_img2img ends with UnboundLocalError on `grid` after decoding."""
    try:
        run()
    except UnboundLocalError as e:
        assert "grid" in str(e), e
    else:
        raise AssertionError("the demo's do_img2img no longer fails on `grid`: read its return value instead")


def demo_settings(originals: Originals, args: list[str], model, key: int) -> dict:
    """The streamlit widget values of one sampler (init_sampling's key) for our CLI flags."""
    sigmas = model.denoiser.sigmas
    settings = {f"Sampler #{key}": DEMO_SAMPLERS[flag(args, "--sampler")],
                f"steps #{key}": int(flag(args, "--ddim_steps")),
                f"Discretization #{key}": {"uniform": "LegacyDDPMDiscretization",
                                           "karras": "EDMDiscretization"}[flag(args, "--schedule")],
                # karras: EDMDiscretization(sigma_min = sigmas[0], sigma_max = sigmas[-1], rho 7)
                f"sigma_min #{key}": float(sigmas[0]), f"sigma_max #{key}": float(sigmas[-1]), f"rho #{key}": 7.0}
    if key == 1:
        settings["num cols #1"] = N_SAMPLES
    return settings


def run_demo(originals: Originals, case: str, models: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, images in [0, 1]) of one case, through the demo's own functions."""
    st, demo = originals.st, originals.demo
    mode, config, args = cli_args(case)
    model = models[config]
    is_legacy = config == "refiner"  # VERSION2SPECS: the refiner is "is_legacy" (no zeroed uncond text)
    negative = flag(args, "--negative_prompt", "")
    if negative and not is_legacy:
        is_legacy = True  # a given negative prompt is encoded, not zeroed (the convention 3)
    st.settings = demo_settings(originals, args, model, 1)
    st.settings.update({"H": H, "W": W, "**Img2Img Strength**": float(flag(args, "--strength", 0.75)),
                        "file_uploader": str(INIT_IMAGE)})
    for name, widget in (("--orig_height", "orig_height"), ("--orig_width", "orig_width"),
                         ("--crop_top", "crop_coords_top"), ("--crop_left", "crop_coords_left")):
        if name in args:
            st.settings[widget] = int(flag(args, name))
    demo.prompt, demo.negative_prompt = PROMPT, negative
    version_dict = {"H": H, "W": W, "C": C, "f": F, "is_legacy": is_legacy}
    refiner_strength = flag(args, "--refiner_strength")
    with torch.no_grad(), cuda_on_cpu():
        if refiner_strength is not None:  # sampling.py __main__: sampler2 first, then txt2img, then the refiner
            strength = float(refiner_strength)
            steps2 = int(flag(args, "--refiner_steps", flag(args, "--ddim_steps")))
            st.settings.update(demo_settings(originals, _override(args, ["--ddim_steps", str(steps2)]),
                                             models["refiner"], 2))
            sampler2, *_ = demo.init_sampling(key=2, img2img_strength=strength, specify_num_samples=False)
            torch.manual_seed(SEED)
            _, samples_z = demo.run_txt2img({"model": model}, "SDXL-tiny-base", version_dict, is_legacy=False,
                                            return_latents=True, filter=None, stage2strength=strength)
            recorder = Recorder(models["refiner"])
            _expect_grid_bug(lambda: demo.apply_refiner(samples_z, {"model": models["refiner"]}, sampler2,
                                                        samples_z.shape[0], prompt=PROMPT, negative_prompt=negative,
                                                        filter=None, finish_denoising=True))
            del models["refiner"].decode_first_stage
            return recorder.z, torch.clamp((recorder.x + 1.0) / 2.0, min=0.0, max=1.0)
        torch.manual_seed(SEED)
        if mode == "img2img":
            recorder = Recorder(model)
            _expect_grid_bug(lambda: demo.run_img2img({"model": model}, version_dict, is_legacy=is_legacy,
                                                      return_latents=True, filter=None))
            del model.decode_first_stage
            return recorder.z, torch.clamp((recorder.x + 1.0) / 2.0, min=0.0, max=1.0)
        latents, images = [], []
        for _ in range(int(flag(args, "--n_iter"))):  # batches in turn, the generator not reseeded
            samples, samples_z = demo.run_txt2img({"model": model}, "SDXL-tiny", version_dict, is_legacy=is_legacy,
                                                  return_latents=True, filter=None)
            latents.append(samples_z)
            images.append(samples)
        return torch.cat(latents), torch.cat(images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    # perform_save_locally: 255.0 * sample, astype(np.uint8) (its watermark left out, as our CLI)
    return torch.from_numpy((255.0 * images.permute(0, 2, 3, 1).numpy()).astype(np.uint8))


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", "transformers", "tokenizers", "open_clip_torch", "numpy", "scipy", "einops", "omegaconf",
             "Pillow"]
    return {name: version(name) for name in names}


def sgm_commit(sgm_dir: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(sgm_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # an extracted tree: the COMMITS.txt beside it, if any
        listing = sgm_dir.parent / "COMMITS.txt"
        if listing.exists():
            for line in listing.read_text().splitlines():
                if line.split()[:1] == [sgm_dir.name]:
                    return line.split()[1]
        return "unknown"


def main(argv=None) -> None:
    from safetensors.torch import save_file

    from tiny_models import tiny_config_path, tiny_state_dict

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sgm", type=Path, required=True, help="checkout of Stability-AI/generative-models")
    args = p.parse_args(argv)
    originals = Originals(args.sgm)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # deterministic op order; the machine is shared
    make_init_image(INIT_IMAGE)
    states = {name: tiny_state_dict(tiny_config_path(config), seed=CKPT_SEED) for name, config in CONFIGS.items()}
    models = {name: build_reference(originals, tiny_config_path(config), states[name])
              for name, config in CONFIGS.items()}
    metadata = {
        "generator": "tests/make_fixtures_sdxl.py",
        "upstream": "Stability-AI/generative-models@" + sgm_commit(args.sgm),
        "original_sources": json.dumps({f: hashlib.sha256((args.sgm / f).read_bytes()).hexdigest() for f in SOURCES}),
        "versions": json.dumps(versions()),
        **{f"checkpoint_digest.{name}": state_digest(state) for name, state in states.items()},
        **{f"config.{name}": f"tests/configs/{config}.yaml" for name, config in CONFIGS.items()},
    }
    with cuda_on_cpu():  # the embedders' device is "cuda" (their default)
        modules = module_fixture(originals, models)
        modules.update(sampler_fixture(originals, models["base"].denoiser.sigmas))
    path = FIXTURES / "sdxl_modules.safetensors"
    save_file({k: v.contiguous() for k, v in modules.items()}, str(path), metadata=metadata)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)")
    tensors, case_meta = {}, {}
    for case in CASES:
        latents, images = run_demo(originals, case, models)
        tensors[f"{case}.latents"], tensors[f"{case}.images"] = latents, to_uint8(images)
        case_meta[f"argv.{case}"] = json.dumps(cli_args(case))
        print(f"{case}: latents std {latents.std():.3f}, image mean {tensors[f'{case}.images'].float().mean():.1f}")
    path = FIXTURES / "sdxl_pipeline.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={**metadata, **case_meta})
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
