"""Tokenizer: golden ids from the reference tokenizers (tests/make_fixtures_text.py), truncation reporting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.models.tokenizer import EOT, PAD, SOT, encode, tokenize

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "text_tokens.json"
CONVENTIONS = ["transformers", "open_clip"]


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_golden_ids(golden, convention):
    # "transformers": transformers' CLIPTokenizer(truncation=True, max_length=77, padding="max_length"), as the
    # original FrozenCLIPEmbedder calls it (slow-tokenizer ftfy step included, see the generator);
    # "open_clip": open_clip.tokenize. Exact integer equality, per prompt for a readable failure.
    tokens = tokenize(golden["prompts"], golden["context_length"], convention=convention)
    assert tokens.ids.dtype == torch.int64
    assert tokens.ids.shape == (len(golden["prompts"]), golden["context_length"])
    for prompt, ids, expected in zip(golden["prompts"], tokens.ids.tolist(), golden[convention]["ids"]):
        assert ids == expected, prompt
    assert tokens.truncated == golden[convention]["truncated"]


def test_fixture_covers_the_differences(golden):
    # guards the fixture itself: the prompts must exercise padding, truncation and the cleaning differences
    v1, v2 = golden["transformers"], golden["open_clip"]
    assert any(v1["truncated"]) and not all(v1["truncated"])
    assert v1["ids"][0][:3] == [SOT, EOT, EOT] and v2["ids"][0][:3] == [SOT, EOT, 0]
    html, special = golden["prompts"].index("fish &amp; chips <b>bold</b>"), len(golden["prompts"]) - 1
    assert [i for i in v1["ids"][html] if i != EOT] != [i for i in v2["ids"][html] if i != 0]
    # "x <|endoftext|> y <end_of_text> z": each convention turns only its own spelling into an inline EOT
    assert v1["ids"][special][2] == EOT and v2["ids"][special][2] != EOT
    assert v2["ids"][special].count(EOT) == 2


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_truncation_keeps_end_token_and_reports_the_rest(golden, convention):
    prompts = golden["prompts"]
    tokens = tokenize(prompts, convention=convention)
    for prompt, ids, truncated, dropped in zip(prompts, tokens.ids.tolist(), tokens.truncated, tokens.dropped):
        body = encode(prompt, convention)
        assert truncated == (len(body) > 75)
        if truncated:
            assert ids == [SOT, *body[:75], EOT]
            assert dropped and encode(dropped, convention) == body[75:]
        else:
            assert ids[: len(body) + 2] == [SOT, *body, EOT]
            assert set(ids[len(body) + 2:]) <= {PAD[convention]}
            assert dropped == ""


def test_context_length_and_pad_id():
    tokens = tokenize("a photograph", context_length=6, pad_id=5)
    body = encode("a photograph")
    assert len(body) == 2
    assert tokens.ids.tolist() == [[SOT, *body, EOT, 5, 5]]
    tokens = tokenize(["a photograph of an astronaut"], context_length=4, convention="transformers")
    assert tokens.ids.tolist() == [[SOT, *encode("a photograph of an astronaut")[:2], EOT]]
    assert tokens.truncated == [True]


def test_single_string_is_a_batch_of_one():
    assert torch.equal(tokenize("a horse").ids, tokenize(["a horse"]).ids)
    assert tokenize([]).ids.shape == (0, 77)


@pytest.mark.parametrize("kwargs", [dict(convention="hf"), dict(context_length=1)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        tokenize("a horse", **kwargs)


@pytest.mark.parametrize("prompt, pieces", [
    ("!!<|endoftext|>", ["!!", EOT]),
    ("a,<|startoftext|>b", ["a,", SOT, "b"]),
    ("hello<|endoftext|>world", ["hello", EOT, "world"]),
    ("<|ENDOFTEXT|> x", [EOT, "x"]),  # no split (case-sensitive), then lower() and bpe()'s cache: still EOT
])
def test_transformers_splits_at_literal_special_tokens_first(prompt, pieces):
    # Regression: transformers' PreTrainedTokenizer.tokenize cuts the raw text at its special tokens before
    # CLIPTokenizer._tokenize cleans and splits each chunk, so punctuation glued to "<|endoftext|>" is its own
    # word; one regex pass over the whole prompt read "!!<|" as a punctuation run. (Checked against
    # transformers 5.23 CLIPTokenizer(ftfy.fix_text(prompt)) for the first three: [49406, 748, 49407, ...].)
    expected = [SOT] + [i for p in pieces for i in (encode(p, "transformers") if isinstance(p, str) else [p])]
    ids = tokenize(prompt, convention="transformers").ids[0].tolist()
    assert ids[: len(expected) + 1] == expected + [EOT]
