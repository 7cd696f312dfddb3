"""Speed and memory of ldm against diffusers: the same random full-size weights, one process, alternating.

    .venv-ref/bin/python scripts/bench.py --device cpu --size 256 --json bench-cpu.json --markdown bench-cpu.md
    .venv-ref/bin/python scripts/bench.py --device cuda --matrix          # 512 px v1, 768 px v2, 1024 px SDXL
    .venv-ref/bin/python scripts/bench.py --config configs/sgm/sd_xl_base.yaml --parts unet --model_channels 128
    .venv/bin/python scripts/bench.py --diffusers "" --config tests/configs/tiny-v1.yaml --size 32 --rounds 1

diffusers and transformers are benchmark dependencies only (.venv-ref); ldm never imports them. With
`--diffusers ""` only ldm's variants run (no peer, no ratios; parity against the first ldm variant) and neither
package is imported, so the bench also runs in .venv (scripts/gpu_check.sh --dry-run does, as CI).

What is built. A random checkpoint in the ORIGINAL key layout for the config (UNet, VAE and the text encoder
of v1; fan-in scaled uniform weights, norms near 1, small biases, so activations stay O(1)). ldm loads it
as is (its module paths are the checkpoint keys); diffusers gets it through its own converter of original
checkpoints (single_file_utils create_*_diffusers_config_from_ldm + convert_ldm_*_checkpoint) and
transformers' CLIPTextModel takes the text tower's keys minus the `cond_stage_model.transformer.` prefix. All
models are built on the meta device and adopt the checkpoint tensors (load_state_dict(assign=True)), so the
variants share ONE copy of the weights; a variant that re-lays out weights (prepack, channels_last) adds its
own copy, reported as "weights+" in MB. `ldm+default` is the model as the command line configures it by default
(`ldm.fast.configure(model, **ldm.fast.default_options(device, dtype))`, `--fast auto`).
weights+ of prepacked layers is logical: packed bytes minus the plain bytes those layers released. A loaded
model frees a released plain weight; here the shared checkpoint dict keeps it alive, so the process's RSS
would count it twice.

What is measured, per part, each variant once per round, rounds alternating so all suffer the same load:
  unet   one classifier-free-guidance step: UNet forward on batch 2 (cond + uncond), 77-token context
  vae    VAE decode of one latent
  text   the text encoder's forward on the CFG batch (the prompt and "": 2 x 77 token ids, tokenized once,
         untimed): ldm's cond stage against transformers' CLIPTextModel on the same ids. v1 configs only
         (v2's OpenCLIP tower has no transformers equivalent that takes its weights as they are).
  e2e    txt2img: text encoder (cond + empty uncond), --steps DDIM steps with guidance 7.5, VAE decode.
         ldm: ldm.pipeline.txt2img. diffusers: transformers CLIPTextModel on the same token ids, then
         StableDiffusionPipeline(prompt_embeds=..., negative_prompt_embeds=...) with the original DDIM
         schedule (leading spacing, steps_offset 1), output_type "pt". Same x_T for both. v1 configs only.
  tiling ldm's tiled VAE decode against its plain decode (difference, seam metric, peak memory); at the large
         sizes (2048 px) optionally both under a memory budget, to see which one fits.
  profile  torch.profiler's operator table of one UNet CFG step per variant (where the time goes).
  control  one ControlNet's time and memory on a UNet CFG step, against diffusers' ControlNetModel on the same
         original weights (scripts/bench_controlnet.py).
Reported: median wall ms and median process CPU ms per call, ldm/diffusers ratio of the medians, peak
memory during the call (CPU: peak RSS of the whole process and its rise over the pre-call RSS; accelerator:
max allocated and its rise; the least over the rounds, i.e. steady state). The first output of every
variant is compared with diffusers' first variant (max abs difference / max abs value; e2e also max abs
difference of the [0, 1] images). The unet, vae and text parts start with one untimed warm-up round; e2e does not
(it is long), so its first round includes one-time costs such as packing weights.
Roofline (with the unet, vae and text parts): each part's FLOPs per call (counted on the meta device, see
count_flops), the device's dense matmul peak in the bench dtype measured in the same run, and the fraction of
that peak each variant reaches on each part.
`--markdown FILE` writes the run as a markdown table (markdown_report), rewritten after every config, as is
`--json`, so a matrix cut short by a timeout keeps what completed; a config that fails is recorded and the
others still run (exit status 1 at the end).

SDXL (an sgm config, configs/sgm/sd_xl_base.yaml): the unet, vae and profile parts on the UNet and VAE alone
(the text towers are not built). diffusers' UNet2DConditionModel comes from the same original-layout weights
through the same converter (it reads sgm's network_config); its SDXL conditioning is the pooled text embedding
plus six size numbers (added_cond_kwargs text_embeds / time_ids), from which it builds the `y` vector ldm's UNet
takes (pooled + timestep_embedding(each number, 256)), so both get the same inputs. `--model_channels N` builds
the same structure narrower (context 2048, the vector 2816, per-level depth 1, 2, 10 kept), for the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm import fast, pipeline, tiling  # noqa: E402
from ldm.config import CLIPTextConfig, load_config  # noqa: E402
from ldm.config_sgm import DiffusionEngineConfig  # noqa: E402
from ldm.loader import build_model  # noqa: E402
from ldm.models.attention import set_attention_backend  # noqa: E402
from ldm.models.tokenizer import tokenize  # noqa: E402
from ldm.models.unet import timestep_embedding  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
# fp16 of every model first: a matrix cut short by a time limit (scripts/gpu_check.sh) keeps those rows
MATRIX = [("configs/stable-diffusion/v1-inference.yaml", 512, "float16"),
          ("configs/stable-diffusion/v2-inference-v.yaml", 768, "float16"),
          ("configs/sgm/sd_xl_base.yaml", 1024, "float16"),
          ("configs/stable-diffusion/v1-inference.yaml", 512, "bfloat16"),
          ("configs/stable-diffusion/v2-inference-v.yaml", 768, "bfloat16"),
          ("configs/sgm/sd_xl_base.yaml", 1024, "bfloat16")]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- weights


def random_checkpoint(keys: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Original-layout tensors for the (meta) state dict `keys`: matrices and convs uniform with std
    1/sqrt(fan_in), 1-D weights (norms) 1 +- 0.2, biases +- 0.1 (uniform draws: 860M normal draws take
    minutes on 2 busy cores)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(keys):
        meta = keys[key]
        if not meta.dtype.is_floating_point:  # transformers' position_ids buffer
            out[key] = torch.arange(meta.shape[-1], dtype=meta.dtype).reshape(meta.shape)
            continue
        t = torch.empty(meta.shape)
        if t.dim() >= 2:
            bound = math.sqrt(3.0 / math.prod(t.shape[1:]))
            t.uniform_(-bound, bound, generator=g)
        elif key.endswith("bias"):
            t.uniform_(-0.1, 0.1, generator=g)
        else:
            t.uniform_(0.8, 1.2, generator=g)
        out[key] = t
    return out


def adopt(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """load_state_dict(strict, assign): the module holds the given tensors themselves (shared, not copied)."""
    module.load_state_dict(state, strict=True, assign=True)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"{type(module).__name__}.{name} left on the meta device")
    return module.eval()


# ------------------------------------------------------------------------------------------------ models


class SDXLParts(torch.nn.Module):
    """The UNet and VAE of an sgm model under their checkpoint paths (model.diffusion_model.*,
    first_stage_model.*), without the text towers, which the unet and vae parts do not run."""

    def __init__(self, cfg: DiffusionEngineConfig):
        super().__init__()
        model = build_model(cfg, device="meta")
        self.model, self.first_stage_model = model.model, model.first_stage_model
        self.scale_factor = cfg.scale_factor

    @property
    def unet(self):
        return self.model.diffusion_model

    @property
    def vae(self):
        return self.first_stage_model

    def networks(self) -> dict:
        return {"unet": self.unet, "vae": self.vae}


def is_sgm(cfg) -> bool:
    return isinstance(cfg, DiffusionEngineConfig)


def bench_model(cfg) -> torch.nn.Module:
    """What the benchmark builds on the meta device: the whole model, or an SDXL model's UNet and VAE."""
    if is_sgm(cfg):
        with torch.device("meta"):
            return SDXLParts(cfg)
    return build_model(cfg, device="meta")


def narrower(cfg, original_config: dict, model_channels: int | None):
    """An sgm config (and its yaml data) with another UNet width; the rest of the structure is kept."""
    if model_channels is None:
        return cfg, original_config
    import copy
    import dataclasses

    unet = dataclasses.replace(cfg.unet, model_channels=model_channels)
    data = copy.deepcopy(original_config)
    data["model"]["params"]["network_config"]["params"]["model_channels"] = model_channels
    return dataclasses.replace(cfg, unet=unet), data


def sdxl_inputs(cfg, batch: int, g: torch.Generator) -> dict:
    """An SDXL step's extra inputs: diffusers' (pooled text embedding, six size numbers) and ldm's `y` built
    from them as sgm's conditioner does (pooled, then timestep_embedding(v, 256) of each number)."""
    adm = cfg.unet.adm_in_channels
    pooled = torch.randn(batch, adm - 6 * 256, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(batch, -1)], dim=1)
    return {"pooled": pooled, "time_ids": time_ids, "y": y}


def ldm_variant(cfg, ckpt: dict, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A LatentDiffusion (SDXL: its UNet and VAE) on the shared tensors, with the fast paths named in
    `spec` ("ldm", "ldm+default", "ldm+prepack", "ldm+channels_last+sliced", ...)."""
    model = adopt(bench_model(cfg), ckpt)
    if not is_sgm(cfg):
        model.alphas_cumprod = model.alphas_cumprod.to(device)
    return apply_options(model, spec, device, dtype)


def apply_options(model: torch.nn.Module, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    for option in spec.split("+")[1:]:
        if option == "default":  # what the command line runs (--fast auto)
            fast.configure(model, **fast.default_options(device, dtype))
        elif option == "prepack":
            fast.prepack(model)
        elif option == "channels_last":
            fast.channels_last(model)
        elif option == "compile":
            fast.compile_module(model.unet)
            fast.compile_module(model.vae.decoder)
        elif option == "cudagraphs":  # compile + CUDA graphs (accelerators; one capture per input shape)
            fast.compile_module(model.unet, mode="reduce-overhead")
        elif option in ("sdpa", "sliced", "math"):
            set_attention_backend(model, option)
        elif option == "tiled":
            tiling.enable_tiled_decode(model.vae)
        else:
            raise SystemExit(f"unknown ldm option {option!r} in {spec!r}")
    return model


def diffusers_variant(original_config: dict, ckpt: dict, spec: str, text_config=None):
    """diffusers' UNet and VAE (and transformers' CLIPTextModel) through diffusers' converters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    unet_config = create_unet_diffusers_config_from_ldm(original_config, ckpt)
    vae_config = create_vae_diffusers_config_from_ldm(original_config, ckpt)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    parts = {"unet": adopt(unet, convert_ldm_unet_checkpoint(ckpt, unet_config)),
             "vae": adopt(vae, convert_ldm_vae_checkpoint(ckpt, vae_config))}
    if text_config is not None:
        import dataclasses

        from transformers import CLIPTextConfig, CLIPTextModel

        # ldm's CLIPTextConfig uses transformers' field names (ViT-L/14 unless the yaml says otherwise)
        with torch.device("meta"):
            text = CLIPTextModel(CLIPTextConfig(**dataclasses.asdict(text_config)))
        state = convert_ldm_clip_checkpoint(ckpt)  # keys "text_model.*" (transformers 4.x layout)
        if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers 5 drops that level
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        # position_ids: arange(77), a buffer transformers may or may not save; set it on the module
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        embeddings = next(m for n, m in text.named_modules() if n.endswith("embeddings"))
        text.load_state_dict(state, strict=False, assign=True)
        device = next(iter(state.values())).device
        embeddings.position_ids = torch.arange(text_config.max_position_embeddings, device=device)[None]
        parts["text"] = adopt(text, text.state_dict())  # strict: every tensor came from the checkpoint
    for option in spec.split("+")[1:]:
        if option == "channels_last":
            for part in parts.values():
                part.to(memory_format=torch.channels_last)
        else:
            raise SystemExit(f"unknown diffusers option {option!r} in {spec!r}")
    return parts


def diffusers_pipeline(parts: dict, parameterization: str):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # the original DDIM discretisation (ddim.py make_ddim_timesteps: 1 + range(0, 1000, 1000 // steps)) and
    # final alpha = alphas_cumprod[0], as diffusers' converter sets it up for original checkpoints
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                              prediction_type="v_prediction" if parameterization == "v" else "epsilon")
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text"], tokenizer=None, unet=parts["unet"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------- memory


class Meter:
    """Peak memory of one call: CPU peak RSS (VmHWM, reset through /proc/self/clear_refs) or the
    accelerator's max_memory_allocated."""

    def __init__(self, device: torch.device):
        self.device = device
        self.accel = None if device.type == "cpu" else torch.get_device_module(device)
        self._libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None

    def _status(self, field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MB
        return float("nan")

    def start(self) -> None:
        gc.collect()
        if self.accel is not None:
            self.accel.synchronize()
            self.accel.reset_peak_memory_stats(self.device)
            self.base = self.accel.memory_allocated(self.device) / 2**20
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed heap back so the baseline is what is really held
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS counter (Linux >= 4.0)
        self.base = self._status("VmRSS")

    def stop(self) -> tuple[float, float]:
        if self.accel is not None:
            self.accel.synchronize()
            peak = self.accel.max_memory_allocated(self.device) / 2**20
        else:
            peak = self._status("VmHWM")
        return peak, peak - self.base


def weight_mb(module: torch.nn.Module, shared: set[int], plain_bytes_built: int = 0) -> float:
    """Memory the variant holds beyond the shared checkpoint tensors: re-laid-out copies, plus packed weights
    minus the plain weights they replaced (`plain_bytes_built`: fast.plain_weight_bytes when the variant was
    built). Logical: the shared checkpoint dict keeps a released plain tensor alive here, a loaded model not."""
    own = sum(p.numel() * p.element_size() for p in module.parameters() if p.untyped_storage().data_ptr() not in shared)
    released = plain_bytes_built - fast.plain_weight_bytes(module)
    return (own + fast.packed_bytes(module) - released) / 2**20


# ------------------------------------------------------------------------------------------------ timing


def alternate(calls: dict, rounds: int, meter: Meter, warmup: bool) -> tuple[dict, dict]:
    """Run every call once per round, in turn; the first (untimed when warmup) output of each is kept."""
    outputs, samples = {}, {name: [] for name in calls}
    if warmup:
        for name, call in calls.items():
            outputs[name] = call().clone()  # a copy: CUDA-graph replays overwrite their output buffers
    for r in range(rounds):
        for name, call in calls.items():
            meter.start()
            c0, t0 = time.process_time(), time.perf_counter()
            out = call()
            if meter.accel is not None:
                meter.accel.synchronize()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak, rise = meter.stop()
            if name not in outputs:
                outputs[name] = out.clone()
            samples[name].append({"wall_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu, "peak_mb": peak, "rise_mb": rise})
            print(f"  round {r} {name:28s} {1e3 * wall:10.0f} ms", flush=True)
            del out
    return outputs, samples


def summarize(part: str, samples: dict, peer: str | None, extra: dict) -> list[dict]:
    """One row per variant; ratio_vs_diffusers is None without a peer."""
    rows = []
    ref = statistics.median(s["wall_ms"] for s in samples[peer]) if peer in samples else None
    for name, runs in samples.items():
        wall = statistics.median(s["wall_ms"] for s in runs)
        rows.append({"part": part, "variant": name, "median_ms": wall,
                     "cpu_ms": statistics.median(s["cpu_ms"] for s in runs),
                     "ratio_vs_diffusers": None if ref is None else wall / ref,
                     # steady state: the least over the rounds (a one-time cost such as building packed
                     # weights lands in the first call and is reported as weights_plus_mb)
                     "peak_mb": min(s["peak_mb"] for s in runs), "rise_mb": min(s["rise_mb"] for s in runs),
                     "wall_ms": [round(s["wall_ms"], 1) for s in runs], **extra.get(name, {})})
    return rows


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------------- parts


def unet_calls(cfg, models, dmodels, device, dtype, h, seed: int) -> dict:
    """One CFG step's UNet forward per variant, on the same inputs: batch 2, h x h latents, 77-token context."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, cfg.unet.in_channels, h, h, generator=g).to(device, dtype)
    context = torch.randn(2, 77, context_width(cfg), generator=g).to(device, dtype)
    t = torch.full((2,), 801, device=device)
    if is_sgm(cfg):  # SDXL: the vector conditioning, as each library takes it
        extra = {k: v.to(device, dtype) for k, v in sdxl_inputs(cfg, 2, g).items()}
        added = {"text_embeds": extra["pooled"], "time_ids": extra["time_ids"]}
        calls = {name: (lambda m=m: m.unet(x, t, context, y=extra["y"])) for name, m in models.items()}
        calls.update({name: (lambda d=d: d["unet"](x, t, encoder_hidden_states=context,
                                                   added_cond_kwargs=added).sample) for name, d in dmodels.items()})
        return calls
    calls = {name: (lambda m=m: m.unet(x, t, context)) for name, m in models.items()}
    calls.update({name: (lambda d=d: d["unet"](x, t, encoder_hidden_states=context).sample)
                  for name, d in dmodels.items()})
    return calls


def context_width(cfg) -> int:
    width = cfg.unet.context_dim
    return width if isinstance(width, int) else width[0]


def bench_unet(cfg, models, dmodels, args, device, dtype, meter, h):
    return alternate(unet_calls(cfg, models, dmodels, device, dtype, h, args.seed), args.rounds, meter, warmup=True)


def bench_text(cfg, models, dmodels, args, device, dtype, meter, h):
    """The text encoder's forward on the CFG batch (prompt and "", ids from ldm's tokenizer, which follows
    transformers' CLIPTokenizer for v1): ldm's cond stage and transformers' CLIPTextModel (last_hidden_state)."""
    ids = next(iter(models.values())).cond_stage_model.tokenize([PROMPT, ""]).ids.to(device)
    calls = {name: (lambda m=m: m.cond_stage_model(ids)) for name, m in models.items()}
    calls.update({name: (lambda d=d: d["text"](ids).last_hidden_state) for name, d in dmodels.items()})
    return alternate(calls, args.rounds, meter, warmup=True)


def bench_vae(cfg, models, dmodels, args, device, dtype, meter, h):
    g = torch.Generator().manual_seed(args.seed + 2)
    z = (torch.randn(1, cfg.first_stage.embed_dim, h, h, generator=g) / cfg.scale_factor).to(device, dtype)
    calls = {name: (lambda m=m: m.vae.decode(z)) for name, m in models.items()}
    calls.update({name: (lambda d=d: d["vae"].decode(z).sample) for name, d in dmodels.items()})
    return alternate(calls, args.rounds, meter, warmup=True)


def bench_e2e(cfg, models, dmodels, args, device, dtype, meter, h):
    f = tiling.upsampling_factor(next(iter(models.values())).vae)
    size = h * f
    g = torch.Generator().manual_seed(args.seed + 3)
    x_T = torch.randn(1, 4, h, h, generator=g)
    # the token ids ldm's tokenizer gives (transformers' CLIPTokenizer convention), for transformers' encoder
    ids = [tokenize([p], 77, convention="transformers").ids.to(device) for p in (PROMPT, "")]

    def run_ldm(model):
        return pipeline.txt2img(model, PROMPT, steps=args.steps, H=size, W=size, f=f, x_T=x_T, seed=0, disable=True)

    def run_diffusers(pipe):
        cond, uncond = (pipe.text_encoder(i).last_hidden_state for i in ids)
        out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=x_T.to(device, dtype), height=size,
                   width=size, num_inference_steps=args.steps, guidance_scale=7.5, output_type="pt")
        return out.images.float().cpu()

    calls = {name: (lambda m=m: run_ldm(m)) for name, m in models.items()}
    pipes = {name: diffusers_pipeline(d, cfg.parameterization) for name, d in dmodels.items()}
    calls.update({name: (lambda p=p: run_diffusers(p)) for name, p in pipes.items()})
    return alternate(calls, args.rounds, meter, warmup=False)


def seam_ratio(diff: torch.Tensor, edges_y: list[int], edges_x: list[int]) -> float:
    """Mean jump of `diff` (tiled - plain) across the tile edges over its mean jump between any two
    neighbouring pixels: ~1 when the tiles meet without a visible step, >> 1 for hard seams."""
    dy, dx = (diff[:, :, 1:] - diff[:, :, :-1]).abs(), (diff[..., 1:] - diff[..., :-1]).abs()
    at_edges = torch.cat([dy[:, :, [e - 1 for e in edges_y]].flatten(), dx[..., [e - 1 for e in edges_x]].flatten()])
    return (at_edges.mean() / torch.cat([dy.flatten(), dx.flatten()]).mean()).item()


def tile_edges(size: int, tile: int, overlap: int, f: int) -> list[int]:
    edges = set()
    for _, pixels, _ in tiling._axis_tiles(size, tile, overlap, f):
        edges.update(e for e in (pixels.start, pixels.stop) if 0 < e < size * f)
    return sorted(edges)


def bench_tiling(cfg, model, args, device, dtype, meter) -> dict:
    """ldm's tiled decode against its plain decode on smooth latents (upsampled noise, like image latents)."""
    vae, f, out = model.vae, tiling.upsampling_factor(model.vae), {}
    tile, overlap = args.tile

    def latent(size):
        g = torch.Generator().manual_seed(args.seed + size)
        coarse = torch.randn(1, 4, size // f // 8, size // f // 8, generator=g) / cfg.scale_factor
        return torch.nn.functional.interpolate(coarse, scale_factor=8, mode="bicubic").to(device, dtype)

    def measure(fn):
        meter.start()
        t0 = time.perf_counter()
        image = fn()
        if meter.accel is not None:
            meter.accel.synchronize()
        wall = time.perf_counter() - t0
        peak, rise = meter.stop()
        return image.float().cpu(), {"ms": 1e3 * wall, "peak_mb": peak, "rise_mb": rise}

    for size in args.tiling_compare:
        z = latent(size)
        plain, m_plain = measure(lambda: vae.decode(z))
        tiled, m_tiled = measure(lambda: tiling.decode_tiled(vae, z, tile, overlap))
        cut, _ = measure(lambda: tiling.decode_tiled(vae, z, tile, 0))  # control: tiles cut, not blended
        edges = tile_edges(size // f, tile, overlap, f)
        cut_edges = tile_edges(size // f, tile, 0, f)
        out[f"compare_{size}"] = {
            "plain": m_plain, "tiled": m_tiled, "tile": tile, "overlap": overlap,
            "max_abs_diff": (tiled - plain).abs().max().item(), "mean_abs_diff": (tiled - plain).abs().mean().item(),
            "seam_ratio_blended": seam_ratio(tiled - plain, edges, edges),
            "seam_ratio_cut_control": seam_ratio(cut - plain, cut_edges, cut_edges),
            "image_range": [plain.min().item(), plain.max().item()]}
        print(f"  tiling {size}: {out[f'compare_{size}']}", flush=True)
        del plain, tiled, cut
    for size in args.tiling_large:
        z = latent(size)
        entry = {"tile": args.tile_large[0], "overlap": args.tile_large[1]}
        if args.tiling_budget_mb:
            # Both decodes under one memory budget: the plain one is expected not to fit, the tiled one to fit
            with memory_budget(meter, args.tiling_budget_mb):
                entry["budget_mb"] = args.tiling_budget_mb
                entry["plain"] = fits(lambda: measure(lambda: vae.decode(z))[1])
                entry["tiled"] = fits(lambda: measure(lambda: tiling.decode_tiled(vae, z, *args.tile_large))[1])
        else:
            entry["tiled"] = measure(lambda: tiling.decode_tiled(vae, z, *args.tile_large))[1]
        out[f"large_{size}"] = entry
        print(f"  tiling {size}: {entry}", flush=True)
    return out


@contextlib.contextmanager
def memory_budget(meter: Meter, budget_mb: float):
    """Let the process allocate at most `budget_mb` more (CPU: an address-space limit, RLIMIT_AS, over the
    current size; accelerator: torch's per-process memory fraction over what is allocated now), so that
    "does it fit in N MB" is measured rather than extrapolated. Allocations past it raise."""
    if meter.accel is None:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (int((meter._status("VmSize") + budget_mb) * 2**20), hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return
    meter.accel.empty_cache()  # the fraction bounds what the caching allocator reserves: start from what is used
    total = meter.accel.get_device_properties(meter.device).total_memory
    used = meter.accel.memory_allocated(meter.device)
    meter.accel.set_per_process_memory_fraction(min(1.0, (used + budget_mb * 2**20) / total), meter.device)
    try:
        yield
    finally:
        meter.accel.set_per_process_memory_fraction(1.0, meter.device)
        meter.accel.empty_cache()


def fits(call) -> dict:
    """call()'s measurement, or {"fits": False, ...} when it ran out of memory."""
    t0 = time.perf_counter()
    try:
        return {"fits": True, **call()}
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as a RuntimeError subclass
        if "memory" not in str(e).lower():
            raise
        gc.collect()
        return {"fits": False, "failed_after_ms": 1e3 * (time.perf_counter() - t0),
                "error": str(e).splitlines()[0][:200]}


# ---------------------------------------------------------------------------------------------- roofline


def count_flops(call) -> int:
    """Floating-point operations of `call()` (on meta tensors: no memory, no compute), counted by torch's
    FlopCounterMode (matmuls, convolutions, attention; a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def unet_step_flops(cfg, latent_side: int, batch: int = 2) -> int:
    """One UNet forward on `batch` latents (2: one CFG step) with a 77-token context. SD v1 at 64x64 latents
    (512 px): 1.607e12, the figure the speed issue quotes."""
    unet = bench_model(cfg).unet
    x = torch.empty(batch, cfg.unet.in_channels, latent_side, latent_side, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    context = torch.empty(batch, 77, context_width(cfg), device="meta")
    y = torch.empty(batch, cfg.unet.adm_in_channels, device="meta") if is_sgm(cfg) else None
    return count_flops(lambda: unet(x, t, context, y=y))


def vae_decode_flops(cfg, latent_side: int) -> int:
    """The VAE decode of one latent (post_quant_conv and decoder), as the vae part times it."""
    vae = bench_model(cfg).vae
    z = torch.empty(1, cfg.first_stage.embed_dim, latent_side, latent_side, device="meta")
    return count_flops(lambda: vae.decode(z))


def text_flops(cfg, latent_side: int, batch: int = 2) -> int:
    """The text encoder's forward on `batch` prompts of 77 tokens (2: the CFG batch); `latent_side` unused."""
    encoder = bench_model(cfg).cond_stage_model
    ids = torch.zeros(batch, 77, dtype=torch.long, device="meta")
    return count_flops(lambda: encoder(ids))


PART_FLOPS = {"unet": unet_step_flops, "vae": vae_decode_flops, "text": text_flops}


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> dict:
    """The device's dense matmul throughput in `dtype`, measured: the best of repeated square products
    (n = 2048 on the CPU, 8192 on an accelerator, sizes where the BLAS runs at its peak)."""
    accel = None if device.type == "cpu" else torch.get_device_module(device)
    n = 2048 if accel is None else 8192
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    reps = 1 if accel is None else 20
    best, start = float("inf"), time.perf_counter()
    for i in range(1000):
        if accel is not None:
            accel.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if accel is not None:
            accel.synchronize()
        if i > 0:  # the first round warms the kernels up
            best = min(best, (time.perf_counter() - t0) / reps)
        if time.perf_counter() - start > seconds and i >= 3:
            break
    return {"n": n, "tflops": 2 * n**3 / best / 1e12}


def roofline(cfg, latent_side: int, device: torch.device, dtype: torch.dtype, rows: list[dict]) -> dict | None:
    """Per timed part with a FLOP count (unet, vae, text): its TFLOP per call, the time the measured matmul
    peak allows, and for every variant the fraction of the peak it reaches (FLOPs / median time / peak)."""
    parts = [p for p in PART_FLOPS if any(row["part"] == p for row in rows)]
    if not parts:
        return None
    peak = matmul_peak(device, dtype)
    out = {"dtype": str(dtype).removeprefix("torch."), "matmul_peak_tflops": peak["tflops"], "matmul_n": peak["n"],
           "parts": {}}
    for part in parts:
        flops = PART_FLOPS[part](cfg, latent_side)
        out["parts"][part] = {"tflop": flops / 1e12, "ms_at_peak": 1e3 * flops / (peak["tflops"] * 1e12),
                              "fraction_of_peak": {row["variant"]: flops / (row["median_ms"] / 1e3) / 1e12
                                                   / peak["tflops"] for row in rows if row["part"] == part}}
    return out


# ----------------------------------------------------------------------------------------------- profile


def profile_unet(cfg, models, dmodels, device, dtype, h, seed: int, top: int = 15) -> dict:
    """Where one UNet CFG step spends its time, per variant: torch.profiler's operator table (self time, so
    that nothing is counted twice), the `top` operators and the rest summed. One untimed warm-up call first."""
    from torch.profiler import ProfilerActivity, profile

    calls = unet_calls(cfg, models, dmodels, device, dtype, h, seed)
    accel = device.type != "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if accel else [])
    out = {}
    for name, call in calls.items():
        call()
        with profile(activities=activities) as prof:
            call()
            if accel:
                torch.get_device_module(device).synchronize()
        attr = "self_device_time_total" if accel else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
        total = sum(getattr(e, attr) for e in events) / 1e3
        rows = [(e.key, getattr(e, attr) / 1e3, e.count) for e in events if getattr(e, attr) > 0]
        out[name] = {"total_ms": total, "top": [{"op": k, "self_ms": ms, "share": ms / total, "calls": n}
                                                for k, ms, n in rows[:top]],
                     "rest_ms": sum(ms for _, ms, _ in rows[top:])}
        print(f"  profile {name}: {total:.0f} ms of operator self time", flush=True)
        for r in out[name]["top"]:
            print(f"    {r['op']:45s} {r['self_ms']:9.1f} ms {r['share']:6.1%} {r['calls']:6d} calls", flush=True)
        print(f"    {'(the rest)':45s} {out[name]['rest_ms']:9.1f} ms", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ driver


def run_config(args, config_path: str, size: int, dtype_name: str) -> dict:
    device, dtype = torch.device(args.device), DTYPES[dtype_name]
    cfg = load_config(ROOT / config_path)
    with open(ROOT / config_path) as f:
        original_config = yaml.safe_load(f)
    if is_sgm(cfg):
        cfg, original_config = narrower(cfg, original_config, args.model_channels)
    elif args.model_channels is not None:
        raise SystemExit("--model_channels applies to SDXL (sgm) configs")
    meter = Meter(device)
    print(f"== {config_path} {size}x{size} {dtype_name} on {device}"
          + (f", model_channels {cfg.unet.model_channels}" if is_sgm(cfg) else ""), flush=True)
    t0 = time.time()
    ckpt = random_checkpoint(bench_model(cfg).state_dict(), args.seed)
    ckpt = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in ckpt.items()}
    shared = {v.untyped_storage().data_ptr() for v in ckpt.values()}
    print(f"  random checkpoint: {sum(v.numel() for v in ckpt.values()) / 1e6:.0f}M values, "
          f"{time.time() - t0:.0f} s", flush=True)

    parts = runnable_parts(cfg, args.parts, peer=bool(args.diffusers))
    models = {spec: ldm_variant(cfg, ckpt, spec, device, dtype) for spec in args.ldm}
    with_text = bool({"text", "e2e"} & set(parts))  # diffusers' side then has transformers' CLIP
    text_config = (cfg.cond_stage.text_config or CLIPTextConfig()) if with_text else None
    dmodels = {spec: diffusers_variant(original_config, ckpt, spec, text_config) for spec in args.diffusers}
    peer = args.diffusers[0] if args.diffusers else None
    h = size // tiling.upsampling_factor(models[args.ldm[0]].vae)  # the latent side
    result = {"config": config_path, "size": size, "dtype": dtype_name, "peer": peer,
              "parity_reference": peer or args.ldm[0], "parity": {}, "rows": []}
    if is_sgm(cfg):
        result["model_channels"] = cfg.unet.model_channels
    timed_parts(cfg, models, dmodels, args, device, dtype, meter, h, parts, shared, result)
    roof = roofline(cfg, h, device, dtype, result["rows"])
    if roof is not None:
        result["roofline"] = roof
        print(f"  roofline: {roof}", flush=True)
    if "profile" in parts:
        print("-- profile", flush=True)
        result["profile"] = profile_unet(cfg, models, dmodels, device, dtype, h, args.seed)
    if "tiling" in parts:
        print("-- tiling", flush=True)
        result["tiling"] = bench_tiling(cfg, models[args.ldm[0]], args, device, dtype, meter)
    if "control" in parts:  # one ControlNet's cost (scripts/bench_controlnet.py)
        print("-- control", flush=True)
        control = _bench_controlnet()
        nets = control.build(ROOT, cfg, device, dtype, args.seed, random_checkpoint, adopt)
        result["control"] = control.bench_control(cfg, models[args.ldm[0]], dmodels[peer], nets, args, device,
                                                  dtype, meter, h, alternate, rel_err, unet_step_flops)
    return result


def runnable_parts(cfg, parts: list[str], peer: bool) -> list[str]:
    """The parts that apply to this config; each one left out is said so."""
    clip = not is_sgm(cfg) and not cfg.cond_stage.is_openclip
    why_not = {}
    if not clip:
        why_not["text"] = "v1 (CLIP) configs only (transformers has no OpenCLIP tower; SDXL's are not built)"
    if is_sgm(cfg) or (peer and not clip):
        why_not["e2e"] = "v1 configs only (diffusers' side encodes with transformers' CLIP; SDXL's are not built)"
    if not peer:
        why_not["control"] = "it compares with diffusers' ControlNetModel (no --diffusers peer)"
    for part in [p for p in parts if p in why_not]:
        print(f"  {part} skipped: {why_not[part]}", flush=True)
    return [p for p in parts if p not in why_not]


def timed_parts(cfg, models, dmodels, args, device, dtype, meter, h, parts, shared, result) -> None:
    """The alternating parts (unet, vae, text, e2e): parity against the reference's first output, a row per
    variant (result["rows"])."""
    benches = {"unet": bench_unet, "vae": bench_vae, "text": bench_text, "e2e": bench_e2e}
    reference, peer = result["parity_reference"], result["peer"]
    plain_built = {name: fast.plain_weight_bytes(m) for name, m in models.items()}
    for part in [p for p in parts if p in benches]:
        print(f"-- {part}", flush=True)
        outputs, samples = benches[part](cfg, models, dmodels, args, device, dtype, meter, h)
        ref_out = outputs[reference]
        result["parity"][part] = {name: rel_err(o, ref_out) for name, o in outputs.items() if name != reference}
        if part == "e2e":
            result["parity"]["e2e_max_abs"] = {name: (o.float() - ref_out.float()).abs().max().item()
                                               for name, o in outputs.items() if name != reference}
        print(f"  parity vs {reference} (max abs diff / max abs): {result['parity'][part]}", flush=True)
        # after the calls: packed weights are built on first use
        extra = {name: weight_mb(m, shared, plain_built[name]) for name, m in models.items()}
        extra.update({name: sum(weight_mb(p, shared) for p in d.values()) for name, d in dmodels.items()})
        extra_rows = {n: {"weights_plus_mb": extra[n], "parity": result["parity"][part].get(n)} for n in samples}
        result["rows"] += summarize(part, samples, peer, extra_rows)
        del outputs, ref_out
        # ready for the next part: drop the samples' tensors
        gc.collect()


def _bench_controlnet():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_controlnet", ROOT / "scripts" / "bench_controlnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def print_table(result: dict) -> None:
    print(f"\n{result['config']}  {result['size']}x{result['size']}  {result['dtype']}")
    if "error" in result:
        print(f"failed: {result['error']}")
        return
    head = f"{'part':5s} {'variant':28s} {'median ms':>10s} {'cpu ms':>9s} {'ratio':>6s} {'peak MB':>8s} " \
           f"{'rise MB':>8s} {'weights+':>9s} {'parity':>9s}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['part']:5s} {r['variant']:28s} {r['median_ms']:10.1f} {r['cpu_ms']:9.0f} "
              f"{cell(r['ratio_vs_diffusers'], '.3f'):>6s} {r['peak_mb']:8.0f} {r['rise_mb']:8.0f} "
              f"{r['weights_plus_mb']:9.0f} {cell(r['parity'], '.1e'):>9s}")
    print((f"ratio: median ms over that of {result['peer']}; " if result["peer"] else "")
          + f"parity: max abs diff / max abs against {result['parity_reference']}")
    if "roofline" in result:
        r = result["roofline"]
        print(f"roofline: matmul peak {r['matmul_peak_tflops']:.2f} TFLOP/s ({r['dtype']}, n={r['matmul_n']})")
        for part, v in r["parts"].items():
            print(f"  {part:5s} {v['tflop']:.4f} TFLOP per call, {v['ms_at_peak']:.2f} ms at the peak; reached: "
                  + ", ".join(f"{name} {frac:.1%}" for name, frac in v["fraction_of_peak"].items()))
    if "tiling" in result:
        for key, value in result["tiling"].items():
            print(f"tiling {key}: {json.dumps(value)}")
    if "control" in result:
        _bench_controlnet().print_rows(result["control"])


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------------ markdown


def markdown_report(report: dict) -> str:
    """A bench report ({"meta", "runs"}, as --json writes it) as markdown, for the README and
    scripts/gpu_check.sh: a line with the device, threads, versions and command line, then per run (config,
    size, dtype) a table with a row per part and, per variant, its median ms, its time over the peer's and
    the share of the matmul peak it reaches (parts with a FLOP count)."""
    meta = report["meta"]
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "diffusers", "transformers") if k in meta)
    lines = [f"{meta.get('device_name', meta['device'])}, {meta['threads']} threads, {versions}: "
             f"`{meta['command']}`"]
    for run in report["runs"]:
        width = f", model_channels {run['model_channels']}" if "model_channels" in run else ""
        lines += ["", f"**{run['config']}**, {run['size']} px, {run['dtype']}{width}", ""]
        lines += [f"failed: {run['error']}"] if "error" in run else run_table(run)
    return "\n".join(lines) + "\n"


def run_table(run: dict) -> list[str]:
    rows = {(r["part"], r["variant"]): r for r in run["rows"]}
    roof = run.get("roofline", {"parts": {}})["parts"]
    peer = run["peer"]
    columns = []  # (variant, what, heading)
    for v in dict.fromkeys(r["variant"] for r in run["rows"]):
        columns.append((v, "median_ms", f"{v} ms"))
        if peer and v != peer:
            columns.append((v, "ratio_vs_diffusers", f"{v} / {peer}"))
        if roof:
            columns.append((v, "peak", f"{v} % peak"))

    def value(part: str, v: str, what: str) -> str:
        if what == "peak":
            fraction = roof.get(part, {}).get("fraction_of_peak", {}).get(v)
            return cell(None if fraction is None else 100 * fraction, ".1f")
        return cell(rows.get((part, v), {}).get(what), ".1f" if what == "median_ms" else ".3f")

    table = ["| part | " + " | ".join(c[2] for c in columns) + " |", "|" + "---|" * (1 + len(columns))]
    for part in dict.fromkeys(r["part"] for r in run["rows"]):
        table.append(f"| {part} | " + " | ".join(value(part, *c[:2]) for c in columns) + " |")
    if roof:
        per_call = ", ".join(f"{part} {v['tflop']:.4g}" for part, v in roof.items())
        table += ["", f"matmul peak {run['roofline']['matmul_peak_tflops']:.2f} TFLOP/s ({run['roofline']['dtype']}, "
                      f"measured in this run); TFLOP per call: {per_call}"]
    return table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: 256 on CPU, 512 else)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--matrix", action="store_true",
                   help="GPU matrix: v1 512 px, v2 768 px, SDXL 1024 px, fp16 and bf16 (MATRIX)")
    p.add_argument("--runs", default=None,
                   help="a matrix of one's own: comma list of CONFIG:SIZE:DTYPE (overrides --config/--size/--dtype)")
    p.add_argument("--parts", default="unet,vae,text,e2e",
                   help="comma list of unet, vae, text, e2e, tiling, profile, control (one ControlNet's cost)")
    p.add_argument("--ldm", default=None,
                   help="ldm variants, comma list of ldm[+default][+prepack][+channels_last][+compile][+cudagraphs]"
                        "[+sliced|+math]; +default: what the CLI runs (ldm.fast.default_options) "
                        "(default: ldm,ldm+default on CPU, ldm,ldm+default,ldm+channels_last else)")
    p.add_argument("--diffusers", default="diffusers",
                   help='diffusers variants: diffusers[+channels_last]; "" for ldm only (no diffusers import)')
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the e2e part")
    p.add_argument("--tiling-compare", default="512", help="sizes decoded plain and tiled (comma list)")
    p.add_argument("--tile", default="32,8", help="latent tile,overlap for --tiling-compare (32 = 256 px)")
    p.add_argument("--tiling-large", default="2048",
                   help="sizes decoded tiled (and plain too under --tiling-budget-mb; comma list)")
    p.add_argument("--tile-large", default="64,16", help="latent tile,overlap for --tiling-large")
    p.add_argument("--tiling-budget-mb", type=float, default=None,
                   help="decode the --tiling-large sizes plain AND tiled under this memory budget (MB above what "
                        "the process holds): which one fits")
    p.add_argument("--model_channels", type=int, default=None,
                   help="SDXL configs: a narrower UNet of the same structure (e.g. 128 for the CPU; default: full)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the results as a markdown table here")
    args = p.parse_args(argv)
    args.parts = args.parts.split(",")
    if args.ldm is None:
        args.ldm = "ldm,ldm+default" if args.device == "cpu" else "ldm,ldm+default,ldm+channels_last"
    args.ldm, args.diffusers = args.ldm.split(","), [d for d in args.diffusers.split(",") if d]
    args.tile, args.tile_large = (tuple(int(v) for v in t.split(",")) for t in (args.tile, args.tile_large))
    args.tiling_compare = [int(s) for s in args.tiling_compare.split(",") if s]
    args.tiling_large = [int(s) for s in args.tiling_large.split(",") if s]
    if args.size is None:
        args.size = 256 if args.device == "cpu" else 512
    if args.runs is not None:
        args.runs = [(c, int(s), d) for c, s, d in (run.rsplit(":", 2) for run in args.runs.split(","))]
    else:
        args.runs = MATRIX if args.matrix else [(args.config, args.size, args.dtype)]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "argv": sys.argv[1:],
            "command": shlex.join(["scripts/bench.py"] + sys.argv[1:])}
    if args.diffusers:  # only with a peer: .venv has neither
        import diffusers
        import transformers

        meta.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    if args.device != "cpu":
        meta["device_name"] = torch.get_device_module(args.device).get_device_name(torch.device(args.device))
    results = []
    for config_path, size, dtype_name in args.runs:
        results.append(guarded_run(args, config_path, size, dtype_name))
        write_report(args, meta, results)  # after every config: a matrix cut short keeps what completed
    meta["load_avg_end"] = os.getloadavg()
    write_report(args, meta, results)
    for result in results:
        print_table(result)
    print(f"\nload average start {meta['load_avg_start']}, end {meta['load_avg_end']}")
    if any("error" in result for result in results):
        raise SystemExit(1)


def guarded_run(args, config_path: str, size: int, dtype_name: str) -> dict:
    """run_config, or a record of its error: one failing config (out of memory, a compile error) must not cost
    the rest of a matrix."""
    try:
        return run_config(args, config_path, size, dtype_name)
    except Exception as e:
        traceback.print_exc()
        message = (str(e).splitlines() or [""])[0][:300]
        return {"config": config_path, "size": size, "dtype": dtype_name, "error": f"{type(e).__name__}: {message}"}
    finally:
        gc.collect()
        if args.device != "cpu":
            torch.get_device_module(args.device).empty_cache()


def write_report(args, meta: dict, results: list[dict]) -> None:
    report = {"meta": meta, "runs": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown_report(report))


if __name__ == "__main__":
    main()
