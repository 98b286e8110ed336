"""Incremental detokenization equals a full decode, also with characters split across
tokens; stop-string helpers."""

from __future__ import annotations

from transformers import AutoTokenizer

from pagoda.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from pagoda.sampling_params import SamplingParams

TEXTS = ["Unicode: café, naïve, 日本語, emoji 🙂🚀 and more.",
         "zebra 🦓 quokka ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", " leading spaces and\nnew lines\t tabs"]


def test_incremental_equals_full_decode(tiny_llama_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    for text in TEXTS:
        ids = tok.encode(text)
        split = any("\ufffd" in tok.decode([i]) for i in ids)
        detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"), SamplingParams())
        pieces = [detok.add_tokens([i]) for i in ids]
        assert "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)
        if "🙂" in text:
            assert split, "the emoji should be split across byte-level tokens"


def test_slow_path_matches(tiny_llama_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    ids = tok.encode(TEXTS[0])
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.stream = None  # force the decode-and-diff fallback
    assert "".join(detok.add_tokens([i]) for i in ids) == TEXTS[0]


def test_find_stop_string_spanning_new_text():
    assert find_stop_string("hello world", 5, ["lo w"], False) == ("lo w", 3)
    assert find_stop_string("hello world", 5, ["lo w"], True) == ("lo w", 7)
    assert find_stop_string("hello world", 4, ["lo w"], False) is None  # ended earlier
    assert find_stop_string("hello world", 2, ["hello"], False) is None
