"""Every non-Llama family against `transformers`, float32 on the CPU (DESIGN.md, "Correctness
rule"): identical greedy ids and logprobs within 1e-4 for a batch of prompts of different
lengths, with the default engine, a small chunked-prefill budget, prefix caching off and a KV
pool small enough to force preemption."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from pagoda import LLM, SamplingParams
from tests.models.harness import check_run, hf_greedy, make_prompts
from tests.utils import make_model

MAX_NEW = 8
TOP = 5  # logprobs of the top 5 tokens are compared, not only the chosen one's
LENGTHS = (1, 5, 17, 40, 70)

# Tiny shapes every family shares; each family's factory renames them as its config wants.
TINY = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            bos_token_id=1, eos_token_id=0)


def _cfg(cls_name: str, arch: str, **kw):
    return getattr(transformers, cls_name)(**{**TINY, **kw, "architectures": [arch]})


FAMILIES = {
    "gpt_neox": lambda: _cfg("GPTNeoXConfig", "GPTNeoXForCausalLM", intermediate_size=128,
                             max_position_embeddings=128, rotary_pct=0.25),
    "gpt_neox-seq": lambda: _cfg("GPTNeoXConfig", "GPTNeoXForCausalLM", intermediate_size=96,
                                 max_position_embeddings=128, use_parallel_residual=False,
                                 rotary_pct=0.5, tie_word_embeddings=True),
    "gpt2": lambda: _cfg("GPT2Config", "GPT2LMHeadModel", n_positions=128),
    "gpt2-inv-layer": lambda: _cfg("GPT2Config", "GPT2LMHeadModel", n_positions=128,
                                   scale_attn_by_inverse_layer_idx=True,
                                   tie_word_embeddings=False),
    "gpt_bigcode-mqa": lambda: _cfg("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                                    n_positions=128, multi_query=True),
    "gpt_bigcode-mha": lambda: _cfg("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                                    n_positions=128, multi_query=False),
    "gptj": lambda: _cfg("GPTJConfig", "GPTJForCausalLM", n_positions=128, rotary_dim=8),
    "opt": lambda: _cfg("OPTConfig", "OPTForCausalLM", ffn_dim=128, word_embed_proj_dim=64,
                        max_position_embeddings=128, pad_token_id=2),
    "opt-postnorm-proj": lambda: _cfg("OPTConfig", "OPTForCausalLM", ffn_dim=128,
                                      word_embed_proj_dim=32, do_layer_norm_before=False,
                                      max_position_embeddings=128, pad_token_id=2),
    "bloom": lambda: _cfg("BloomConfig", "BloomForCausalLM"),
    "falcon-new": lambda: _cfg("FalconConfig", "FalconForCausalLM", new_decoder_architecture=True,
                               num_kv_heads=2, max_position_embeddings=128),
    "falcon-mqa": lambda: _cfg("FalconConfig", "FalconForCausalLM", multi_query=True,
                               parallel_attn=True, max_position_embeddings=128),
    "falcon-alibi-seq": lambda: _cfg("FalconConfig", "FalconForCausalLM", multi_query=False,
                                     parallel_attn=False, alibi=True, bias=True,
                                     max_position_embeddings=128),
    "phi": lambda: _cfg("PhiConfig", "PhiForCausalLM", intermediate_size=128,
                        max_position_embeddings=128, partial_rotary_factor=0.5),
    "gemma": lambda: _cfg("GemmaConfig", "GemmaForCausalLM", intermediate_size=128,
                          num_key_value_heads=1, head_dim=32, max_position_embeddings=128),
    "gemma2": lambda: _cfg("Gemma2Config", "Gemma2ForCausalLM", intermediate_size=128,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           sliding_window=12, query_pre_attn_scalar=24,
                           attn_logit_softcapping=20.0, final_logit_softcapping=30.0),
    "phi3": lambda: _cfg("Phi3Config", "Phi3ForCausalLM", intermediate_size=128,
                         num_key_value_heads=2, max_position_embeddings=128,
                         sliding_window=24, pad_token_id=2),
    "phi3-partial": lambda: _cfg("Phi3Config", "Phi3ForCausalLM", intermediate_size=128,
                                 max_position_embeddings=128, partial_rotary_factor=0.5,
                                 pad_token_id=2),
    # longrope with an original context of 8: prompts of 1 and 5 tokens cross it while
    # decoding (the engine recomputes them with the long factors, as transformers does),
    # longer prompts take the long factors from the start.
    "phi3-longrope": lambda: _cfg(
        "Phi3Config", "Phi3ForCausalLM", intermediate_size=128, max_position_embeddings=128,
        original_max_position_embeddings=8, pad_token_id=2,  # top level, as Phi-3's files
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [3.0 + 0.5 * i for i in range(8)]}),
    "mixtral": lambda: _cfg("MixtralConfig", "MixtralForCausalLM", intermediate_size=64,
                            num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2,
                            max_position_embeddings=128),
    "qwen2_moe": lambda: _cfg("Qwen2MoeConfig", "Qwen2MoeForCausalLM", intermediate_size=96,
                              moe_intermediate_size=32, shared_expert_intermediate_size=48,
                              num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                              num_key_value_heads=2, max_position_embeddings=128),
    "qwen3_moe": lambda: _cfg("Qwen3MoeConfig", "Qwen3MoeForCausalLM", intermediate_size=96,
                              moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                              norm_topk_prob=True, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=128),
}

# The "preempt" run costs the most; a subset of families covers the mechanism.
PREEMPT = {"gpt_neox", "gpt2", "opt", "bloom", "falcon-new", "gemma2", "mixtral",
           "phi3-longrope"}

ENGINE_SETTINGS = {
    "default": {},
    "chunked": {"max_num_batched_tokens": 16, "enable_prefix_caching": False},
    "preempt": {"num_gpu_blocks_override": 12, "block_size": 8, "max_model_len": 96},
}

CASES = [(f, s) for f in FAMILIES for s in ENGINE_SETTINGS if s != "preempt" or f in PREEMPT]


EAGER_REFERENCE = {"gemma2"}


def skip_if_reference_wrong(family: str) -> None:
    """transformers' own reference is wrong in one known case: before 5.24 (5.17 checked),
    Phi-3's generate() drops the KV cache at the longrope switch but still feeds only the
    last token, so that step sees no context (5.24 feeds the whole sequence; the engine
    matches 5.24). The H200's image has 5.17."""
    from packaging.version import Version
    if family == "phi3-longrope" and Version(transformers.__version__) < Version("5.24"):
        pytest.skip(f"transformers {transformers.__version__} mis-generates at the longrope "
                    "switch; 5.24 is the reference")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Family name -> (path, prompts, references), built once per family on first use."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            path = str(tmp_path_factory.mktemp(name))
            config = FAMILIES[name]()
            make_model(path, config)
            # Eager attention for soft-capped families: transformers 5.17 (the H200 image's)
            # gives Gemma 2 SDPA, which drops the attention soft cap; 5.24 forces eager.
            eager = {"attn_implementation": "eager"} if name in EAGER_REFERENCE else {}
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **eager)
            prompts = make_prompts(config.vocab_size, LENGTHS, shared=32)
            cache[name] = (path, prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts])
        return cache[name]

    return get


@pytest.mark.parametrize("family,setting", CASES)
def test_greedy_matches_transformers(checkpoints, family, setting):
    skip_if_reference_wrong(family)
    path, prompts, refs = checkpoints(family)
    llm = LLM(path, dtype="float32", seed=0, **ENGINE_SETTINGS[setting])
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=TOP, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    check_run(llm, refs, outputs, f"{family}/{setting}", setting)


def test_longrope_original_length_read_from_the_top_level():
    """Phi-3's config.json has original_max_position_embeddings beside rope_scaling, not in
    it; transformers 4.x leaves it there (5.x copies it in). Without it the scheduler would
    never restart a request that outgrows the original context."""
    from types import SimpleNamespace

    from pagoda.layers.rotary import longrope_original_len
    config = SimpleNamespace(original_max_position_embeddings=8, rope_theta=10000.0,
                             rope_scaling={"type": "longrope", "short_factor": [1.0] * 4,
                                           "long_factor": [2.0] * 4})
    assert longrope_original_len(config, max_model_len=128) == 8
    assert longrope_original_len(config, max_model_len=8) is None


def test_dense_moe_matches_torch_moe():
    """The graph-capturable GPU stopgap computes what the CPU's routed loop does."""
    from pagoda.layers.activation import SiluAndMul
    from pagoda.layers.moe import dense_moe, route, torch_moe
    gen = torch.Generator().manual_seed(0)
    x, w13 = torch.randn(11, 16, generator=gen), torch.randn(5, 24, 16, generator=gen)
    w2, logits = torch.randn(5, 16, 12, generator=gen), torch.randn(11, 5, generator=gen)
    weights, ids = route(logits, 2, renormalize=False)
    torch.testing.assert_close(dense_moe(x, w13, w2, weights, ids, SiluAndMul()),
                               torch_moe(x, w13, w2, weights, ids, SiluAndMul()))
