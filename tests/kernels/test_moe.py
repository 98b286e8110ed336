"""The fused Triton MoE (moe_align + grouped GEMMs) against the PyTorch `torch_moe`."""

import pytest
import torch

from pagoda.kernels import moe as moe_kernels
from pagoda.kernels.moe import fused_moe, moe_align
from pagoda.layers.activation import GeluAndMul, SiluAndMul
from pagoda.layers.moe import route, torch_moe


def make_case(tokens, experts, top_k, hidden, inter, renormalize=True, dead=()):
    """Random fp32 inputs; experts in `dead` get no tokens (their router logit is -inf)."""
    x = torch.randn(tokens, hidden)
    w13 = torch.randn(experts, 2 * inter, hidden) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter) / inter ** 0.5
    logits = torch.randn(tokens, experts) * 2
    logits[:, list(dead)] = float("-inf")
    weights, ids = route(logits, top_k, renormalize)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter,renormalize,dead", [
    (1, 8, 2, 32, 16, True, ()),            # a single decode token (Mixtral's routing)
    (9, 8, 2, 40, 24, False, (1, 5)),       # ragged H / 2I tiles, two experts idle, raw weights
    (13, 4, 1, 32, 16, True, ()),           # top_k = 1
    (5, 60, 4, 32, 16, False, ()),          # Qwen1.5-MoE's E: most experts get no token
    (3, 128, 8, 16, 8, True, ()),           # Qwen3-MoE's E and top_k, tiny dims
    (70, 8, 2, 32, 16, True, (0,)),         # ~20 rows per expert: the middle tile config
    (300, 4, 2, 16, 8, True, ()),           # ~150 rows per expert: the prefill tile config
])
def test_fused_moe_matches_torch_moe(tokens, experts, top_k, hidden, inter, renormalize, dead):
    x, w13, w2, weights, ids = make_case(tokens, experts, top_k, hidden, inter, renormalize,
                                         dead)
    act = SiluAndMul()
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, act),
                               torch_moe(x, w13, w2, weights, ids, act),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_moe_gelu(approximate):
    x, w13, w2, weights, ids = make_case(6, 8, 2, 32, 16)
    act = GeluAndMul(approximate)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, act),
                               torch_moe(x, w13, w2, weights, ids, act),
                               atol=1e-5, rtol=1e-5)


def test_fused_moe_fp16():
    """The half-precision path (the GPU's, less bf16: the interpreter's bf16 dot and its
    float -> bf16 rounding are not faithful) against fp32 on the same rounded inputs."""
    x, w13, w2, weights, ids = make_case(24, 8, 2, 64, 32)
    x, w13, w2 = x.half(), w13.half(), w2.half()
    out = fused_moe(x, w13, w2, weights, ids, SiluAndMul())
    ref = torch_moe(x.float(), w13.float(), w2.float(), weights, ids, SiluAndMul())
    assert out.dtype == torch.float16
    assert float((out.float() - ref).norm() / ref.norm()) < 3e-3


def test_fused_moe_no_tokens():
    x, w13, w2, weights, ids = make_case(0, 8, 2, 32, 16)
    assert fused_moe(x, w13, w2, weights, ids, SiluAndMul()).shape == (0, 32)


@pytest.mark.parametrize("align", ["kernel", "torch"])
def test_fused_moe_repeated_expert_in_a_token(align, monkeypatch):
    """A top-k never repeats an expert, but the kernel adds a repeat like torch_moe does."""
    if align == "torch":
        monkeypatch.setattr(moe_kernels, "_ALIGN_KERNEL_MAX_PAIRS", 0)
    x, w13, w2, weights, ids = make_case(11, 8, 3, 32, 16)
    ids[:, 2] = ids[:, 0]
    ids[3] = 5
    act = SiluAndMul()
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, act),
                               torch_moe(x, w13, w2, weights, ids, act),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens,experts,top_k,block_m,repeat", [
    (1, 8, 2, 16, False), (37, 6, 3, 4, False), (20, 128, 8, 16, False), (25, 8, 4, 4, True),
    (300, 60, 4, 16, False)])
def test_moe_align(tokens, experts, top_k, block_m, repeat, monkeypatch):
    """The one-program Triton align and the torch ops (large batches) agree exactly, and the
    layout is right: every pair once, one expert per block, groups padded to block_m."""
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    ids[: tokens // 2, 0] = 0  # a crowded expert spanning several blocks
    if repeat:
        ids[::3, 1] = ids[::3, 3]
    pairs = tokens * top_k
    monkeypatch.setattr(moe_kernels, "_ALIGN_KERNEL_MAX_PAIRS", 1 << 30)
    sorted_ids, expert_ids, num_padded = moe_align(ids, experts, block_m)
    monkeypatch.setattr(moe_kernels, "_ALIGN_KERNEL_MAX_PAIRS", 0)
    for got, want in zip(moe_align(ids, experts, block_m), (sorted_ids, expert_ids, num_padded)):
        assert torch.equal(got, want)
    n = int(num_padded)
    counts = torch.bincount(ids.flatten(), minlength=experts)
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert n <= sorted_ids.numel() == expert_ids.numel() * block_m
    assert torch.all(sorted_ids[n:] == pairs)
    used = sorted_ids[:n]
    real = used[used < pairs].long()
    assert torch.equal(real.sort().values, torch.arange(pairs))  # every pair exactly once
    flat = ids.flatten()
    for b in range(n // block_m):  # each block holds one expert's pairs, in token order
        block = sorted_ids[b * block_m:(b + 1) * block_m].long()
        block = block[block < pairs]
        assert len(block) > 0 and torch.all(flat[block] == expert_ids[b])
        assert torch.all(block[1:] > block[:-1])


@pytest.mark.parametrize("experts,top_k,max_tokens,want", [
    (128, 8, 8192, [1, 257, 1025]),  # Qwen3-30B-A3B
    (8, 2, 8192, [1, 65, 257]),      # Mixtral
    (128, 8, 512, [1, 257]),         # a step too short for the prefill tiles
    (60, 4, 16, [1]),
])
def test_warm_up_token_counts_reach_every_tile_config(experts, top_k, max_tokens, want):
    counts = moe_kernels.warm_up_token_counts(experts, top_k, max_tokens)
    assert counts == want
    configs = [moe_kernels._config(t * top_k, experts) for t in counts]
    assert len({c["BLOCK_M"] for c in configs}) == len(counts)  # each a different config
    for t, config in zip(counts[1:], configs[:-1]):  # and one token fewer, the previous one
        assert moe_kernels._config((t - 1) * top_k, experts) == config


def test_layer_warm_up_runs_each_tile_config(monkeypatch):
    """FusedExperts.warm_up calls the Triton MoE once per tile config (on CUDA; here the
    interpreter stands in, with the CUDA check patched)."""
    from pagoda.layers import moe as moe_layer
    experts = moe_layer.FusedExperts(4, 16, 8)
    for w in (experts.w13_weight, experts.w2_weight):
        w.data.normal_()
    seen = []

    def recording(x, w13, w2, weights, ids, act_fn):
        out = fused_moe(x, w13, w2, weights, ids, act_fn)
        seen.append((x.shape[0], moe_kernels._config(ids.numel(), 4)["BLOCK_M"]))
        assert torch.isfinite(out).all()
        return out

    monkeypatch.setattr(moe_layer, "fused_moe", recording)
    experts.warm_up(max_tokens=4096, top_k=2)
    assert not seen  # CPU weights: the CPU path compiles nothing
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(moe_layer.platform, "use_triton_kernels", lambda device: True)
    experts.warm_up(max_tokens=4096, top_k=2)
    assert seen == [(1, 16), (33, 32), (129, 64)]
