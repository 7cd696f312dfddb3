"""LoRA, textual inversion, A1111 prompt syntax and clip skip against AUTOMATIC1111's own functions.

tests/make_fixtures_a1111.py ran A1111's prompt_parser, sd_hijack_clip (chunks, emphasis, clip skip),
EmbeddingDatabase / EmbeddingsWithFixes, networks.load_network (convert_diffusers_name_to_compvis) and network_lora's
merge on the tiny v1 / v2 models in SD's UNet layout (tests/configs/tiny-v*-lora.yaml), and the merged model end to
end with the ORIGINAL DDIM sampler and k-diffusion's Euler (tests/fixtures/a1111/).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import ldm
from ldm import cli, lora, png_info, prompts
from ldm.embeddings import EmbeddingError, load_embedding, load_embeddings
from make_fixtures_a1111 import CHUNK_PROMPTS, CKPT_SEED, E2E, EMBEDDINGS, LORAS, MODELS, digest
from make_fixtures_pipeline import state_digest
from tiny_models import make_tiny_checkpoint, tiny_config_path, tiny_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "a1111"
RECORD = json.loads((FIXTURES / "a1111.json").read_text())
pytestmark = pytest.mark.usefixtures("one_thread")


def fixture(model_name: str):
    with safe_open(str(FIXTURES / f"a1111_{model_name}.safetensors"), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, config in MODELS.items():
        path = make_tiny_checkpoint(tiny_config_path(config), root / f"{config}.ckpt", seed=CKPT_SEED)
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert state_digest(state) == fixture(name)[0]["checkpoint_digest"], \
            "tests/tiny_models.py now makes other weights: rerun tests/make_fixtures_a1111.py"
        out[name] = (tiny_config_path(config), path)
    return out


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: ldm.load_model(*paths) for name, paths in checkpoints.items()}


def database(model):
    return load_embeddings([FIXTURES / name for name in EMBEDDINGS], model.cond_stage_model)


# --------------------------------------------------------------------------------------------- parsing
def test_parse_prompt_attention_is_a1111s():
    for prompt, expected in RECORD["parse"].items():
        assert prompts.parse_prompt_attention(prompt) == expected, prompt  # weights bit for bit (same float ops)


def test_extra_network_tags_are_cut_as_a1111():
    for prompt, (text, data) in RECORD["extra_networks"].items():
        ours, tags = prompts.parse_extra_networks(prompt)
        assert ours == text, prompt
        got = {}
        for tag in tags:
            got.setdefault(tag.kind, []).append([list(tag.positional), dict(tag.named)])
        assert got == data, prompt


@pytest.mark.parametrize("model_name", list(MODELS))
def test_chunks_are_a1111s(model_name, models):
    model = models[model_name]
    db = database(model)
    for case, prompt in CHUNK_PROMPTS.items():
        chunks = prompts.prompt_chunks(model.cond_stage_model, prompt, db)
        got = [{"tokens": c.tokens, "multipliers": c.weights, "fixes": [[o, e.name] for o, e in c.fixes]}
               for c in chunks]
        assert got == RECORD["chunks"][model_name][case], case


@pytest.mark.parametrize("model_name", list(MODELS))
def test_contexts_and_ti_hashes_are_a1111s(model_name, models):
    model = models[model_name]
    metadata, tensors = fixture(model_name)
    db = database(model)
    worst = 0.0
    for case, prompt in CHUNK_PROMPTS.items():
        for key, skip in (("cond", 1), ("cond_skip2", 2)):
            if f"{key}.{case}" not in tensors:
                continue
            with torch.no_grad():
                z = prompts.encode(model.cond_stage_model, [prompt], prompts.TextOptions("a1111", skip, db))
            expected = tensors[f"{key}.{case}"]
            assert z.shape == expected.shape, case
            worst = max(worst, ((z - expected).abs() / (1 + expected.abs())).max().item())
        used = prompts.used_embeddings(model.cond_stage_model, [prompt], prompts.TextOptions("a1111", 1, db))
        assert ", ".join(f"{e.name}: {e.shorthash}" for e in used) == metadata[f"ti_hashes.{case}"], case
    print(f"{model_name}: max |ours - A1111| / (1 + |A1111|) = {worst:.2e}")
    # float32, transformers' CLIP against ours (other op order, then the emphasis mean ratio): measured 6.6e-6
    # (v1); open_clip's tower runs the same kernels as ours: 0 (v2)
    assert worst < 2e-5


# ------------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("model_name", list(MODELS))
def test_merge_is_a1111s_and_undone(model_name, models):
    model = models[model_name]
    metadata, _ = fixture(model_name)
    expected = json.loads(metadata["merged"])
    before = dict(model.state_dict())
    specs = [lora.LoraSpec(str(FIXTURES / f"{name}.safetensors"), te, unet) for name, te, unet in LORAS[model_name]]
    plans = lora.activate(model, specs)
    for plan in plans:  # every key used or reported
        used = {f"{p.layer}" for p in plan.patches}
        assert not plan.unmatched and used
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == set(expected)
    for key, (sha, _) in expected.items():
        assert digest(after[key]) == sha, key  # bit for bit: the same float32 ops in the same order
    lora.activate(model, [])
    restored = model.state_dict()
    # the loaded (file-backed) tensors themselves are back, never written into
    assert all(restored[k].data_ptr() == before[k].data_ptr() and torch.equal(restored[k], before[k]) for k in before)


def test_manifest_maps_onto_full_size_v1():
    """Every key of a real SD 1.5 LoCon file (354 modules) maps onto the model built on the meta device."""
    from ldm.config import load_config
    from ldm.models.latent_diffusion import build_model

    manifest = json.loads((ROOT / "tests/fixtures/manifests/sd15-kohya-locon-r4.keys.json").read_text())
    model = build_model(load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml"), device="meta")
    tensors = {k: torch.empty(shape, device="meta") for k, shape in manifest["keys"].items()}
    plan = lora.plan_lora(model, lora.LoraFile("sd15-locon.safetensors", tensors, {}, ""))
    assert not plan.unmatched
    targets = {p.source: f"{p.target} {list(lora._parameter(model, p.target).shape)}" for p in plan.patches}
    assert targets == manifest["target_module_weight"]
    assert sum(len(p.weights) for p in plan.patches) == len(manifest["keys"])


def tiny_lora(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_bad_loras_are_one_line_errors_or_warnings(models, tmp_path):
    model = models["v1"]
    # an SDXL file's keys (compvis-named UNet, two text encoders) on SD 1: none fits
    sdxl = tiny_lora(tmp_path / "sdxl.safetensors", {
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
        "lora_unet_label_emb_0_0.lora_down.weight": torch.zeros(4, 2816)})
    with pytest.raises(lora.LoraError, match="none of its 2 keys matches"):
        lora.activate(model, [lora.LoraSpec(sdxl)])
    tagged = tmp_path / "tagged.safetensors"
    save_file(load_file(FIXTURES / "lora_v1_extra.safetensors"), str(tagged),
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(lora.LoraError, match="an SDXL LoRA"):
        lora.activate(model, [lora.LoraSpec(str(tagged))])
    sd2 = tiny_lora(tmp_path / "wide.safetensors", {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1024),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4096, 4)})
    with pytest.raises(lora.LoraError, match="another architecture"):
        lora.activate(model, [lora.LoraSpec(sd2)])
    partial = dict(load_file(FIXTURES / "lora_v1_extra.safetensors"))
    partial["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 2)
    path = tiny_lora(tmp_path / "partial.safetensors", partial)
    with pytest.warns(UserWarning, match="1 of .* keys match no module"):
        lora.activate(model, [lora.LoraSpec(path)])
    lora.activate(model, [])
    assert lora.parse_lora_arg("C:/x/a.safetensors:0.5") == lora.LoraSpec("C:/x/a.safetensors", 0.5, 0.5)
    assert lora.parse_lora_arg("a:b.safetensors") == lora.LoraSpec("a:b.safetensors")


def load_file(path):
    from safetensors.torch import load_file as load

    return load(str(path))


# ---------------------------------------------------------------------------------- textual inversion
def test_embedding_files(models, tmp_path):
    pt = load_embedding(FIXTURES / "lightpen.pt")
    assert pt.name == "lightpen" and pt.vec.shape == (2, 32) and pt.vec.dtype == torch.float32
    assert load_embedding(FIXTURES / "lightpen_big.safetensors").vec.shape == (4, 32)  # fp16 file
    assert load_embedding(FIXTURES / "sparkle.bin").vec.shape == (1, 32)  # a diffusers concept [dim]
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(EmbeddingError, match="corrupt.pt"):
        load_embedding(bad)
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(wide))
    with pytest.raises(EmbeddingError, match="width 768 does not match the text encoder's 32"):
        load_embeddings([wide], models["v1"].cond_stage_model)


def test_plain_syntax_with_embedding_replaces_token_rows(models):
    """Plain syntax: BPE ids of the name -> the vectors, positions as usual, the sequence grows by n - len(ids)."""
    model = models["v1"]
    db = database(model)
    encoder = model.cond_stage_model
    with torch.no_grad():
        z = prompts.encode(encoder, ["a lightpen_big cube"], prompts.TextOptions("plain", 1, db))
        ids = torch.tensor([[49406, 320] + [0] * 4 + [11353, 49407] + [49407] * 69])
        embeds = encoder.token_embedding(ids)
        embeds[0, 2:6] = db.word_embeddings["lightpen_big"].vec
        expected = encoder.encode_embeds(ids, embeds)
    assert torch.equal(z, expected)
    # without embeddings the plain options are the original encoding, bit for bit
    with torch.no_grad():
        assert torch.equal(prompts.encode(encoder, ["a cube"], prompts.TextOptions("plain", 1, None)),
                           model.encode_text(["a cube"]))


# ---------------------------------------------------------------------------------------- end to end
def read_samples(outdir: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted((outdir / "samples").glob("*.png"))])


@pytest.mark.parametrize("model_name", list(MODELS))
def test_cli_matches_a1111_with_original_sampler(model_name, checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the recorded flags name files relative to the repository root
    config, ckpt = checkpoints[model_name]
    metadata, tensors = fixture(model_name)
    worst = {}
    for case in E2E:
        if f"argv.{case}" not in metadata:
            continue
        argv = json.loads(metadata[f"argv.{case}"])
        outdir = tmp_path / case
        cli.txt2img_main(argv + ["--config", str(config), "--ckpt", str(ckpt), "--outdir", str(outdir)])
        got, expected = read_samples(outdir), tensors[f"image.{case}"].numpy()
        assert got.shape == expected.shape, case
        worst[case] = int(np.abs(got.astype(np.int16) - expected.astype(np.int16)).max())
        info = png_info.parse_parameters(png_info.read_parameters(next((outdir / "samples").glob("*.png"))))
        assert info["Prompt syntax"] == "a1111" and "Lora hashes" in info
        if E2E[case][3] > 1:
            assert info["Clip skip"] == str(E2E[case][3])
    capsys.readouterr()
    print(f"{model_name}: max uint8 difference per case {worst}")
    # as tests/test_pipeline.py: float32 on both sides with other op orders, truncation to uint8
    assert max(worst.values()) <= 1, worst


def test_infotext_and_rerun_replay(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    config, ckpt = checkpoints["v1"]
    argv = ["--prompt", "<lora:lora_v1:0.6> a (lightpen:1.3) cube, sparkle", "--negative_prompt", "sparkle",
            "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--f", "2", "--H", "16", "--W", "16",
            "--device", "cpu", "--skip_grid", "--prompt_syntax", "a1111", "--lora_dir", "tests/fixtures/a1111",
            "--lora", "tests/fixtures/a1111/lora_v1_extra.safetensors:0.5", "--clip_skip", "2",
            "--embedding", "tests/fixtures/a1111/lightpen.pt", "--embedding", "tests/fixtures/a1111/sparkle.bin",
            "--config", str(config), "--ckpt", str(ckpt), "--outdir", str(tmp_path / "run")]
    cli.txt2img_main(argv)
    png = next((tmp_path / "run" / "samples").glob("*.png"))
    info = png_info.parse_parameters(png_info.read_parameters(png))
    hashes = {n: lora.read_lora(FIXTURES / f"{n}.safetensors").shorthash for n in ("lora_v1", "lora_v1_extra")}
    assert info["Lora hashes"] == f"lora_v1: {hashes['lora_v1']}, lora_v1_extra: {hashes['lora_v1_extra']}"
    ti = {n: load_embedding(FIXTURES / n).shorthash for n in ("lightpen.pt", "sparkle.bin")}
    # the prompt's embeddings, then the negative prompt's (A1111 appends them as it encodes)
    assert info["TI hashes"] == (f"lightpen: {ti['lightpen.pt']}, sparkle: {ti['sparkle.bin']}, "
                                 f"sparkle: {ti['sparkle.bin']}")
    assert info["Clip skip"] == "2" and info["Prompt syntax"] == "a1111"
    from ldm.cli.rerun import main as rerun_main

    capsys.readouterr()
    base = [str(png), "--config", str(config), "--ckpt", str(ckpt), "--device", "cpu", "--outdir",
            str(tmp_path / "again")]
    # the LoRA and embedding files are named by the user, never opened from the paths the PNG records
    with pytest.raises(SystemExit):
        rerun_main(base)
    assert "name them with --lora" in capsys.readouterr().err
    swapped = ["--lora", "tests/fixtures/a1111/lora_v1.safetensors", "--lora_dir", "tests/fixtures/a1111",
               "--embedding", "tests/fixtures/a1111/lightpen.pt", "--embedding", "tests/fixtures/a1111/sparkle.bin"]
    with pytest.raises(SystemExit):  # another LoRA file under the recorded name: its hash differs
        rerun_main(base + swapped)
    assert "Lora hashes" in capsys.readouterr().err
    rerun_main(base + ["--lora", "tests/fixtures/a1111/lora_v1_extra.safetensors"] + swapped[2:])
    assert "identical to" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--lora", "missing.safetensors"], "LoRA not found"),
    (["--prompt_syntax", "a1111", "--prompt", "<lora:nope> x", "--lora_dir", "tests/fixtures/a1111"], "no nope"),
    (["--prompt_syntax", "a1111", "--prompt", "<lora:lora_v1> x"], "needs a LoRA directory"),
    (["--lora_dir", "tests/fixtures/a1111"], "need --prompt_syntax a1111"),
    (["--embedding", "tests/fixtures/a1111/a1111.json"], "is a .pt, .bin or .safetensors"),
    (["--clip_skip", "0"], "at least 1"),
    (["--clip_skip", "3"], "exceeds the text encoder's 2 layers"),
])
def test_cli_bad_input_is_one_line(extra, message, checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    config, ckpt = checkpoints["v1"]
    with pytest.raises(SystemExit) as e:
        cli.txt2img_main(["--config", str(config), "--ckpt", str(ckpt), "--outdir", str(tmp_path / "o"),
                          "--device", "cpu", "--f", "2", "--H", "16", "--W", "16", "--ddim_steps", "1"] + extra)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("txt2img.py: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_clip_skip_is_ignored_for_sd2_with_a_warning(models):
    with pytest.warns(UserWarning, match="ignored for SD 2"):
        text = ldm.pipeline.text_options(models["v2"], "plain", 2)
    assert text is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ldm.pipeline.text_options(models["v1"], "plain", 1) is None


def test_lora_merge_cross_checked_with_diffusers():
    """diffusers' kohya loader + fuse_lora on the same file (tests/make_fixtures_lora_diffusers.py), module by
    module, as a norm and two probe inner products of each weight's delta. Where diffusers applies the file's
    alpha, the deltas agree to float32 rounding (rank-2 products summed in another order: measured <= 3e-7
    relative; 1e-5 bounds it). Where it does not, the difference is exactly that: ours / diffusers' = alpha / rank
    of the module, i.e. diffusers used a scale of 1 (it drops per-module alphas that differ from the first one
    of their group: peft's "alpha_pattern keys did not match" warning; diffusers #4668). A1111, the reference
    (test_lora_merge_matches_a1111), applies every alpha."""
    from make_fixtures_lora_diffusers import LORA, SCALE, summary

    reference = json.loads((FIXTURES / "lora_diffusers.json").read_text())
    model = tiny_model(tiny_config_path("tiny-v1-lora"), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = lora.load_plan(model, str(LORA))
    try:
        lora.activate(model, [lora.LoraSpec(str(LORA), SCALE, SCALE)])
        after = model.state_dict()
    finally:
        lora.activate(model, [])
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed == set(reference["modules"])  # the same 133 weights: the name maps agree
    alphas = {p.target: (float(p.weights["alpha"]) / p.weights["lora_down.weight"].shape[0]
                         if "alpha" in p.weights else 1.0) for p in plan.patches}
    agree, alpha_dropped = 0, 0
    for key in sorted(changed):
        ours, theirs = summary(key, after[key] - before[key]), reference["modules"][key]
        if max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-5 * theirs[0]:
            agree += 1
            continue
        ratio = alphas[key]
        assert ratio != 1.0, key  # a disagreement other than a dropped alpha
        assert all(abs(a - ratio * b) <= 1e-5 * ours[0] for a, b in zip(ours, theirs)), key
        alpha_dropped += 1
    print(f"diffusers agrees on {agree} of {len(changed)} weights; drops the alpha of {alpha_dropped}")
    assert agree >= 100 and agree + alpha_dropped == len(changed)
