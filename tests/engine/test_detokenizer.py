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


def _final_text(tok, prompt_ids, ids, defer, skip_special=True):
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(
        skip_special_tokens=skip_special), defer=defer)
    text = "".join(detok.add_tokens([i]) for i in ids)
    return detok.full_text() if defer else text + detok.flush()


def test_deferred_decode_equals_the_stream(tiny_llama_path):
    """A final-only request decodes its ids once at the end; the text is the stream's, also
    for random ids (bytes that never complete a character), special tokens, and a prompt
    that ends inside a character (the prefix trick fails there and the stream is used)."""
    import random
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    rng = random.Random(0)
    emoji = tok.encode("🙂", add_special_tokens=False)
    prompts = [tok.encode("Prompt:"), [], emoji[:-1] if len(emoji) > 1 else emoji]
    outputs = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    outputs += [[rng.randrange(len(tok)) for _ in range(40)] for _ in range(20)]
    outputs += [[tok.bos_token_id, *outputs[0][:5], tok.eos_token_id]]
    for prompt in prompts:
        for ids in outputs:
            for skip in (True, False):
                streamed = _final_text(tok, prompt, ids, defer=False, skip_special=skip)
                assert _final_text(tok, prompt, ids, defer=True, skip_special=skip) == streamed


def test_deferred_text_so_far_then_the_rest(tiny_llama_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    ids = tok.encode(TEXTS[1], add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"), SamplingParams(), defer=True)
    assert detok.add_tokens(ids[:7]) == ""
    assert detok.full_text().startswith("zebra ")  # an abort asks for the text early
    detok.add_tokens(ids[7:])
    assert detok.full_text() == TEXTS[1]
