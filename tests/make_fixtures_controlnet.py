"""Generate tests/fixtures/controlnet.safetensors: outputs of the ORIGINAL ControlNet code on tiny random models.
(Longer than the house's ~350 lines: it drives the original code through ten command-line cases and five
apply_model cases, with the stubs and key renames that takes.)

Run with the reference environment (none of its packages is a dependency of ldm):

    .venv-ref/bin/python tests/make_fixtures_controlnet.py --controlnet DIR --nightly DIR

with DIR a checkout of lllyasviel/ControlNet and of lllyasviel/ControlNet-v1-1-nightly. (The canny case needs
opencv-python-headless in that environment: `.venv-ref/bin/pip install opencv-python-headless`.)

What runs is the original code, imported from those checkouts (their `ldm` and `cldm` packages, ours set aside;
pytorch_lightning, which only provides the base class, is stubbed by nn.Module): cldm/model.py create_model and
load_state_dict build and load cldm.cldm.ControlLDM from the tiny yamls (tests/configs/tiny-cldm*.yaml, minus
our text-size extension), its FrozenCLIPEmbedder's download replaced by a transformers CLIPTextModel of the
tiny size (weights from the checkpoint; transformers 5 keeps no `text_model.` level and no position_ids, so
those keys are renamed / dropped for it) and transformers' CLIPTokenizer on open_clip's vocabulary
(make_fixtures_text.reference_tokenizer). Sampling is cldm/ddim_hacked.py DDIMSampler (its CUDA-only
register_buffer replaced by setattr), driven as the gradio_*2image.py demos drive it:

    cond = {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning([prompt] * n)]}
    un_cond = {"c_concat": None if guess_mode else [hint], "c_crossattn": [... [negative] * n]}
    model.control_scales = [s * 0.825 ** (12 - i) for i in range(13)] if guess_mode else [s] * 13

with the prompt verbatim (the demos append their UI's `a_prompt`), hint = uint8 RGB / 255 as NCHW for every
sample, and the team's noise convention (x_T = randn from a CPU generator seeded with the seed; img2img: the
posterior sample first, then the forward noise, drawn from the global RNG seeded the same, as
make_fixtures_pipeline.py). Images: clamp((x + 1) / 2) * 255 truncated, as txt2img (not the demos' x * 127.5 +
127.5, the same up to rounding).

The three file layouts are loaded the original ways: v1.0, the whole ControlLDM state dict with the demos'
model.load_state_dict (strict); v1.1, the SD checkpoint then the control_model.* file, both strict=False, as
the v1.1 demos (so the UNet gets the checkpoint's RAW weights, not its EMA); extracted, the prefix-less fp16
file with `control_model.` put back, strict=False (sd-webui-controlnet's extractor removed it). Two ControlNets:
the original has no such mode; the reference wraps its ControlLDM.apply_model so that each original ControlNet
runs on its own hint and its scaled residuals are summed before the original ControlledUnetModel (the
convention of sd-webui-controlnet, ComfyUI and diffusers). global_average_pooling (the v1.1 shuffle model) is
the nightly's ControlLDM.

Also stored: ControlLDM.apply_model outputs of an SD-shaped tiny net (13 residuals, linear projections,
tests/configs/tiny-cldm-13.yaml) for given x, t, context and hint: strength 1, guess-mode scales,
c_concat None, only_mid_control and (nightly) global_average_pooling.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE = FIXTURES / "controlnet.safetensors"

# Shared with tests/test_controlnet.py.
CONFIG, CONFIG_13 = "tiny-cldm", "tiny-cldm-13"
SEED_SD, SEED_SECOND, SEED_13 = 0, 1, 2
PROMPT = "a painting of a virus monster playing guitar"
NEGATIVE = "blurry, low quality"
H = W = 32
N_SAMPLES, STEPS, SEED = 2, 5, 1234
HINTS = {"a": FIXTURES / "controlnet_hint_a.png", "b": FIXTURES / "controlnet_hint_b.png"}
PHOTO = FIXTURES / "pipeline_init.png"  # the canny case's input; also img2img's init image
FILES = {  # name -> what tests/make_fixtures_controlnet.write_files writes
    "sd": "sd.ckpt",  # the Stable Diffusion part, with different EMA weights (the original uses the raw ones)
    "v10": "control_v10.pth",  # whole ControlLDM state dict, plain (tool_add_control.py)
    "v10_wrapped": "control_v10.ckpt",  # the same under "state_dict"
    "v11": "control_v11.pth",  # control_model.* only
    "extracted": "control_extracted.safetensors",  # prefix removed, fp16
    "second": "control_second.pth",  # another ControlNet, v1.1 layout
}
# case -> (mode, CLI flags after the common ones; {name}: a file of FILES, {hint_a}, {hint_b}, {photo}: images,
# {config}: tests/configs/tiny-cldm.yaml)
CASES = {
    "v10": ("txt2img", ["--ckpt", "{v10}", "--control_image", "{hint_a}"]),
    "v11": ("txt2img", ["--ckpt", "{sd}", "--control", "{v11}", "--control_image", "{hint_a}"]),
    "extracted": ("txt2img", ["--ckpt", "{sd}", "--control", "{extracted}", "--control_image", "{hint_a}"]),
    "strength": ("txt2img", ["--ckpt", "{sd}", "--control", "{v11}:0.5", "--control_image", "{hint_a}"]),
    "guess": ("txt2img", ["--ckpt", "{sd}", "--control", "{v11}", "--control_image", "{hint_a}", "--guess_mode"]),
    "guess_half": ("txt2img", ["--ckpt", "{sd}", "--control", "{v11}:0.5", "--control_image", "{hint_a}",
                               "--guess_mode", "--negative_prompt", NEGATIVE]),
    "negative": ("txt2img", ["--ckpt", "{sd}", "--control", "{v11}", "--control_image", "{hint_a}",
                             "--negative_prompt", NEGATIVE]),
    "two": ("txt2img", ["--ckpt", "{sd}", "--control", "{v11}", "--control", "{second}:0.5",
                        "--control_image", "{hint_a}", "--control_image", "{hint_b}"]),
    "img2img": ("img2img", ["--ckpt", "{sd}", "--control", "{v11}", "--control_image", "{hint_a}",
                            "--init-img", "{photo}", "--strength", "0.75"]),
    "canny": ("txt2img", ["--ckpt", "{sd}", "--control", "{v11}", "--control_image", "{photo}",
                          "--control_preprocess", "canny"]),
}
TXT2IMG_SCALE, IMG2IMG_SCALE, STRENGTH = 7.5, 5.0, 0.75  # the CLI's defaults (the original scripts')
LATENT_13 = 16  # tiny-cldm-13 apply_model inputs: latent 16x16 (hint 128x128), 5 context tokens
APPLY_CASES = ("strength1", "guess", "uncond", "only_mid", "avg_pool")


def cli_args(mode: str, flags: list[str]) -> list[str]:
    """Flags of our CLI for one case, with {placeholders} (the test fills in paths)."""
    args = ["--config", "{config}", "--prompt", PROMPT, "--sampler", "ddim", "--ddim_steps", str(STEPS),
            "--seed", str(SEED), "--n_samples", str(N_SAMPLES), "--n_iter", "1", "--C", "4", "--f", "8",
            "--precision", "full", "--device", "cpu", "--skip_grid"]
    if mode == "txt2img":
        args += ["--H", str(H), "--W", str(W)]
    return args + flags


def make_hints() -> None:
    """Two 32x32 RGB hints: thin white lines on black (as an edge map), and a smooth disc (as a depth map)."""
    a = np.zeros((H, W, 3), np.uint8)
    a[6, 4:28] = a[26, 4:28] = a[6:27, 4] = a[6:27, 27] = 255
    for i in range(8, 24):
        a[i, i] = 255
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    r = np.sqrt((x - 18) ** 2 + (y - 14) ** 2) / 16
    depth = np.clip(1 - r, 0, 1)
    b = np.stack([255 * depth, 200 * depth, 255 * (1 - depth) * 0.5], axis=-1).round().astype(np.uint8)
    Image.fromarray(a).save(HINTS["a"])
    Image.fromarray(b).save(HINTS["b"])


def apply_inputs() -> dict[str, torch.Tensor]:
    """x, integer t, context and a per-sample hint for the tiny-cldm-13 apply_model cases (seeded)."""
    g = torch.Generator().manual_seed(99)
    return {"x": torch.randn(2, 4, LATENT_13, LATENT_13, generator=g), "t": torch.tensor([981, 261]),
            "context": torch.randn(2, 5, 32, generator=g),
            "hint": torch.randint(0, 256, (2, 3, 8 * LATENT_13, 8 * LATENT_13), generator=g).float() / 255.0}


# --------------------------------------------------------------------------------- the checkpoint files
def state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """The tiny checkpoints' contents in the original layouts (tests/tiny_models.py weights)."""
    from tiny_models import tiny_config_path, tiny_state_dict

    path = tiny_config_path(CONFIG)
    full = tiny_state_dict(path, seed=SEED_SD, ema=False)
    full["logvar"] = torch.zeros(1000)  # a registered buffer of the original DDPM, in every v1.0 file
    control = {k: v for k, v in full.items() if k.startswith("control_model.")}
    with_ema = tiny_state_dict(path, seed=SEED_SD, ema=True)
    sd = {k: v for k, v in with_ema.items() if not k.startswith("control_model.")}
    second = {k: v for k, v in tiny_state_dict(path, seed=SEED_SECOND, ema=False).items()
              if k.startswith("control_model.")}
    extracted = {k[len("control_model."):]: v.half() for k, v in control.items()}
    return {"sd": sd, "v10": full, "v10_wrapped": full, "v11": control, "extracted": extracted, "second": second}


def write_files(directory: Path) -> dict[str, Path]:
    """Write FILES into `directory` as the original tools write them; returns name -> path."""
    from safetensors.torch import save_file

    paths = {}
    for name, state in state_dicts().items():
        path = Path(directory) / FILES[name]
        if path.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        elif name in ("sd", "v10_wrapped"):
            torch.save({"state_dict": state, "global_step": 0}, path)
        else:
            torch.save(state, path)
        paths[name] = path
    return paths


def state_digest(states: dict[str, dict[str, torch.Tensor]]) -> str:
    """sha256 over every file's sorted keys, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(states):
        for key in sorted(states[name]):
            t = states[name][key].contiguous()
            digest.update(f"{name}:{key}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ the originals
class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


def stub_lightning() -> None:
    """pytorch_lightning only gives the original DDPM its base class (and `device`) here."""

    class LightningModule(torch.nn.Module):
        @property
        def device(self):
            return next(self.parameters()).device

    for name, attrs in {"pytorch_lightning": {"LightningModule": LightningModule}, "pytorch_lightning.utilities": {},
                        "pytorch_lightning.utilities.distributed": {"rank_zero_only": lambda f: f}}.items():
        module = _Stub(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def original_yaml(config_name: str, directory: Path, nightly_pooling: bool = False) -> tuple[Path, dict]:
    """The tiny yaml as the original reads it: without our text_config extension (returned separately)."""
    import yaml

    from tiny_models import tiny_config_path

    cfg = yaml.safe_load(tiny_config_path(config_name).read_text())
    text = cfg["model"]["params"]["cond_stage_config"].pop("params")["text_config"]
    if nightly_pooling:
        cfg["model"]["params"]["global_average_pooling"] = True
    path = Path(directory) / f"{config_name}{'-pool' if nightly_pooling else ''}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, text


def build_original(repo: Path, yaml_path: Path, text_config: dict):
    """cldm.model.create_model(yaml) of the checkout (imported now: call inside originals.original_tree)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    import ldm.modules.encoders.modules as encoders
    from cldm import model as cldm_model
    from cldm.ddim_hacked import DDIMSampler
    from make_fixtures_text import reference_tokenizer

    tokenizer = reference_tokenizer()
    encoders.CLIPTokenizer = types.SimpleNamespace(from_pretrained=lambda version: tokenizer)
    encoders.CLIPTextModel = types.SimpleNamespace(from_pretrained=lambda version: CLIPTextModel(
        CLIPTextConfig(**text_config, attn_implementation="eager")))
    DDIMSampler.register_buffer = lambda self, name, attr: setattr(self, name, attr)  # theirs moves to CUDA
    model = cldm_model.create_model(str(yaml_path)).cpu().eval()
    model.cond_stage_model.device = "cpu"  # FrozenCLIPEmbedder's default device is "cuda"
    return model, cldm_model, DDIMSampler


def for_original(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Our tiny layout -> the keys the original model holds with the installed transformers (text keys only)."""
    out = {}
    wanted = set(model.state_dict())
    for key, value in state.items():
        if key.endswith("position_ids") and key not in wanted:
            continue
        new = key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
        out[new if new in wanted else key] = value
    return out


def load_file(cldm_model, path: Path, model, strict: bool, prefix: str = "") -> None:
    """The demos' model.load_state_dict(load_state_dict(path)) with our text-key renaming."""
    state = cldm_model.load_state_dict(str(path), location="cpu")
    state = for_original({prefix + k: v for k, v in state.items()}, model)
    result = model.load_state_dict(state, strict=strict)
    if not strict:  # what strict=False leaves out must be what the original leaves out
        bad = [k for k in result.unexpected_keys if not k.startswith("model_ema.")]
        assert not bad, bad


def read_hint(path: Path) -> torch.Tensor:
    """The demos' control: uint8 RGB / 255, (1, 3, H, W)."""
    array = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(array.copy()).float()[None].permute(0, 3, 1, 2) / 255.0


def canny(path: Path) -> np.ndarray:
    """The canny demos' hint: HWC3(cv2.Canny(img, 100, 200)) of the RGB image (annotator/canny)."""
    import cv2

    edges = cv2.Canny(np.array(Image.open(path).convert("RGB")), 100, 200)
    return np.concatenate([edges[:, :, None]] * 3, axis=2)


def sample(model, DDIMSampler, hints, strengths, mode, guess_mode, negative, nets=None):
    """One run of the demos' process() (ddim_hacked) with our noise convention -> (latents, uint8 images)."""
    n = N_SAMPLES
    hints = [h.repeat(n, 1, 1, 1) for h in hints]
    scale = TXT2IMG_SCALE if mode == "txt2img" else IMG2IMG_SCALE
    cond = {"c_concat": [hints[0]], "c_crossattn": [model.get_learned_conditioning([PROMPT] * n)]}
    un_cond = {"c_concat": None if guess_mode else [hints[0]],
               "c_crossattn": [model.get_learned_conditioning([negative] * n)]}
    scales = [[s * (0.825 ** float(12 - i)) for i in range(13)] if guess_mode else [s] * 13 for s in strengths]
    model.control_scales = scales[0]
    if nets is not None:  # several ControlNets: each on its own hint and scales, the residuals summed
        original_apply = type(model).apply_model

        def apply_model(x_noisy, t, cond_, *args, **kwargs):
            if cond_["c_concat"] is None:
                return original_apply(model, x_noisy, t, cond_)
            cond_txt = torch.cat(cond_["c_crossattn"], 1)
            total = None
            for net, hint, net_scales in zip(nets, hints, scales):
                control = net(x=x_noisy, hint=hint, timesteps=t, context=cond_txt)
                control = [c * s for c, s in zip(control, net_scales)]
                total = control if total is None else [a + b for a, b in zip(total, control)]
            return model.model.diffusion_model(x=x_noisy, timesteps=t, context=cond_txt, control=total,
                                               only_mid_control=model.only_mid_control)

        model.apply_model = apply_model
    sampler = DDIMSampler(model)
    shape = (4, H // 8, W // 8)
    if mode == "img2img":
        from make_fixtures_pipeline import load_img

        torch.manual_seed(SEED)  # the global RNG draws as a CPU generator seeded the same
        image = load_img(PHOTO).repeat(n, 1, 1, 1)
        init_latent = model.get_first_stage_encoding(model.encode_first_stage(image))
        noise = torch.randn(init_latent.shape)
        sampler.make_schedule(ddim_num_steps=STEPS, ddim_eta=0.0, verbose=False)
        t_enc = int(STRENGTH * STEPS)
        z_enc = sampler.stochastic_encode(init_latent, torch.tensor([t_enc] * n), noise=noise)
        samples = sampler.decode(z_enc, cond, t_enc, unconditional_guidance_scale=scale,
                                 unconditional_conditioning=un_cond)
    else:
        x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(SEED))
        samples, _ = sampler.sample(STEPS, n, shape, cond, verbose=False, eta=0.0, x_T=x_T,
                                    unconditional_guidance_scale=scale, unconditional_conditioning=un_cond)
    if nets is not None:
        del model.apply_model
    images = torch.clamp((model.decode_first_stage(samples) + 1.0) / 2.0, min=0.0, max=1.0)
    return samples, torch.from_numpy((255.0 * images.permute(0, 2, 3, 1).numpy()).astype(np.uint8))


def pipeline_cases(repo: Path, files: dict[str, Path], tmp: Path) -> dict[str, torch.Tensor]:
    from originals import original_tree

    out = {}
    yaml_path, text = original_yaml(CONFIG, tmp)
    with original_tree(repo, ("ldm", "cldm")):
        stub_lightning()
        hint_a, hint_b = read_hint(HINTS["a"]), read_hint(HINTS["b"])
        canny_map = canny(PHOTO)
        out["canny_map"] = torch.from_numpy(canny_map)
        hint_canny = torch.from_numpy(canny_map.copy()).float()[None].permute(0, 3, 1, 2) / 255.0
        for case, (mode, flags) in CASES.items():
            model, cldm_model, DDIMSampler = build_original(repo, yaml_path, text)
            nets = None
            if case == "v10":
                load_file(cldm_model, files["v10"], model, strict=True)
            else:
                load_file(cldm_model, files["sd"], model, strict=False)
                control = files["extracted"] if case == "extracted" else files["v11"]
                load_file(cldm_model, control, model, strict=False,
                          prefix="control_model." if case == "extracted" else "")
            if case == "two":
                second, _, _ = build_original(repo, yaml_path, text)
                load_file(cldm_model, files["second"], second, strict=False)
                nets = [model.control_model, second.control_model]
            hints = [hint_canny] if case == "canny" else [hint_a, hint_b] if case == "two" else [hint_a]
            strengths = {"strength": [0.5], "guess_half": [0.5], "two": [1.0, 0.5]}.get(case, [1.0])
            negative = NEGATIVE if case in ("negative", "guess_half") else ""
            latents, images = sample(model, DDIMSampler, hints, strengths, mode, "--guess_mode" in flags,
                                     negative, nets)
            out[f"latents.{case}"], out[f"images.{case}"] = latents, images
            print(f"{case}: image mean {images.float().mean():.1f}, std {images.float().std():.1f}")
    return out


def apply_cases(repo: Path, nightly: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """ControlLDM.apply_model of the SD-shaped tiny net (v1.0 code; the pooling case from the nightly)."""
    from originals import original_tree
    from tiny_models import tiny_config_path, tiny_state_dict

    state = tiny_state_dict(tiny_config_path(CONFIG_13), seed=SEED_13, ema=False)
    inputs = apply_inputs()
    out = {}
    for case in APPLY_CASES:
        source = nightly if case == "avg_pool" else repo
        yaml_path, text = original_yaml(CONFIG_13, tmp, nightly_pooling=case == "avg_pool")
        with original_tree(source, ("ldm", "cldm")):
            stub_lightning()
            model, _, _ = build_original(source, yaml_path, text)
            model.load_state_dict({**for_original(state, model), "logvar": model.logvar}, strict=True)
            if case == "guess":
                model.control_scales = [0.7 * (0.825 ** float(12 - i)) for i in range(13)]
            model.only_mid_control = case == "only_mid"
            cond = {"c_crossattn": [inputs["context"]], "c_concat": None if case == "uncond" else [inputs["hint"]]}
            out[f"apply.{case}"] = model.apply_model(inputs["x"], inputs["t"], cond)
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "numpy", "omegaconf", "Pillow",
                                             "opencv-python-headless")}


def git_commit(repo: Path, given: str | None) -> str:
    """The checkout's HEAD, or the commit given on the command line for an extracted tree."""
    import subprocess

    result = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = result.stdout.strip() if result.returncode == 0 else ""
    if not commit and not given:
        raise SystemExit(f"{repo} is not a git checkout: give its commit (--controlnet-commit / --nightly-commit)")
    return commit or given


def main(argv=None) -> None:
    import argparse

    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--controlnet", type=Path, required=True, help="checkout of lllyasviel/ControlNet")
    p.add_argument("--nightly", type=Path, required=True, help="checkout of lllyasviel/ControlNet-v1-1-nightly")
    p.add_argument("--controlnet-commit", help="commit of --controlnet when it is an extracted tree, not a checkout")
    p.add_argument("--nightly-commit", help="commit of --nightly when it is an extracted tree, not a checkout")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # deterministic op order; the machine is shared
    make_hints()
    states = state_dicts()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(Path(tmp))
        tensors = pipeline_cases(args.controlnet, files, Path(tmp))
        tensors.update(apply_cases(args.controlnet, args.nightly, Path(tmp)))
    sources = {f"{name}:{rel}": hashlib.sha256((repo / rel).read_bytes()).hexdigest()
               for name, repo in (("controlnet", args.controlnet), ("nightly", args.nightly))
               for rel in ("cldm/cldm.py", "cldm/ddim_hacked.py", "cldm/model.py")}
    metadata = {
        "generator": "tests/make_fixtures_controlnet.py",
        "upstream": json.dumps({"lllyasviel/ControlNet": git_commit(args.controlnet, args.controlnet_commit),
                                "lllyasviel/ControlNet-v1-1-nightly": git_commit(args.nightly, args.nightly_commit)}),
        "original_sources": json.dumps(sources),
        "checkpoint_digest": state_digest(states),
        "versions": json.dumps(versions()),
        **{f"argv.{case}": json.dumps([mode] + cli_args(mode, flags)) for case, (mode, flags) in CASES.items()},
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(FIXTURE), metadata=metadata)
    print(f"wrote {FIXTURE.relative_to(ROOT)} ({FIXTURE.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
