"""Generate tests/fixtures/a1111/: AUTOMATIC1111's prompt parsing, chunking, emphasis, textual inversion, LoRA name
map and merge, and an end-to-end image with the original CompVis / Stability DDIM sampler, on the tiny v1 and v2.

    .venv-ref/bin/python tests/make_fixtures_a1111.py --a1111 DIR --compvis DIR --stability DIR

DIR: checkouts of AUTOMATIC1111/stable-diffusion-webui (only the files listed in tests/a1111_originals.py are read),
CompVis/stable-diffusion and Stability-AI/stablediffusion. Needs `lark` (A1111's prompt_parser imports it).

What runs is A1111's own code (tests/a1111_originals.py), with its 1.x default settings:
- prompt_parser.parse_prompt_attention on PARSE_PROMPTS -> a1111.json "parse";
- FrozenCLIPEmbedderWithCustomWords (v1: transformers' CLIPTextModel and CLIPTokenizer, as the CompVis
  FrozenCLIPEmbedder it wraps) / FrozenOpenCLIPEmbedderWithCustomWords (v2: open_clip's tower run as Stability's
  encode_with_transformer, layer "penultimate") with EmbeddingsWithFixes on the token embedding and A1111's
  EmbeddingDatabase.load_from_file reading EMBEDDINGS: tokenize_line's chunks -> a1111.json "chunks", forward()
  contexts -> a1111_<model>.safetensors "cond.<case>" (v1 also with clip skip 2), and its "TI hashes";
- networks.load_network (convert_diffusers_name_to_compvis, NetworkModuleLora) and network_apply_weights on the
  ORIGINAL module tree (CompVis / Stability openaimodel UNetModel under model.diffusion_model, the text towers
  above) for LORAS at their multipliers -> the sha256 and sum of every merged weight ("merged" in the metadata);
- the merged model end to end: the contexts above, diffusers' UNet and VAE converted from the merged original
  weights (as tests/make_fixtures_pipeline.py), the ORIGINAL DDIMSampler (prompt and negative of equal chunk
  counts, so its single [uncond, cond] batch works), and k-diffusion's Euler with A1111's guidance in two calls
  for a negative prompt of another chunk count -> uint8 images "image.<case>" with the CLI flags "argv.<case>".

Tiny files written next to them (they are inputs of the tests): the embeddings (a .pt with string_to_param, an fp16
.safetensors `emb_params`, a diffusers-concept .bin) and the LoRA / LoCon files (every module A1111 maps on the
tiny models, rank 2, some without alpha; the v2 file in fp16).
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
OUT = ROOT / "tests" / "fixtures" / "a1111"

MODELS = {"v1": "tiny-v1-lora", "v2": "tiny-v2-lora"}  # SD's UNet layout, which A1111's name rules assume
CKPT_SEED = 0
PARSE_PROMPTS = [
    "normal text", "an (important) word", "(unbalanced", "\\(literal\\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "((a)) [[b]] ([c]) [(d:1.5)]", "( spaced : 1.25 ) x",
    "a:b (c:d) e", "x BREAK y BREAK", "(x BREAK y)", "BREAKfast BREAK", "a \\\\ b \\ c", "[a:b:5] [a|b] c",
    "(a:-0.5) (b:.5) (c:1.)", "", "   ", "a ] b ) c", "(x:1.2:3)", "<lora:x:0.5> (y)",
]
WORDS = "a photo of a majestic lion, golden mane, savanna at sunset, dramatic light, highly detailed"
CHUNK_PROMPTS = {
    "short": "a red cube on a table",
    "emphasis": "a (red:1.3) cube on a [table], ((sharp)), [[blurry]]",
    "long_commas": ", ".join([WORDS] * 5),
    "long_plain": " ".join(["word"] * 160),
    "break": "first part BREAK second (part:1.2) BREAK BREAK third",
    "embeddings": "lightpen and lightpen_big, (sparkle:1.4) photo, lightpen_big",
    "emb_boundary": " ".join(["w"] * 73) + " lightpen_big after",
    "comma_boundary": " ".join(["w"] * 60) + ", lightpen, " + " ".join(["z"] * 20),
    "empty": "",
    "end_token": "a <|endoftext|> b <end_of_text> c",
}
EMBEDDINGS = {"lightpen.pt": 2, "lightpen_big.safetensors": 4, "sparkle.bin": 1}
WIDTH = 32  # both tiny text encoders
# (name, multipliers as the tag / flag give them); the e2e cases use both, the tag's first
LORAS = {"v1": [("lora_v1", 0.8, 0.8), ("lora_v1_extra", 0.5, 0.5)], "v2": [("lora_v2", 0.7, 1.3)]}
E2E = {  # case: (sampler, prompt, negative prompt, clip skip); images 32x32, 2 samples, 5 steps, seed 1234
    "ddim": ("ddim", "<lora:{lora}:{te}:{unet}> a (lightpen:1.2) cube, " + ", ".join([WORDS] * 4),
             "blurry BREAK low [quality]", 1),
    "euler": ("euler", "a [lightpen_big] cube BREAK on a <lora:{lora}:{te}:{unet}> table", "sparkle, ugly", 1),
    "clip_skip": ("ddim", "a red (cube:1.4) <lora:{lora}:{te}:{unet}>", "", 2),
}
H = W = 32
C, F = 4, 2
N_SAMPLES, STEPS, SEED, SCALE = 2, 5, 1234, 7.5


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ inputs
def write_embeddings() -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    for name, n in EMBEDDINGS.items():
        vec = 0.02 * torch.randn(n, WIDTH, generator=g) * 20  # token-embedding scale of the tiny models
        path = OUT / name
        if name.endswith(".pt"):  # A1111's own layout (Embedding.save); the stored name is NOT the token
            torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "not-the-token",
                        "step": 10, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
        elif name.endswith(".safetensors"):  # kohya / A1111 safetensors: one tensor, here fp16
            save_file({"emb_params": vec.half()}, str(path))
        else:  # diffusers textual_inversion concept: {token: [dim]}
            torch.save({"<sparkle>": vec[0]}, path)


def kohya_names(cfg: dict, state: dict, is_v2: bool) -> dict[str, tuple]:
    """{kohya module name: (weight shape of the target)} of every Linear / Conv2d A1111 maps: the diffusers UNet's
    and the transformers CLIP text model's module names, as kohya's sd-scripts writes them."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_state = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(cfg, unet_state, image_size=H))
    names = {}
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not name.startswith("conv_norm"):
            names["lora_unet_" + name.replace(".", "_")] = tuple(module.weight.shape)
    text = cfg["model"]["params"]["cond_stage_config"]["params"]
    if is_v2:
        t = text["text_cfg"]
        config = dict(vocab_size=49408, hidden_size=t["width"], intermediate_size=4 * t["width"],
                      num_hidden_layers=t["layers"], num_attention_heads=t["heads"])
    else:
        config = text["text_config"]
    clip = CLIPTextModel(CLIPTextConfig(**config))
    for name, module in clip.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in "." + name:
            names["lora_te_text_model_" + name.replace(".", "_")] = tuple(module.weight.shape)
    return names


def write_lora(path: Path, modules: dict[str, tuple], seed: int, fp16: bool, every: int = 1) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors, rank = {}, 2
    for i, (name, shape) in enumerate(sorted(modules.items())):
        if i % every:
            continue
        out, fan_in = shape[0], shape[1]
        kernel = tuple(shape[2:])
        down = torch.randn(rank, fan_in, *kernel, generator=g) / (fan_in * max(1, np.prod(kernel))) ** 0.5
        up = torch.randn(out, rank, *((1, 1) if kernel else ()), generator=g) * 0.5
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if i % 3:  # some modules without alpha (scale 1)
            tensors[f"{name}.alpha"] = torch.tensor(float(1 + i % 4))
    if fp16:
        tensors = {k: v.half() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})


# ------------------------------------------------------------------------------------------ A1111 models
class Wrapper(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for k, v in children.items():
            setattr(self, k, v)


def text_encoder(a, cfg: dict, state: dict, is_v2: bool):
    """A1111's hijacked text encoder over the reference tower with `state`'s weights; returns (encoder, the
    tower's state_dict function mapping to original checkpoint keys)."""
    text = cfg["model"]["params"]["cond_stage_config"]["params"]
    if not is_v2:
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
        from make_fixtures_text import reference_tokenizer
        from transformers import CLIPTextConfig, CLIPTextModel

        clip = CLIPTextModel(CLIPTextConfig(**text["text_config"], attn_implementation="eager"))
        weights = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
        clip.load_state_dict({k: v for k, v in weights.items() if k in clip.state_dict()}, strict=True)
        clip.eval()

        class Transformer(nn.Module):  # transformers 4's CLIPTextModel layout (.text_model), which A1111 reads
            def __init__(self):
                super().__init__()
                self.text_model = clip

            def forward(self, input_ids, output_hidden_states=False):
                return clip(input_ids=input_ids, output_hidden_states=bool(output_hidden_states))

        wrapped = Wrapper(transformer=Transformer())
        wrapped.tokenizer = reference_tokenizer()
        clip.embeddings.token_embedding = a.EmbeddingsWithFixes(clip.embeddings.token_embedding, a.hijack)
        encoder = a.sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(wrapped, a.hijack)
        prefix, tower = "cond_stage_model.transformer.text_model.", clip
    else:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
        model = CLIP(text["embed_dim"], vision, CLIPTextCfg(**text["text_cfg"]))
        del model.visual
        p = "cond_stage_model.model."
        model.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)}, strict=True)
        model.eval()

        class Frozen(nn.Module):  # Stability's FrozenOpenCLIPEmbedder.encode_with_transformer, layer_idx 1
            def __init__(self):
                super().__init__()
                self.model = model

            def encode_with_transformer(self, tokens):
                x = model.token_embedding(tokens) + model.positional_embedding
                x = x if model.transformer.batch_first else x.transpose(0, 1)
                for block in model.transformer.resblocks[:-1]:
                    x = block(x, attn_mask=model.attn_mask)
                x = x if model.transformer.batch_first else x.transpose(0, 1)
                return model.ln_final(x)

        wrapped = Frozen()
        model.token_embedding = a.EmbeddingsWithFixes(model.token_embedding, a.hijack)
        encoder = a.sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(wrapped, a.hijack)
        prefix, tower = "cond_stage_model.model.", model

    def tower_state():
        return {prefix + k.replace("token_embedding.wrapped.", "token_embedding."): v
                for k, v in tower.state_dict().items()}

    return encoder, tower_state


def load_embeddings(a, encoder) -> None:
    import modules.hashes as hashes_stub

    hashes_stub.sha256 = lambda filename, title: hashlib.sha256(Path(filename).read_bytes()).hexdigest()
    a.shared.sd_model = types.SimpleNamespace(cond_stage_model=encoder)
    db = a.EmbeddingDatabase()
    for name in EMBEDDINGS:
        db.load_from_file(str(OUT / name), name)
    a.hijack.embedding_db = db


def original_unet(repo: Path, cfg: dict, state: dict):
    from originals import import_original

    (openaimodel,) = import_original(repo, ["ldm.modules.diffusionmodules.openaimodel"])
    params = dict(cfg["model"]["params"]["unet_config"]["params"])
    params["use_checkpoint"] = False
    params["use_fp16"] = False
    unet = openaimodel.UNetModel(**params)
    p = "model.diffusion_model."
    unet.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)}, strict=True)
    return unet.eval()


def merge(a, sd_model, files: list[tuple[str, float, float]]) -> None:
    """A1111: load_network for each file, then network_apply_weights on every Linear / Conv2d /
    MultiheadAttention it would run (an attention's out_proj is applied through its MultiheadAttention)."""
    from safetensors.torch import load_file

    import modules.sd_models as sd_models_stub

    sd_models_stub.read_state_dict = lambda filename: load_file(filename)
    a.shared.sd_model = sd_model
    a.networks.assign_network_names_to_compvis_modules(sd_model)
    nets = []
    for name, te, unet in files:
        net = a.networks.load_network(name, types.SimpleNamespace(filename=str(OUT / f"{name}.safetensors")))
        net.te_multiplier, net.unet_multiplier, net.dyn_dim = te, unet, None
        nets.append(net)
    a.networks.loaded_networks[:] = nets
    inside_mha = {id(m.out_proj) for m in sd_model.modules() if isinstance(m, nn.MultiheadAttention)}
    with torch.no_grad():
        for module in sd_model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and id(module) not in inside_mha:
                apply_weights(a, module, nets)


def apply_weights(a, self, nets) -> None:
    """A1111 1.10's networks.py network_apply_weights for one layer (weights merged into the layer), written out:
    the networks.py blob we read is older and expects calc_updown to return a tensor, while 1.10's
    network.py / network_lora.py (which run here, unchanged) return (updown, ex_bias). 1.10:
    `self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))` per network in order;
    a MultiheadAttention takes q/k/v on the chunks of in_proj_weight (vstack, then +=) and out_proj."""
    name = getattr(self, "network_layer_name", None)
    for net in nets:
        module = net.modules.get(name)
        if module is not None and hasattr(self, "weight"):
            weight = self.weight
            updown, _ = module.calc_updown(weight)
            if len(weight.shape) == 4 and weight.shape[1] == 9:
                updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))
            self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
            continue
        q, k, v, out = (net.modules.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
        if isinstance(self, nn.MultiheadAttention) and q and k and v and out:
            qw, kw, vw = self.in_proj_weight.chunk(3, 0)
            updown_qkv = torch.vstack([q.calc_updown(qw)[0], k.calc_updown(kw)[0], v.calc_updown(vw)[0]])
            self.in_proj_weight += updown_qkv
            self.out_proj.weight += out.calc_updown(self.out_proj.weight)[0]


# ------------------------------------------------------------------------------------------------- main
def chunks_json(encoder, prompt: str) -> list[dict]:
    chunks, _ = encoder.tokenize_line(prompt)
    return [{"tokens": c.tokens, "multipliers": c.multipliers,
             "fixes": [[offset, emb.name] for offset, emb in c.fixes]} for c in chunks]


def encode(a, encoder, prompt: str, clip_skip: int = 1) -> tuple[torch.Tensor, str]:
    a.opts.CLIP_stop_at_last_layers = clip_skip
    a.hijack.extra_generation_params = {}
    with torch.no_grad():
        z = encoder([prompt])
    a.opts.CLIP_stop_at_last_layers = 1
    return z, a.hijack.extra_generation_params.get("TI hashes", "")


def cli_args(model_name: str, case: str) -> list[str]:
    sampler, prompt, negative, clip_skip = E2E[case]
    lora, te, unet = LORAS[model_name][0]
    args = ["--prompt", prompt.format(lora=lora, te=te, unet=unet), "--negative_prompt", negative, "--sampler", sampler,
            "--ddim_steps", str(STEPS), "--seed", str(SEED), "--n_samples", str(N_SAMPLES), "--n_iter", "1",
            "--C", str(C), "--f", str(F), "--H", str(H), "--W", str(W), "--precision", "full", "--device", "cpu",
            "--skip_grid", "--prompt_syntax", "a1111", "--lora_dir", "tests/fixtures/a1111"]
    for name in EMBEDDINGS:
        args += ["--embedding", f"tests/fixtures/a1111/{name}"]
    for name, te, _ in LORAS[model_name][1:]:
        args += ["--lora", f"tests/fixtures/a1111/{name}.safetensors:{te}"]
    if clip_skip > 1:
        args += ["--clip_skip", str(clip_skip)]
    return args


def e2e(a, encoder, ref, cfg, original, case: str) -> np.ndarray:
    from make_fixtures_pipeline import OriginalModel, cpu_sampler, import_k_diffusion

    sampler, prompt, negative, clip_skip = E2E[case]
    prompt, _ = a.extra_networks.parse_prompt(prompt.format(lora="x", te=1, unet=1))  # tags out, as processing.py
    cond = encode(a, encoder, prompt, clip_skip)[0].repeat(N_SAMPLES, 1, 1)
    uncond = encode(a, encoder, negative, clip_skip)[0].repeat(N_SAMPLES, 1, 1)
    gen = torch.Generator().manual_seed(SEED)
    model = OriginalModel(ref.unet, cfg, original["util"], ref.parameterization)
    x_T = torch.randn([N_SAMPLES, C, H // F, W // F], generator=gen)
    with torch.no_grad():
        if sampler == "ddim":
            samples, _ = cpu_sampler(original["ddim"].DDIMSampler)(model).sample(
                S=STEPS, conditioning=cond, batch_size=N_SAMPLES, shape=[C, H // F, W // F], verbose=False,
                unconditional_guidance_scale=SCALE, unconditional_conditioning=uncond, eta=0.0, x_T=x_T)
        else:
            kd = import_k_diffusion()
            denoiser = kd.external.CompVisDenoiser(model)
            sigmas = denoiser.get_sigmas(STEPS)

            def guided(x, sigma):  # A1111's CFGDenoiser for conds of other lengths: cond batch, then uncond
                out_cond = denoiser(x, sigma, cond=cond)
                out_uncond = denoiser(x, sigma, cond=uncond)
                return out_uncond + (out_cond - out_uncond) * SCALE

            samples = kd.sampling.sample_euler(guided, x_T * sigmas[0], sigmas, disable=True)
        images = ref.vae.decode(samples / ref.scale_factor).sample
    images = torch.clamp((images + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * images.permute(0, 2, 3, 1).numpy()).astype(np.uint8)


def main(argv=None) -> None:
    import argparse

    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a1111", type=Path, required=True, help="checkout of AUTOMATIC1111/stable-diffusion-webui")
    p.add_argument("--compvis", type=Path, required=True, help="checkout of CompVis/stable-diffusion")
    p.add_argument("--stability", type=Path, required=True, help="checkout of Stability-AI/stablediffusion")
    args = p.parse_args(argv)

    from a1111_originals import A1111
    from make_fixtures_pipeline import Reference, lit_ema_key, state_digest, versions
    from originals import import_original
    from tiny_models import tiny_config_path, tiny_state_dict

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    import tempfile

    a = A1111(args.a1111, Path(tempfile.mkdtemp()))  # A1111 lists (and creates) its Lora folder at import
    write_embeddings()
    record = {"parse": {p: a.prompt_parser.parse_prompt_attention(p) for p in PARSE_PROMPTS},
              "extra_networks": {}, "chunks": {}}
    for p_ in PARSE_PROMPTS + list(E2E[c][1].format(lora="a", te=0.5, unet="unet=2") for c in E2E):
        text, data = a.extra_networks.parse_prompt(p_)
        record["extra_networks"][p_] = [text, {k: [[v.positional, v.named] for v in vs] for k, vs in data.items()}]
    modules = ["ldm.modules.diffusionmodules.util", "ldm.models.diffusion.ddim"]
    for model_name, config_name in MODELS.items():
        is_v2 = model_name != "v1"
        config_path = tiny_config_path(config_name)
        cfg = yaml.safe_load(config_path.read_text())
        raw = tiny_state_dict(config_path, seed=CKPT_SEED)
        # what ldm.load_model uses by default: the EMA UNet weights under the raw names
        state = {k: raw[lit_ema_key(k)] if k.startswith("model.diffusion_model.") else v for k, v in raw.items()
                 if not k.startswith("model_ema.")}
        names = kohya_names(cfg, state, is_v2)
        first, *extra = LORAS[model_name]
        write_lora(OUT / f"{first[0]}.safetensors", names, seed=1, fp16=is_v2)
        for i, (name, *_) in enumerate(extra):
            write_lora(OUT / f"{name}.safetensors", names, seed=2 + i, fp16=False, every=3)
        encoder, tower_state = text_encoder(a, cfg, state, is_v2)
        load_embeddings(a, encoder)
        record["chunks"][model_name] = {case: chunks_json(encoder, p_) for case, p_ in CHUNK_PROMPTS.items()}
        tensors, metadata = {}, {}
        for case, p_ in CHUNK_PROMPTS.items():
            tensors[f"cond.{case}"], metadata[f"ti_hashes.{case}"] = encode(a, encoder, p_)
            if not is_v2:
                tensors[f"cond_skip2.{case}"] = encode(a, encoder, p_, 2)[0]
        repo = args.stability if is_v2 else args.compvis
        sd_model = Wrapper(model=Wrapper(diffusion_model=original_unet(repo, cfg, state)), cond_stage_model=encoder)
        sd_model.is_sdxl = False
        before = {**{"model.diffusion_model." + k: v.clone() for k, v in
                     sd_model.model.diffusion_model.state_dict().items()}, **{k: v.clone() for k, v in tower_state().items()}}
        merge(a, sd_model, LORAS[model_name])
        after = {**{"model.diffusion_model." + k: v for k, v in sd_model.model.diffusion_model.state_dict().items()},
                 **tower_state()}
        changed = {k: v for k, v in after.items() if not torch.equal(v, before[k])}
        metadata["merged"] = json.dumps({k: [digest(v), float(v.double().sum())] for k, v in sorted(changed.items())})
        print(f"{model_name}: {len(names)} LoRA modules, {len(changed)} weights merged")
        merged = dict(raw)
        for k, v in after.items():
            merged[lit_ema_key(k) if k.startswith("model.diffusion_model.") else k] = v
        ref = Reference(cfg, merged)
        util, ddim = import_original(repo, modules)
        for case in E2E:
            if is_v2 and E2E[case][3] > 1:
                continue  # clip skip is v1's
            tensors[f"image.{case}"] = torch.from_numpy(e2e(a, encoder, ref, cfg, {"util": util, "ddim": ddim}, case))
            metadata[f"argv.{case}"] = json.dumps(cli_args(model_name, case))
        metadata.update({
            "generator": "tests/make_fixtures_a1111.py", "config": str(config_path.relative_to(ROOT)),
            "checkpoint": f"tests/tiny_models.make_tiny_checkpoint(config, seed={CKPT_SEED})",
            "checkpoint_digest": state_digest(raw), "a1111_sources": json.dumps(a.sources()),
            "versions": json.dumps(versions()),
        })
        path = OUT / f"a1111_{model_name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)")
    record["sources"] = a.sources()
    (OUT / "a1111.json").write_text(json.dumps(record, indent=0))
    print(f"wrote {(OUT / 'a1111.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
