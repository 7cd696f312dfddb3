"""Generate the text-encoder and tokenizer fixtures from the independent references.

Run from the repository root with the reference environment (it needs transformers; ldm is not imported):

    .venv-ref/bin/python tests/make_fixtures_text.py

Writes
- tests/fixtures/text_tokens.json: prompts and golden token ids in both conventions,
  "transformers" from transformers' CLIPTokenizer(truncation=True, max_length=77, padding="max_length")
  and "open_clip" from open_clip.tokenize, with truncation flags;
- tests/fixtures/text_clip.safetensors: tiny CLIPTextModel weights (transformers key layout under
  `transformer.`), the input ids, and transformers' CLIPTextModel outputs (last_hidden_state, pooler_output,
  all hidden_states; quick_gelu, plus last_hidden_state with hidden_act="gelu" from the same weights);
- tests/fixtures/text_openclip.safetensors: tiny open_clip text-tower weights (open_clip CLIP key layout under
  `model.`, vision tower deleted as the original FrozenOpenCLIPEmbedder does), the input ids, and the
  "penultimate" and "last" hidden states computed with open_clip's own modules.

Package versions are stored in every file ("versions"). No network: transformers' tokenizer is built from the
BPE merges bundled with open_clip (bpe_simple_vocab_16e6.txt.gz, the same table as the vocab.json/merges.txt of
openai/clip-vit-large-patch14), following the vocabulary layout of OpenAI CLIP's simple_tokenizer.py: 256 byte
symbols, the same with "</w>", the 48894 merges, then <|startoftext|> and <|endoftext|>.

transformers >= 5 has only the `tokenizers`-backed CLIPTokenizer, which does not run ftfy.fix_text; the slow
CLIPTokenizer that the original FrozenCLIPEmbedder used (transformers 4.19, models/clip/tokenization_clip.py
`_tokenize`: `whitespace_clean(ftfy.fix_text(text)).lower()`) did. For prompts that ftfy leaves unchanged both
agree; for the one prompt where ftfy changes the text (FTFY_PROMPT) the golden "transformers" ids are those of
the fast tokenizer applied to ftfy.fix_text(prompt), i.e. the slow tokenizer's order of operations.

Weights: one seeded CPU generator over the sorted (key, shape) list; matrices std 1/sqrt(last dim) (fan-in of
a Linear), 1-D norm weights 1 + 0.1 N(0, 1), biases and other 1-D / 0-D tensors 0.1 N(0, 1). The token
embedding (49408 rows) is stored only at the rows the fixture prompts use (`token_rows.ids`,
`token_rows.values`); the outputs depend on no other row.
"""

from __future__ import annotations

import gzip
import json
import math
from importlib import metadata
from pathlib import Path

import ftfy
import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PREFIX = "transformer.text_model."
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEED = 20240611
CONTEXT = 77

PROMPTS = [
    "",
    "a photograph of an astronaut riding a horse",
    "  A  Café\tscene:  naïve RÉSUMÉ — 3.14159, 100%!!  it's (ünïcödé) 🚀🌕...  ",
    # > 75 BPE tokens: both conventions must truncate and keep end-of-text last
    "a highly detailed oil painting of a lighthouse on a rocky cliff at sunset, dramatic clouds, crashing "
    "waves, seagulls, volumetric light, by a famous artist, trending on artstation, 8k, ultra realistic, "
    "intricate details, warm colors, golden hour, cinematic composition, masterpiece, award winning, "
    "sharp focus, wide angle lens, long exposure, soft shadows, misty atmosphere, reflections on wet rocks, "
    "distant sailing ship, rays of light through the clouds, highly detailed foam",
    # ftfy changes it (curly quotes, ligature, full-width letters): fast and slow transformers differ here
    "\u201cCurly\u201d quotes, a \ufb01ne \uff21\uff22\uff23",
    # contains '<', so ftfy keeps the entity; open_clip still unescapes it (html.unescape)
    "fish &amp; chips <b>bold</b>",
    # special tokens typed into a prompt: each convention recognises its own spelling
    "x <|endoftext|> y <end_of_text> z",
]
FTFY_PROMPT = 4

TINY_CLIP = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TINY_OPENCLIP = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3)
TINY_OPENCLIP_EMBED_DIM = 32


def versions() -> dict[str, str]:
    names = ["torch", "transformers", "tokenizers", "open_clip_torch", "ftfy", "regex", "safetensors"]
    return {name: metadata.version(name) for name in names}


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes of GPT-2/CLIP byte-level BPE, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    # printable bytes stand for themselves; the others are shifted to 256, 257, ... in byte order
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def reference_tokenizer() -> CLIPTokenizer:
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # first line is a header; CLIP uses 48894 merges
    symbols = byte_symbols()
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(words)}
    assert len(vocab) == 49408, len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    # transformers' own documentation example (CLIPModel docs, "a photo of a cat") as a check of the build
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    return tokenizer


def golden_tokens() -> dict:
    tokenizer = reference_tokenizer()
    out = {"transformers": {"ids": [], "truncated": []}, "open_clip": {"ids": [], "truncated": []}}
    for i, prompt in enumerate(PROMPTS):
        fixed = ftfy.fix_text(prompt)
        assert (fixed != prompt) == (i == FTFY_PROMPT), (i, prompt, fixed)
        text = fixed if i == FTFY_PROMPT else prompt
        ids = tokenizer(text, truncation=True, max_length=CONTEXT, padding="max_length").input_ids
        full = tokenizer(text).input_ids
        out["transformers"]["ids"].append(ids)
        out["transformers"]["truncated"].append(len(full) > CONTEXT)
        ids = open_clip.tokenize([prompt], context_length=CONTEXT)[0].tolist()
        # open_clip.tokenize does not report truncation; encode() is the body it truncates
        body = open_clip.tokenizer._tokenizer.encode(prompt)
        out["open_clip"]["ids"].append(ids)
        out["open_clip"]["truncated"].append(len(body) + 2 > CONTEXT)
    return out


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for key in sorted(shapes):
        shape = shapes[key]
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        norm = any(part in key for part in ("layer_norm", "ln_", "ln_final"))
        if len(shape) >= 2:
            x = x / math.sqrt(shape[-1])
        elif norm and key.endswith("weight"):
            x = 1 + 0.1 * x
        else:
            x = 0.1 * x
        weights[key] = x
    return weights


def store(path: Path, weights: dict[str, torch.Tensor], embedding_key: str, used_ids: list[int],
          tensors: dict[str, torch.Tensor], meta: dict) -> None:
    ids = torch.tensor(sorted(set(used_ids)), dtype=torch.int64)
    out = {f"weights.{k}": v.contiguous() for k, v in weights.items() if k != embedding_key}
    out["token_rows.ids"] = ids
    out["token_rows.values"] = weights[embedding_key][ids].contiguous()
    out.update({k: v.contiguous() for k, v in tensors.items()})
    save_file(out, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def clip_fixture(ids: torch.Tensor, meta: dict) -> None:
    outputs = {"input_ids": ids}
    weights = None
    for act in ("quick_gelu", "gelu"):
        config = CLIPTextConfig(**{**TINY_CLIP, "hidden_act": act}, attn_implementation="eager")
        model = CLIPTextModel(config).eval()
        assert model.config._attn_implementation == "eager"  # the literal softmax(q k^T + mask) reference
        if weights is None:
            # Keys as the SD v1 checkpoint stores them under cond_stage_model.: FrozenCLIPEmbedder's
            # `transformer` + transformers 4.x CLIPTextModel's `text_model.` (transformers 5 drops that level
            # from CLIPTextModel.state_dict() and maps old names on load).
            shapes = {f"{PREFIX}{k.removeprefix('text_model.')}": tuple(v.shape)
                      for k, v in model.state_dict().items()}
            weights = random_weights(shapes, SEED)
        inner = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
        model.load_state_dict({inner + k.removeprefix(PREFIX): v for k, v in weights.items()}, strict=True)
        with torch.no_grad():
            result = model(input_ids=ids, output_hidden_states=True)
        if act == "quick_gelu":
            outputs["last_hidden_state"] = result.last_hidden_state
            outputs["pooler_output"] = result.pooler_output
            outputs["hidden_states"] = torch.stack(result.hidden_states)
        else:
            outputs["last_hidden_state_gelu"] = result.last_hidden_state
    store(FIXTURES / "text_clip.safetensors", weights, f"{PREFIX}embeddings.token_embedding.weight",
          ids.flatten().tolist(), outputs, {**meta, "text_config": TINY_CLIP})


def openclip_fixture(ids: torch.Tensor, meta: dict) -> None:
    # a whole open_clip CLIP with a throwaway vision tower, then `del model.visual`, exactly the state the
    # original FrozenOpenCLIPEmbedder keeps (incl. text_projection and logit_scale)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    model = CLIP(TINY_OPENCLIP_EMBED_DIM, vision, CLIPTextCfg(**TINY_OPENCLIP), quick_gelu=False)
    del model.visual
    model.eval()
    shapes = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    weights = random_weights(shapes, SEED + 1)
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        last = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        # "penultimate": all residual blocks but the last (Stability-AI FrozenOpenCLIPEmbedder, layer_idx 1)
        h = x if model.transformer.batch_first else x.transpose(0, 1)
        for block in model.transformer.resblocks[:-1]:
            h = block(h, attn_mask=model.attn_mask)
        h = h if model.transformer.batch_first else h.transpose(0, 1)
        penultimate = model.ln_final(h)
    outputs = {"input_ids": ids, "penultimate": penultimate, "last": last}
    store(FIXTURES / "text_openclip.safetensors", weights, "model.token_embedding.weight", ids.flatten().tolist(),
          outputs, {**meta, "embed_dim": TINY_OPENCLIP_EMBED_DIM, "text_cfg": TINY_OPENCLIP})


def main() -> None:
    torch.manual_seed(0)  # nothing below should depend on it; set so that an accident is reproducible
    FIXTURES.mkdir(exist_ok=True)
    meta = {"generator": "tests/make_fixtures_text.py", "versions": versions(), "seed": SEED}
    tokens = golden_tokens()
    doc = {**meta, "context_length": CONTEXT, "prompts": PROMPTS, "ftfy_prompt": FTFY_PROMPT, **tokens}
    path = FIXTURES / "text_tokens.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    clip_fixture(torch.tensor(tokens["transformers"]["ids"]), meta)
    openclip_fixture(torch.tensor(tokens["open_clip"]["ids"]), meta)


if __name__ == "__main__":
    main()
