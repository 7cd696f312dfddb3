"""Generate tests/fixtures/inpaint.safetensors: the images the ORIGINAL inpainting code writes, on tiny models.

Run with the reference environment (none of these packages is a dependency of ldm):

    .venv-ref/bin/python tests/make_fixtures_inpaint.py --runwayml DIR --stability DIR --compvis DIR \
        [--commit runwayml=HASH ...]

with DIR checkouts of runwayml/stable-diffusion, Stability-AI/stablediffusion and CompVis/stable-diffusion (their
commits are recorded; --commit gives them for trees without .git).

What runs is the original code, from those trees (their `ldm` packages in turn, ours set aside:
tests/originals.py original_package), on random tiny checkpoints (tests/tiny_models.make_tiny_checkpoint):

A. inpainting models: the demos' own functions. runwayml scripts/inpaint_st.py (released with
   sd-v1-5-inpainting; eta fixed to 1) on tiny-v1-inpainting-f8; Stability scripts/streamlit/inpainting.py
   (eta 0) and scripts/gradio/inpainting.py (eta fixed to 1) on tiny-v2-inpainting. Each demo's
   initialize_model builds its LatentInpaintDiffusion from the yaml and loads the checkpoint (strict=False, as
   released; the load is checked complete below), then its inpaint(sampler, image, mask, prompt, seed, scale,
   ddim_steps, num_samples, w, h[, eta]) runs make_batch_sd, the numpy start code and DDIMSampler.sample.
   The demos need f = 8 (`h // 8`), hence the f = 8 tiny configs.
B. 4-channel models, masked img2img: no original script exists, so the original pieces are composed as the
   issue says: torch seeded, make_batch_sd (runwayml) for image and mask, x0 = get_first_stage_encoding(
   encode_first_stage(image)); strength 1: x_T = torch.randn, then DDIMSampler.sample(mask=keep, x0=x0,
   x_T=x_T); strength < 1: img2img.py's stochastic_encode at t_enc = int(strength * steps) and decode(), with
   ddim_sampling's two blend lines (model.q_sample(x0, ts) * mask + (1 - mask) * img) run before each of
   decode()'s p_sample_ddim calls. CompVis code for tiny-v1, Stability code for tiny-v2 and tiny-v2-v.

What had to be stood in for, and nothing else: the UI and post-processing packages the demos import
(streamlit, streamlit_drawable_canvas, gradio, imwatermark, cv2, diffusers' safety checker, the feature
extractor download), with the safety check and the watermark made identities (ldm applies neither);
pytorch_lightning (LightningModule as nn.Module with `device`), taming's VectorQuantizer and `clip`, which
inference never uses; the downloads of the text encoders (`from_pretrained` builds the tiny CLIP text model /
open_clip tower of the config's extension fields, which the original classes do not take and which are
removed from the yaml they read; the CLIP tokenizer is built from open_clip's bundled BPE table,
tests/make_fixtures_text.py); the embedders' `device` attribute ("cuda" by default) set to "cpu" and the
DDIMSampler's register_buffer kept on the CPU; open_clip 3 runs its text blocks batch-first while the original
(open_clip 2) passes them (L, N, D): the blocks' attention is set to batch_first=False, as open_clip 2 was;
transformers 5's CLIPTextModel has no `text_model.` level, so those checkpoint keys are renamed for it;
tiny-v2's `use_fp16: True` (an fp16 UNet on a GPU) runs in float32. The demos have no negative prompt: for
those cases model.get_unconditional_conditioning encodes the negative prompt instead of "".

The torch RNG is seeded with the seed right before each run (after loading), as ldm's --seed. Each case
stores the uint8 images (n, H, W, 3) and the ldm command line that must reproduce them (`argv.<case>`), with
the checkpoints' digests, the sha256 of the original files run and the package versions. (Longer than a
module of ldm should be: most of it is the stand-ins the demos need to run outside their UIs.)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from originals import original_package  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE = FIXTURES / "inpaint.safetensors"

# Shared with tests/test_inpaint.py (which imports these constants).
CKPT_SEED = 0
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"
SIZE = 64
N_SAMPLES, STEPS, SEED = 2, 5, 1234
INIT_IMAGE, MASK = FIXTURES / "inpaint_init.png", FIXTURES / "inpaint_mask.png"
MODELS = {"v1-inpainting": "tiny-v1-inpainting-f8", "v2-inpainting": "tiny-v2-inpainting",
          "v1": "tiny-v1", "v2": "tiny-v2", "v2-v": "tiny-v2-v"}
# case: (model, original code, strength, eta, scale, negative prompt)
CASES = {
    "v1-inpainting": ("v1-inpainting", "runwayml inpaint_st", 1.0, 1.0, 7.5, ""),
    "v1-inpainting-negative": ("v1-inpainting", "runwayml inpaint_st", 1.0, 1.0, 7.5, NEGATIVE),
    "v2-inpainting-eta0": ("v2-inpainting", "stability streamlit", 1.0, 0.0, 10.0, ""),
    "v2-inpainting-eta0-negative": ("v2-inpainting", "stability streamlit", 1.0, 0.0, 10.0, NEGATIVE),
    "v2-inpainting-gradio": ("v2-inpainting", "stability gradio", 1.0, 1.0, 10.0, ""),
    "v1-s1.0-eta0": ("v1", "compvis ddim", 1.0, 0.0, 7.5, ""),
    "v1-s0.6-eta1": ("v1", "compvis ddim", 0.6, 1.0, 7.5, ""),
    "v1-s0.6-eta0-negative": ("v1", "compvis ddim", 0.6, 0.0, 7.5, NEGATIVE),
    "v2-s1.0-eta1-negative": ("v2", "stability ddim", 1.0, 1.0, 7.5, NEGATIVE),
    "v2-s0.6-eta0": ("v2", "stability ddim", 0.6, 0.0, 7.5, ""),
    "v2-v-s0.6-eta1": ("v2-v", "stability ddim", 0.6, 1.0, 7.5, ""),
}
SOURCES = {  # original code -> (tree, files run)
    "runwayml inpaint_st": ("runwayml", ["scripts/inpaint_st.py", "ldm/models/diffusion/ddim.py",
                                         "ldm/models/diffusion/ddpm.py"]),
    "stability streamlit": ("stability", ["scripts/streamlit/inpainting.py", "ldm/models/diffusion/ddim.py",
                                          "ldm/models/diffusion/ddpm.py"]),
    "stability gradio": ("stability", ["scripts/gradio/inpainting.py"]),
    "compvis ddim": ("compvis", ["ldm/models/diffusion/ddim.py", "ldm/models/diffusion/ddpm.py",
                                 "scripts/img2img.py"]),
    "stability ddim": ("stability", ["ldm/models/diffusion/ddim.py", "ldm/models/diffusion/ddpm.py"]),
}


def cli_args(case: str) -> list[str]:
    """The issue's command line for one case (without --config/--ckpt/--outdir, which the test adds)."""
    _, _, strength, eta, scale, negative = CASES[case]
    args = ["--init-img", INIT_IMAGE.relative_to(ROOT).as_posix(), "--mask", MASK.relative_to(ROOT).as_posix(),
            "--strength", str(strength), "--prompt", PROMPT]
    if negative:
        args += ["--negative_prompt", negative]
    return args + ["--skip_grid", "--ddim_steps", str(STEPS), "--ddim_eta", str(eta), "--n_iter", "1",
                   "--n_samples", str(N_SAMPLES), "--scale", str(scale), "--seed", str(SEED),
                   "--precision", "full", "--device", "cpu"]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, dtypes, shapes and bytes: identifies a tiny checkpoint's contents."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_inputs() -> None:
    """A smooth 64x64 RGB image (gradients and a disc) and an RGB mask: a white blob whose edges do not
    follow the 8x8 latent grid, a stripe of grey 128 (repaints) inside and of grey 127 (keeps) outside."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / (SIZE - 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float64)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], axis=-1)
    Image.fromarray((255 * rgb).round().astype(np.uint8)).save(INIT_IMAGE)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[((x - 0.35) ** 2 / 0.09 + (y - 0.55) ** 2 / 0.05) < 1] = 255
    mask[5:60, 44:52] = 128
    mask[2:9, 3:30] = 127
    rgb_mask = np.stack([mask] * 3, axis=-1)
    Image.fromarray(rgb_mask).save(MASK)


# ------------------------------------------------------------------------------------------- stand-ins
class _Inert:
    """Stands in for the demos' UI objects: every call, attribute and `with` works and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


class _LightningModule(torch.nn.Module):
    """What inference uses of pytorch_lightning.LightningModule: the `device` property."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def install_stand_ins() -> None:
    stubs = {name: _InertModule(name) for name in (
        "streamlit", "streamlit_drawable_canvas", "gradio", "imwatermark", "cv2", "clip", "diffusers",
        "diffusers.pipelines", "diffusers.pipelines.stable_diffusion",
        "diffusers.pipelines.stable_diffusion.safety_checker", "pytorch_lightning", "pytorch_lightning.utilities",
        "pytorch_lightning.utilities.distributed", "taming", "taming.modules", "taming.modules.vqvae",
        "taming.modules.vqvae.quantize")}
    stubs["streamlit"].cache = lambda **kwargs: (lambda fn: fn)
    stubs["pytorch_lightning"].LightningModule = _LightningModule
    stubs["pytorch_lightning.utilities.distributed"].rank_zero_only = lambda fn: fn
    sys.modules.update(stubs)
    import transformers

    transformers.AutoFeatureExtractor.from_pretrained = classmethod(lambda cls, *a, **k: _Inert())


@contextlib.contextmanager
def tiny_text_encoders(cfg: dict):
    """The original embedders' downloads build the tiny text encoder of the config instead."""
    import open_clip
    from make_fixtures_text import reference_tokenizer
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    params = cfg["model"]["params"]["cond_stage_config"].get("params") or {}

    def clip_text_model(cls, *args, **kwargs):
        return CLIPTextModel(CLIPTextConfig(**params["text_config"], attn_implementation="eager"))

    def openclip_model(arch, device=None, pretrained=None, **kwargs):
        vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)  # deleted by them
        model = CLIP(params["embed_dim"], vision, CLIPTextCfg(**params["text_cfg"]))
        for block in model.transformer.resblocks:  # open_clip 2's blocks took (L, N, D), as the original passes
            block.attn.batch_first = False
        return model, None, None

    saved = (CLIPTextModel.from_pretrained, CLIPTokenizer.from_pretrained, open_clip.create_model_and_transforms)
    CLIPTextModel.from_pretrained = classmethod(clip_text_model)
    CLIPTokenizer.from_pretrained = classmethod(lambda cls, *a, **k: reference_tokenizer())
    open_clip.create_model_and_transforms = openclip_model
    try:
        yield
    finally:
        CLIPTextModel.from_pretrained, CLIPTokenizer.from_pretrained = saved[:2]
        open_clip.create_model_and_transforms = saved[2]


def original_files(cfg: dict, state: dict[str, torch.Tensor], workdir: Path) -> tuple[Path, Path, dict]:
    """The yaml the original classes accept (the tiny text-size extensions removed) and the checkpoint as
    they load it (text keys renamed for transformers 5); returns (yaml, ckpt, expected state)."""
    cfg = copy.deepcopy(cfg)
    text = cfg["model"]["params"]["cond_stage_config"]
    for name in ("text_config", "embed_dim", "text_cfg"):
        (text.get("params") or {}).pop(name, None)
    if not text.get("params"):
        text.pop("params", None)
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in state.items()}
    config_path, ckpt_path = workdir / "original.yaml", workdir / "original.ckpt"
    config_path.write_text(yaml.safe_dump(cfg))
    torch.save({"state_dict": state}, ckpt_path)
    return config_path, ckpt_path, state


def check_loaded(model, state: dict[str, torch.Tensor]) -> None:
    """The original loads with strict=False: prove that every tensor of its model came from the checkpoint."""
    for key, value in model.state_dict().items():
        assert key in state, f"the original model's {key} is not in the checkpoint"
        assert torch.equal(value, state[key].to(value.dtype)), f"{key} was not loaded"


def for_cpu(model) -> None:
    """The embedders default to device "cuda" (a string kept as an attribute); the tiny-v2 yaml asks for an
    fp16 UNet (use_fp16), which the original runs on a GPU: here both run on the CPU in float32."""
    model.cond_stage_model.device = "cpu"
    model.model.diffusion_model.dtype = torch.float32


def load_script(path: Path, name: str, argv: list[str] | None = None) -> types.ModuleType:
    saved = sys.argv
    sys.argv = argv or sys.argv
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.argv = saved
    return module


def cpu_buffers(ddim_module) -> None:
    # the DDIMSampler moves its schedule to CUDA (runwayml) or to its `device` (Stability, default CUDA)
    ddim_module.DDIMSampler.register_buffer = lambda self, name, attr: setattr(self, name, attr)


@contextlib.contextmanager
def negative_prompt(model, negative: str):
    """The demos' unconditional branch is get_unconditional_conditioning(n, ""): encode `negative` instead."""
    if not negative:
        yield
        return
    original = model.get_unconditional_conditioning
    model.get_unconditional_conditioning = lambda batch_size, null_label=None: original(batch_size, negative)
    try:
        yield
    finally:
        del model.get_unconditional_conditioning


# ---------------------------------------------------------------------------------------------- the runs
def run_demo(module, sampler, eta: float | None, scale: float, negative: str) -> np.ndarray:
    """The demo's inpaint() on the fixture image and mask; torch seeded after loading."""
    kwargs = {} if eta is None else {"eta": eta}
    with negative_prompt(sampler.model, negative):
        torch.manual_seed(SEED)
        result = module.inpaint(sampler=sampler, image=Image.open(INIT_IMAGE), mask=Image.open(MASK),
                                prompt=PROMPT, seed=SEED, scale=scale, ddim_steps=STEPS, num_samples=N_SAMPLES,
                                w=SIZE, h=SIZE, **kwargs)
    return np.stack([np.asarray(image) for image in result])


def run_masked_img2img(model, sampler_cls, make_batch_sd, strength: float, eta: float, scale: float,
                       negative: str) -> np.ndarray:
    """Masked img2img composed of the original pieces (see the module docstring)."""
    torch.manual_seed(SEED)
    batch = make_batch_sd(Image.open(INIT_IMAGE), Image.open(MASK), txt=PROMPT, device=torch.device("cpu"),
                          num_samples=N_SAMPLES)
    c = model.get_learned_conditioning(batch["txt"])
    uc = model.get_learned_conditioning(N_SAMPLES * [negative])
    x0 = model.get_first_stage_encoding(model.encode_first_stage(batch["image"]))  # first draw
    keep = 1.0 - torch.nn.functional.interpolate(batch["mask"], size=x0.shape[-2:])
    sampler = sampler_cls(model)
    if strength == 1.0:
        x_T = torch.randn(x0.shape)  # second draw
        samples, _ = sampler.sample(S=STEPS, batch_size=N_SAMPLES, shape=list(x0.shape[1:]), conditioning=c,
                                    verbose=False, eta=eta, mask=keep, x0=x0, x_T=x_T,
                                    unconditional_guidance_scale=scale, unconditional_conditioning=uc)
    else:  # scripts/img2img.py: make_schedule, stochastic_encode (second draw), decode
        sampler.make_schedule(ddim_num_steps=STEPS, ddim_eta=eta, verbose=False)
        t_enc = int(strength * STEPS)
        z_enc = sampler.stochastic_encode(x0, torch.tensor([t_enc] * N_SAMPLES))
        step = sampler.p_sample_ddim

        def blended_step(img, c, ts, *args, **kwargs):  # ddim_sampling's blend, before p_sample_ddim
            img_orig = model.q_sample(x0, ts)
            img = img_orig * keep + (1. - keep) * img
            return step(img, c, ts, *args, **kwargs)

        sampler.p_sample_ddim = blended_step
        samples = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=scale, unconditional_conditioning=uc)
    images = torch.clamp((model.decode_first_stage(samples) + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * images.permute(0, 2, 3, 1).numpy()).astype(np.uint8)  # img2img.py's uint8 conversion


def build_original(cfg_path: Path, ckpt_path: Path, state: dict) -> torch.nn.Module:
    """As scripts/img2img.py load_model_from_config (on the CPU): instantiate, load strict=False, eval."""
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    model = instantiate_from_config(OmegaConf.load(cfg_path).model)
    model.load_state_dict(torch.load(ckpt_path, map_location="cpu")["state_dict"], strict=False)
    model.eval()
    check_loaded(model, state)
    for_cpu(model)
    return model


def prepared(sampler, state):
    """A demo's sampler, its model checked complete and set up for the CPU."""
    check_loaded(sampler.model, state)
    for_cpu(sampler.model)
    return sampler


_MAKE_BATCH = {}


def make_batch_sd_of(trees: dict[str, Path]):
    """runwayml inpaint_st.py make_batch_sd (the demos' image and mask conventions), for the composed runs."""
    if "fn" not in _MAKE_BATCH:
        with original_package(trees["runwayml"]):
            sys.modules["main"] = types.SimpleNamespace(instantiate_from_config=None)
            _MAKE_BATCH["fn"] = load_script(trees["runwayml"] / "scripts/inpaint_st.py",
                                            "original_inpaint_st_batch").make_batch_sd
    return _MAKE_BATCH["fn"]


def run_model(name: str, trees: dict[str, Path], workdir: Path) -> dict[str, np.ndarray]:
    """Every case of model `name`, run by the original code."""
    from tiny_models import tiny_config_path, tiny_state_dict

    cfg = yaml.safe_load(tiny_config_path(MODELS[name]).read_text())
    config_path, ckpt_path, state = original_files(cfg, tiny_state_dict(tiny_config_path(MODELS[name]),
                                                                       seed=CKPT_SEED), workdir)
    cases = {case: spec for case, spec in CASES.items() if spec[0] == name}
    out = {}
    with tiny_text_encoders(cfg):
        for case, (_, code, strength, eta, scale, negative) in cases.items():
            tree = trees[SOURCES[code][0]]
            with original_package(tree):
                cpu_buffers(importlib.import_module("ldm.models.diffusion.ddim"))
                if code == "runwayml inpaint_st":
                    sys.modules["main"] = types.SimpleNamespace(
                        instantiate_from_config=importlib.import_module("ldm.util").instantiate_from_config)
                    demo = load_script(tree / "scripts/inpaint_st.py", "original_inpaint_st")
                    demo.check_safety = lambda x: (x, [False] * len(x))
                    demo.wm_encoder = None  # put_watermark is then the identity
                    sampler = demo.initialize_model(str(config_path), str(ckpt_path))
                    out[case] = run_demo(demo, prepared(sampler, state), None, scale, negative)
                elif code == "stability streamlit":
                    demo = load_script(tree / "scripts/streamlit/inpainting.py", "original_streamlit_inpainting")
                    demo.put_watermark = lambda img, wm_encoder=None: img
                    sampler = demo.initialize_model(str(config_path), str(ckpt_path))
                    out[case] = run_demo(demo, prepared(sampler, state), eta, scale, negative)
                elif code == "stability gradio":  # builds its model at import, from sys.argv
                    demo = load_script(tree / "scripts/gradio/inpainting.py", "original_gradio_inpainting",
                                       argv=["inpainting.py", str(config_path), str(ckpt_path)])
                    demo.put_watermark = lambda img, wm_encoder=None: img
                    out[case] = run_demo(demo, prepared(demo.sampler, state), None, scale, negative)
                else:
                    model = build_original(config_path, ckpt_path, state)
                    ddim = importlib.import_module("ldm.models.diffusion.ddim")
                    out[case] = run_masked_img2img(model, ddim.DDIMSampler, make_batch_sd_of(trees), strength, eta,
                                                   scale, negative)
            print(f"{case}: mean {out[case].mean():.1f}, std {out[case].std():.1f}")
    return out


def tree_commit(path: Path) -> str:
    import subprocess

    result = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", "transformers", "open_clip_torch", "numpy", "Pillow", "omegaconf", "einops"]
    return {name: version(name) for name in names}


def main(argv=None) -> None:
    import argparse

    from safetensors.torch import save_file
    from tiny_models import tiny_config_path, tiny_state_dict

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runwayml", type=Path, required=True, help="checkout of runwayml/stable-diffusion")
    p.add_argument("--stability", type=Path, required=True, help="checkout of Stability-AI/stablediffusion")
    p.add_argument("--compvis", type=Path, required=True, help="checkout of CompVis/stable-diffusion")
    p.add_argument("--commit", action="append", default=[], metavar="TREE=HASH",
                   help="the upstream commit of a tree that is not a git checkout (e.g. runwayml=08ab4d3...)")
    args = p.parse_args(argv)
    trees = {"runwayml": args.runwayml, "stability": args.stability, "compvis": args.compvis}
    commits = {tree: tree_commit(path) for tree, path in trees.items()}
    commits.update(dict(item.split("=", 1) for item in args.commit))

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # deterministic op order; the machine is shared
    install_stand_ins()
    make_inputs()
    tensors, metadata = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            workdir = Path(tmp) / name
            workdir.mkdir()
            for case, images in run_model(name, trees, workdir).items():
                tensors[case] = torch.from_numpy(images)
                metadata[f"argv.{case}"] = json.dumps(cli_args(case))
                metadata[f"original.{case}"] = CASES[case][1]
            state = tiny_state_dict(tiny_config_path(MODELS[name]), seed=CKPT_SEED)
            metadata[f"checkpoint_digest.{name}"] = state_digest(state)
    sources = {f"{tree}:{rel}": hashlib.sha256((trees[tree] / rel).read_bytes()).hexdigest()
               for tree, files in SOURCES.values() for rel in files}
    metadata.update({
        "generator": "tests/make_fixtures_inpaint.py",
        "models": json.dumps(MODELS),
        "checkpoint": f"tests/tiny_models.make_tiny_checkpoint(tests/configs/<model>.yaml, seed={CKPT_SEED})",
        "init_image_sha256": hashlib.sha256(INIT_IMAGE.read_bytes()).hexdigest(),
        "mask_sha256": hashlib.sha256(MASK.read_bytes()).hexdigest(),
        "original_sources": json.dumps(sources),
        "original_commits": json.dumps(commits),
        "versions": json.dumps(versions()),
    })
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(FIXTURE), metadata=metadata)
    print(f"wrote {FIXTURE.relative_to(ROOT)} ({FIXTURE.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
