"""The flags of scripts/txt2img.py and scripts/img2img.py: those of the CompVis/stable-diffusion scripts with
their defaults (v2's `--steps` is an alias of `--ddim_steps`), plus ours (--sampler, --schedule,
--negative_prompt, --no-ema, --vae, --device and the speed and memory flags, --fast auto by default; README, Speed).
scripts/inpaint.py takes img2img's flags but the size ones (the output has the init image's size) and --mask;
its defaults are the inpainting demos' where they have one (ldm/inpaint.py)."""

from __future__ import annotations

import argparse

import torch

import ldm
from ldm.models.attention import ATTENTION_BACKENDS, DEFAULT_SLICE_SIZE
from ldm.samplers import SAMPLERS

# every sampler takes "uniform"; the k-family also karras / exponential, the originals' family "quad"
SCHEDULES = tuple(dict.fromkeys(name for spec in SAMPLERS.values() for name in spec.valid_schedules))
PRECISIONS = {"full": torch.float32, "autocast": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DPM_SOLVER = "dpm_solver"  # registry name of the original DPMSolverSampler (--dpm_solver)
DEFAULT_TILE_OVERLAP = 16  # latent pixels: 128 px of cross-fade between 512 px tiles (ldm/tiling.py)

EPILOG = ("Unlike the original scripts, no NSFW safety checker and no invisible watermark are applied "
          "(opt-in flags may be added later). All batches of a run draw their noise, in turn, from one CPU "
          "generator seeded with --seed, so a seed gives the same images on any device. Every PNG carries "
          "its parameters (Seed: the run's --seed, Batch number, Batch pos); scripts/rerun.py regenerates "
          "an image from them.")


class CLIError(Exception):
    """Bad input: reported as one line on stderr, no traceback."""


class FamilyDefault:
    """Marks a flag's default (the original scripts') that another model family replaces when the flag is not
    given (SDXL: --H/--W 1024, --scale 5.0; ldm/cli/sdxl.py). It behaves as the value it holds."""


class DefaultInt(int, FamilyDefault):
    pass


class DefaultFloat(float, FamilyDefault):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--config and --ckpt with the original scripts' defaults (txt2img, img2img and rerun share them)."""
    p.add_argument("--config", type=str, default="configs/stable-diffusion/v1-inference.yaml",
                   help="path to config which constructs model")
    p.add_argument("--ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
                   help="path to checkpoint of model (.ckpt or .safetensors)")
    p.add_argument("--vae", type=str, default=None, help="VAE checkpoint replacing the model's first stage")


def build_parser(mode: str) -> argparse.ArgumentParser:
    """The flags of the original scripts/{mode}.py with their defaults, plus ours."""
    inpaint = mode == "inpaint"
    img2img = mode == "img2img" or inpaint  # inpaint takes img2img's flags, less the size ones, plus --mask
    p = Parser(prog=f"{mode}.py", description=f"Stable Diffusion {mode} (ldm {ldm.__version__})", epilog=EPILOG)
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="prompt for the unconditional branch of classifier-free guidance (default: empty)")
    if img2img:
        p.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    if inpaint:
        p.add_argument("--mask", type=str, help="path to the mask: any image, read as greyscale; white (>= 128) "
                       "is repainted, black (<= 127) kept; the init image's size")
    p.add_argument("--outdir", type=str, nargs="?", help="dir to write results to",
                   default=f"outputs/{mode}-samples")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50,
                   help="number of sampling steps (for every sampler)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="sampler (default: ddim; SDXL configs: euler, mapped onto generative-models' samplers)")
    p.add_argument("--schedule", choices=SCHEDULES, default="uniform",
                   help="spacing of the steps (default: uniform, as the originals); karras and exponential "
                        "for the k-samplers, quad for ddim/plms/dpm_solver/unipc")
    p.add_argument("--plms", action="store_true", help="use plms sampling (= --sampler plms)")
    p.add_argument("--dpm_solver", "--dpm", action="store_true",
                   help=f"use dpm_solver sampling (= --sampler {DPM_SOLVER})")
    if mode == "txt2img":  # only the original txt2img has it
        p.add_argument("--laion400m", action="store_true",
                       help="the original's switch to the LAION-400M LDM-KL-8 (BERT text encoder) model; not "
                            "implemented by ldm, refused with a message")
    p.add_argument("--fixed_code", action="store_true",
                   help="use the same starting code for every batch of the run")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="ddim eta (0.0: deterministic sampling)")
    p.add_argument("--n_iter", type=int, default=1 if img2img else 2, help="sample this often")
    if not inpaint:  # inpainting keeps the init image's size and the model's latent shape
        size_help = " (default: the init image's, rounded down to a multiple of 32)" if img2img else ""
        size_help = size_help or " (default 512; SDXL configs: 1024)"
        size = None if img2img else DefaultInt(512)
        p.add_argument("--H", type=int, default=size, help="image height, in pixel space" + size_help)
        p.add_argument("--W", type=int, default=size, help="image width, in pixel space" + size_help)
        p.add_argument("--C", type=int, default=4, help="latent channels")
        p.add_argument("--f", type=int, default=8, help="downsampling factor")
    p.add_argument("--n_samples", type=int, default=1 if inpaint else 2 if img2img else 3,
                   help="how many samples to produce for each given prompt. A.k.a. batch size")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    scale = 5.0 if mode == "img2img" else 7.5
    p.add_argument("--scale", type=float, default=DefaultFloat(scale),
                   help="unconditional guidance scale: eps = eps(x, uncond) + scale * (eps(x, cond) - eps(x, uncond)) "
                        f"(default {scale}; SDXL configs: 5.0)")
    if img2img:
        p.add_argument("--strength", type=float, default=1.0 if inpaint else 0.75,
                       help="strength for noising/unnoising. 1.0 corresponds to full destruction of the init image"
                       + (" (inpainting models: 1.0 only; 4-channel models: masked img2img)" if inpaint else ""))
    p.add_argument("--from-file", type=str, help="if specified, load prompts from this file, one per line")
    add_model_flags(p)
    if inpaint:
        add_inpaint_model_flags(p)
    else:
        p.add_argument("--no-ema", dest="no_ema", action="store_true",
                       help="use the raw UNet weights instead of the EMA weights of the checkpoint")
    p.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    p.add_argument("--precision", type=str, choices=list(PRECISIONS), default="autocast",
                   help="full: float32; autocast: float32 weights, float16 compute on an accelerator "
                        "(float32 on the CPU); fp16/bf16: the model in that dtype")
    p.add_argument("--device", type=str, default=None,
                   help="torch device (default: the CUDA device if available, else cpu)")
    add_speed_flags(p)
    from ldm.cli.extras import add_text_flags  # LoRA, embeddings, A1111 prompt syntax, clip skip

    add_text_flags(p)
    add_control_flags(p)
    if not inpaint:
        from ldm.cli import sdxl  # imports CLIError from here

        sdxl.add_flags(p, img2img)
    return p


def add_inpaint_model_flags(p: argparse.ArgumentParser) -> None:
    """inpaint.py's model defaults, and its EMA choice: the RAW UNet weights unless --ema, as the demos (they
    never enter ema_scope, so a checkpoint holding both samples its raw weights)."""
    p.add_argument("--ema", dest="no_ema", action="store_false",
                   help="use the EMA UNet weights of a checkpoint that holds both (default: the raw weights, "
                        "as the original demos)")
    p.add_argument("--no-ema", dest="no_ema", action="store_true", help="the raw UNet weights (the default)")
    p.set_defaults(config="configs/stable-diffusion/v1-inpainting-inference.yaml",
                   ckpt="models/ldm/inpainting/sd-v1-5-inpainting.ckpt", no_ema=True)


def add_control_flags(p: argparse.ArgumentParser) -> None:
    """ControlNet (lllyasviel/ControlNet; README, ControlNet): read by ldm/cli/control.py."""
    from ldm.preprocess import PREPROCESSORS

    g = p.add_argument_group("ControlNet (see README, ControlNet)")
    g.add_argument("--control", action="append", metavar="PATH[:STRENGTH]",
                   help="a ControlNet file (v1.0 .pth, v1.1 control_model .pth or extracted .safetensors) and its "
                        "strength (default 1.0); repeat for several ControlNets (their residuals are summed)")
    g.add_argument("--control_config", action="append", metavar="YAML",
                   help="ControlLDM yaml of the ControlNet(s) (configs/controlnet/): once for all or once per "
                        "--control (default: --config, when that is a ControlLDM yaml)")
    g.add_argument("--control_image", action="append", metavar="PNG",
                   help="the hint (edges, depth, pose, ... already preprocessed; RGB, the image's size): one per "
                        "--control in order, or one for all")
    g.add_argument("--control_preprocess", action="append", choices=PREPROCESSORS,
                   help="compute the hint from --control_image first (canny: cv2.Canny(img, 100, 200), needs "
                        "opencv-python-headless); once for all or once per --control")
    g.add_argument("--guess_mode", action="store_true",
                   help="the demos' guess mode: control scales strength * 0.825 ** (12 - i) and no control on "
                        "the unconditional branch")


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    """Fast and memory-saving paths (ldm/fast.py, ldm/tiling.py): `--fast auto` (the default) turns on what
    ldm.fast.default_options picks for the device and precision; every other one is off unless asked for. Those
    that can change an image's pixels are recorded in its PNG and replayed by rerun.py (record.FAST_FIELDS)."""
    g = p.add_argument_group("speed and memory (see README, Speed)")
    g.add_argument("--fast", choices=("auto", "none"), default="auto",
                   help="auto (default): add the fast paths measured best for --device and --precision "
                        "(ldm.fast.default_options; CPU float32: --prepack); none: the plain path plus the "
                        "flags given. Images stay within one uint8 level of the plain path; the PNG records "
                        "what ran")
    g.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                   help="attention kernel: sdpa (default; fused kernels), sliced (bounded memory), math (reference)")
    g.add_argument("--attention_slice", type=int, default=None,
                   help=f"query rows per chunk of --attention sliced (default {DEFAULT_SLICE_SIZE}; implies sliced)")
    g.add_argument("--prepack", action="store_true",
                   help="CPU, float32: run convolutions and linear layers on weights prepacked once for oneDNN "
                        "(faster; the packed weights replace the plain ones; on by default with --fast auto)")
    g.add_argument("--channels_last", action="store_true", help="channels-last (NHWC) convolutions")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and the VAE decoder (the first step of a new size compiles)")
    g.add_argument("--vae_tile", type=int, default=None,
                   help="decode in overlapping tiles of this many latent pixels (64 = 512 px), cross-faded: "
                        "for images too large to decode whole")
    g.add_argument("--vae_tile_overlap", type=int, default=None,
                   help=f"latent pixels shared by neighbouring tiles (default {DEFAULT_TILE_OVERLAP})")
    g.add_argument("--vae_slice", type=int, default=None, help="decode this many images at a time")
    g.add_argument("--offload", action="store_true",
                   help="accelerators: keep text encoder, UNet and VAE in CPU memory and move each to --device "
                        "only while it runs")
