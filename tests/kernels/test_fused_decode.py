"""The fused decode path of the pre-norm layer (layers/fused_decode.py) against
`transformers`, on the CPU: PAGODA_FUSED_DECODE=force runs its skinny-GEMM kernels through
Triton's interpreter in fp32, for every step of at most 16 tokens."""

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.layers import decoder, fused_decode
from tests.models.harness import check_run, hf_greedy
from tests.models.test_families import checkpoints  # noqa: F401 (fixture)
from tests.utils import make_model, tiny_llama_config

MAX_NEW = 6


def _qwen2_config():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=False,
                       architectures=["Qwen2ForCausalLM"])  # q/k/v biases


@pytest.fixture
def count_fused(monkeypatch):
    monkeypatch.setattr(fused_decode, "MODE", "force")
    calls = []

    def counting(layer, positions, hidden, residual):
        calls.append(hidden.shape[0])
        return fused_decode.fused_forward(layer, positions, hidden, residual)

    monkeypatch.setattr(decoder, "fused_forward", counting)
    return calls


@pytest.mark.parametrize("make_config", [tiny_llama_config, _qwen2_config],
                         ids=["llama", "qwen2"])
def test_greedy_matches_transformers(tmp_path, count_fused, make_config):
    from transformers import AutoModelForCausalLM
    make_model(str(tmp_path), make_config())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    prompts = [[5, 9, 2], [7] * 30, [11, 3, 8, 250, 17]]
    refs = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    llm = LLM(str(tmp_path), dtype="float32", seed=0, enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=3, ignore_eos=True)
    # one request alone first: its 3-token prefill is fused too
    outputs = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    outputs += llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params,
                            use_tqdm=False)
    check_run(llm, refs, outputs, make_config.__name__, "fused")
    assert 3 in count_fused and 2 in count_fused  # a fused prefill and fused 2-row decodes
    assert max(count_fused) <= fused_decode.MAX_ROWS


# phi3-longrope: fused q/k/v and gate_up checkpoints, the longrope switch while decoding;
# qwen2_moe: a dense layer after a sparse one, so fused and unfused layers alternate.
@pytest.mark.parametrize("family", ["phi3-longrope", "qwen2_moe"])
def test_families_through_the_fused_path(checkpoints, count_fused, family):
    from tests.models.test_families import MAX_NEW as FAMILY_NEW, TOP, skip_if_reference_wrong
    skip_if_reference_wrong(family)
    path, prompts, refs = checkpoints(family)
    llm = LLM(path, dtype="float32", seed=0)
    params = SamplingParams(temperature=0, max_tokens=FAMILY_NEW, logprobs=TOP,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    check_run(llm, refs, outputs, f"{family}/fused", "fused")
    assert count_fused


@pytest.mark.parametrize("attn_rope", [False, True], ids=["kv-write", "in-attention"])
def test_qwen3_through_the_triton_backend(tmp_path, count_fused, monkeypatch, attn_rope):
    """Qwen3 with every decode kernel of the GPU path under the interpreter: the fused
    layer, the Triton attention backend, and its KV write applying the per-head q/k norms
    with the rotation (at decode, with PAGODA_ATTN_ROPE=1, the attention kernel's)."""
    from transformers import AutoModelForCausalLM
    from pagoda.attention.backends import triton as triton_backend
    from pagoda.kernels import kv_cache
    from tests.models.test_llama_family import FAMILIES
    monkeypatch.setenv("PAGODA_ATTENTION_BACKEND", "triton")
    monkeypatch.setattr(triton_backend, "_ATTN_ROPE", attn_rope)
    normed_writes = []

    def counting(*args):
        normed_writes.append(args[-1] is not None)
        return kv_cache.rope_and_write_kv(*args)

    monkeypatch.setattr("pagoda.attention.backends.triton.rope_and_write_kv", counting)
    make_model(str(tmp_path), FAMILIES["qwen3"]())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    prompts = [[5, 9, 2], [7] * 30, [11, 3, 8, 250, 17]]
    refs = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    llm = LLM(str(tmp_path), dtype="float32", seed=0, enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=3, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    check_run(llm, refs, outputs, "qwen3/triton", "fused")
    assert count_fused and normed_writes and all(normed_writes)


def test_only_plain_layers_fuse():
    from pagoda.models.gemma import GemmaForCausalLM  # RMSNorm with the 1 + weight offset
    from transformers import GemmaConfig
    config = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16)
    assert not fused_decode.fusable(GemmaForCausalLM(config, 64).model.layers[0])


def test_fold_norm_weights(monkeypatch):
    from pagoda.models.llama import LlamaForCausalLM
    model = LlamaForCausalLM(tiny_llama_config(), 64)
    layer = model.model.layers[0]
    assert fused_decode.fusable(layer)
    assert fused_decode.fold_norm_weights(model) == 0  # CPU, fp32: not by default
    assert not fused_decode.use_fused(layer, torch.zeros(2, 64))
    gamma = torch.rand(64) + 0.5
    layer.post_attention_layernorm.weight.data.copy_(gamma)
    layer.mlp.gate_up_proj.weight.data.normal_()  # the model was built with empty weights
    gate_up = layer.mlp.gate_up_proj.weight.detach().clone()
    monkeypatch.setattr(fused_decode, "MODE", "force")
    assert fused_decode.fold_norm_weights(model) == 2
    torch.testing.assert_close(layer.mlp.gate_up_proj.weight, gate_up * gamma)
    assert torch.equal(layer.post_attention_layernorm.weight, torch.ones(64))
    assert fused_decode.use_fused(layer, torch.zeros(16, 64))
    assert not fused_decode.use_fused(layer, torch.zeros(17, 64))  # prefill: unfused
