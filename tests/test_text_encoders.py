"""Text encoders: full-size key layout against the checkpoint manifests, tiny-config parity against
transformers' CLIPTextModel and open_clip's text tower (fixtures from tests/make_fixtures_text.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.config import (FROZEN_CLIP_EMBEDDER, FROZEN_OPENCLIP_EMBEDDER, CLIPTextConfig, OpenCLIPTextConfig,
                        TextEncoderConfig)
from ldm.models.clip_text import FrozenCLIPEmbedder
from ldm.models.openclip_text import FrozenOpenCLIPEmbedder
from manifests import load_manifest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PREFIX = "cond_stage_model."
CLIP_EMBEDDING = "transformer.text_model.embeddings.token_embedding.weight"
OPENCLIP_EMBEDDING = "model.token_embedding.weight"

# float32 on CPU. Our attention is one fused scaled_dot_product_attention call; transformers' eager reference
# scales q, adds a finfo.min causal mask and runs softmax/matmul separately, so sums are ordered differently:
# measured max |diff| 1.4e-6 on outputs of max |x| ~3 (relative 5e-7, a few float32 ulps through 2 layers).
# open_clip's nn.MultiheadAttention happens to reach the same kernel (measured 0). 1e-5 leaves ~10x headroom
# while any real error (a wrong activation, mask, scale, missing LayerNorm) is orders of magnitude larger.
TOL = dict(rtol=1e-5, atol=1e-5)


def _fixture(name: str, embedding_key: str) -> tuple[dict, dict, dict]:
    """(tensors, state_dict, metadata): the token embedding is rebuilt from the rows the prompts use."""
    path = FIXTURES / name
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    state = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
    rows, ids = tensors["token_rows.values"], tensors["token_rows.ids"]
    embedding = torch.zeros(49408, rows.shape[1])
    embedding[ids] = rows
    state[embedding_key] = embedding
    return tensors, state, meta


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return json.loads((FIXTURES / "text_tokens.json").read_text(encoding="utf-8"))["prompts"]


@pytest.fixture(scope="module")
def clip_fixture():
    return _fixture("text_clip.safetensors", CLIP_EMBEDDING)


@pytest.fixture(scope="module")
def openclip_fixture():
    return _fixture("text_openclip.safetensors", OPENCLIP_EMBEDDING)


def _clip(meta: dict, **kwargs) -> FrozenCLIPEmbedder:
    text_config = CLIPTextConfig(**meta["text_config"])
    if "hidden_act" in kwargs:
        text_config = dataclasses.replace(text_config, hidden_act=kwargs.pop("hidden_act"))
    return FrozenCLIPEmbedder(TextEncoderConfig(target=FROZEN_CLIP_EMBEDDER, text_config=text_config, **kwargs))


def _openclip(meta: dict, **kwargs) -> FrozenOpenCLIPEmbedder:
    return FrozenOpenCLIPEmbedder(TextEncoderConfig(target=FROZEN_OPENCLIP_EMBEDDER, embed_dim=meta["embed_dim"],
                                                    text_cfg=OpenCLIPTextConfig(**meta["text_cfg"]), **kwargs))


# ---------------------------------------------------------------------------------------------- key layout

@pytest.mark.parametrize("manifest, target, layer", [
    ("v1-inference", FROZEN_CLIP_EMBEDDER, "last"),
    ("v2-inference-v", FROZEN_OPENCLIP_EMBEDDER, "penultimate"),
])
def test_full_size_keys_match_checkpoint_manifest(manifest, target, layer):
    expected = {k.removeprefix(PREFIX): v for k, v in load_manifest(manifest).items() if k.startswith(PREFIX)}
    cls = FrozenOpenCLIPEmbedder if target == FROZEN_OPENCLIP_EMBEDDER else FrozenCLIPEmbedder
    with torch.device("meta"):  # default configs: CLIP ViT-L/14, OpenCLIP ViT-H/14
        model = cls(TextEncoderConfig(target=target, layer=layer))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if target == FROZEN_CLIP_EMBEDDER:
        # a buffer of transformers 4.x equal to arange(77); positions are implicit here, the loader ignores it
        assert expected.pop("transformer.text_model.embeddings.position_ids") == (1, 77)
    assert sorted(ours) == sorted(expected)
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}


def test_no_buffers_so_meta_build_plus_assign_is_complete(clip_fixture, openclip_fixture, prompts):
    # the loader builds on the meta device and assigns checkpoint tensors; any buffer would stay on meta
    for (tensors, state, meta), build, ref in [(clip_fixture, _clip, "last_hidden_state"),
                                               (openclip_fixture, _openclip, "penultimate")]:
        kwargs = {"layer": "penultimate"} if build is _openclip else {}
        with torch.device("meta"):
            model = build(meta, **kwargs)
        assert list(model.buffers()) == []
        model.load_state_dict(state, strict=True, assign=True)
        with torch.no_grad():
            torch.testing.assert_close(model.encode(prompts), tensors[ref], **TOL)


# -------------------------------------------------------------------------------- CLIP (SD v1) parity

@pytest.mark.parametrize("kwargs, reference", [
    (dict(layer="last"), lambda t: t["last_hidden_state"]),
    (dict(layer="last", hidden_act="gelu"), lambda t: t["last_hidden_state_gelu"]),
    (dict(layer="pooled"), lambda t: t["pooler_output"][:, None]),
    (dict(layer="hidden", layer_idx=0), lambda t: t["hidden_states"][0]),
    (dict(layer="hidden", layer_idx=1), lambda t: t["hidden_states"][1]),
    (dict(layer="hidden", layer_idx=-1), lambda t: t["hidden_states"][-1]),
    (dict(layer="hidden", layer_idx=-2), lambda t: t["hidden_states"][-2]),
], ids=["last", "last-gelu", "pooled", "hidden0", "hidden1", "hidden-1", "hidden-2"])
def test_clip_matches_transformers(clip_fixture, kwargs, reference):
    tensors, state, meta = clip_fixture
    model = _clip(meta, **kwargs)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(tensors["input_ids"])
    torch.testing.assert_close(out, reference(tensors), **TOL)


def test_clip_encode_tokenizes_like_the_original(clip_fixture, prompts):
    # reference ids came from transformers' CLIPTokenizer; here our tokenizer produces them from the prompts
    tensors, state, meta = clip_fixture
    model = _clip(meta)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.tokenize(prompts).ids, tensors["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode(prompts), tensors["last_hidden_state"], **TOL)


def test_clip_fixture_is_discriminating(clip_fixture):
    # the layer options must give clearly different references, or the parity tests above prove nothing
    tensors = clip_fixture[0]
    last = tensors["last_hidden_state"]
    for other in (tensors["last_hidden_state_gelu"], tensors["hidden_states"][-1]):
        assert (last - other).abs().max() > 1e-2


# --------------------------------------------------------------------------- OpenCLIP (SD v2) parity

@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_openclip_matches_open_clip(openclip_fixture, prompts, layer):
    tensors, state, meta = openclip_fixture
    model = _openclip(meta, layer=layer)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.tokenize(prompts).ids, tensors["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["input_ids"]), tensors[layer], **TOL)
        torch.testing.assert_close(model.encode(prompts), tensors[layer], **TOL)
    assert (tensors["penultimate"] - tensors["last"]).abs().max() > 1e-2


def test_openclip_projection_and_logit_scale_are_kept_but_unused(openclip_fixture):
    # kept as parameters so state_dict() equals the checkpoint's cond_stage_model.* keys; encode ignores them
    tensors, state, meta = openclip_fixture
    model = _openclip(meta, layer="penultimate")
    model.load_state_dict(state, strict=True)
    assert isinstance(model.model.text_projection, torch.nn.Parameter)
    assert model.model.logit_scale.shape == ()
    with torch.no_grad():
        before = model(tensors["input_ids"])
        model.model.text_projection.mul_(-3.0)
        model.model.logit_scale.fill_(123.0)
        assert torch.equal(model(tensors["input_ids"]), before)


# ----------------------------------------------------------------------------------- common behaviour

@pytest.mark.parametrize("freeze", [True, False])
def test_freeze(clip_fixture, openclip_fixture, freeze):
    for model in (_clip(clip_fixture[2], freeze=freeze), _openclip(openclip_fixture[2], freeze=freeze)):
        assert {p.requires_grad for p in model.parameters()} == {not freeze}


def test_encode_follows_module_device_and_dtype(clip_fixture, openclip_fixture):
    for model in (_clip(clip_fixture[2]), _openclip(openclip_fixture[2], layer="penultimate")):
        with torch.no_grad():
            out = model.to(torch.float64).encode(["a horse", ""])
        assert out.dtype == torch.float64 and out.shape == (2, 77, 32)
        assert model.to("meta").encode("a horse").device.type == "meta"  # ids are moved to the weights' device


@pytest.mark.parametrize("build, kwargs", [
    (_clip, dict(layer="penultimate")),
    (_clip, dict(layer="hidden", layer_idx=3)),  # 2 layers: valid indices are -2..2
    (_clip, dict(max_length=78)),
    (_openclip, dict(layer="hidden")),
])
def test_rejects_unsupported_settings(clip_fixture, openclip_fixture, build, kwargs):
    meta = (clip_fixture if build is _clip else openclip_fixture)[2]
    with pytest.raises(ValueError):
        build(meta, **kwargs)


def test_openclip_penultimate_with_one_block_runs_none(openclip_fixture, prompts):
    # Regression: Stability-AI FrozenOpenCLIPEmbedder.text_transformer_forward breaks at block
    # len(resblocks) - layer_idx, so "penultimate" on a one-block tower runs no block and returns
    # ln_final(token + positional embedding); it used to be refused. Also: "penultimate" of n blocks is "last"
    # of the first n - 1 blocks (same weights).
    _, state, meta = openclip_fixture
    layers = meta["text_cfg"]["layers"]
    for kept in (1, layers):
        cfg = dict(meta, text_cfg=dict(meta["text_cfg"], layers=kept))
        sub = {k: v for k, v in state.items()
               if ".resblocks." not in k or int(k.split(".resblocks.")[1].split(".")[0]) < kept}
        shorter = {k: v for k, v in sub.items()
                   if ".resblocks." not in k or int(k.split(".resblocks.")[1].split(".")[0]) < kept - 1}
        penultimate, last = _openclip(cfg, layer="penultimate"), _openclip(dict(cfg, text_cfg=dict(
            cfg["text_cfg"], layers=kept - 1)), layer="last")
        penultimate.load_state_dict(sub, strict=True)
        last.load_state_dict(shorter, strict=True)
        with torch.no_grad():
            out = penultimate.encode(prompts)
            assert torch.equal(out, last.encode(prompts))
            if kept == 1:
                tower = penultimate.model
                ids = penultimate.tokenize(prompts).ids
                expected = tower.ln_final(tower.token_embedding(ids) + tower.positional_embedding)
                assert torch.equal(out, expected)
