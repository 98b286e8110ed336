"""TritonBackend against TorchRefBackend (the oracle) on random batches that mix prefill,
chunked prefill over cached context, and decode."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from pagoda.attention.backend import CommonAttentionMetadata, Rotary, get_attention_backend
from pagoda.attention.backends.torch_ref import TorchRefBackend
from pagoda.attention.backends.triton import TritonBackend


@dataclass
class Layer:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: Optional[int] = None
    logits_soft_cap: Optional[float] = None
    alibi_slopes: Optional[torch.Tensor] = None


def make_layer(h, hkv, d, **kw) -> Layer:
    return Layer(h, hkv, d, 1.0 / math.sqrt(d), **kw)


def make_batch(seqs, block_size, num_blocks, pad_tokens=0, pad_reqs=0):
    """seqs: list of (context_len, query_len). Blocks are handed out in a random order so the
    block table is not the identity. Padding mimics a CUDA-graph batch: extra tokens with
    slot -1 and extra empty requests."""
    perm = torch.randperm(num_blocks).tolist()
    max_blocks = max(-(-(c + n) // block_size) for c, n in seqs)
    table = torch.zeros(len(seqs) + pad_reqs, max_blocks, dtype=torch.int32)
    slots, starts, lens = [], [0], []
    for i, (ctx, n) in enumerate(seqs):
        nblk = -(-(ctx + n) // block_size)
        ids = [perm.pop() for _ in range(nblk)]
        table[i, :nblk] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(ctx, ctx + n):
            slots.append(ids[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + n)
        lens.append(ctx + n)
    num_actual = starts[-1]
    slots += [-1] * pad_tokens
    starts += [num_actual] * pad_reqs
    lens += [0] * pad_reqs
    qsl = torch.tensor(starts, dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    return CommonAttentionMetadata(
        num_reqs=len(seqs) + pad_reqs, num_actual_tokens=num_actual,
        max_query_len=max(n for _, n in seqs), max_seq_len=max(c + n for c, n in seqs),
        query_start_loc=qsl, seq_lens=sl, block_table=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=qsl.clone(), seq_lens_cpu=sl.clone())


def run_both(layer, seqs, block_size=16, splits=None, pad_tokens=0, pad_reqs=0,
             with_cache=True, tile_n=16, rope=None, qk_norm=None):
    h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    num_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 3
    meta = make_batch(seqs, block_size, num_blocks, pad_tokens, pad_reqs)
    t = meta.num_actual_tokens + pad_tokens
    q, k, v = torch.randn(t, h, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    cache_ref = cache_tri = None
    if with_cache:
        # Cached context holds random values; every other slot is NaN, so reading any slot
        # outside a sequence's own keys would show up as NaN in the output.
        cache_ref = torch.full((2, num_blocks, block_size, hkv, d), float("nan"))
        flat = cache_ref.view(2, -1, hkv, d)
        for i, (ctx, _) in enumerate(seqs):
            pos = torch.arange(ctx)
            ctx_slots = meta.block_table[i, pos // block_size].long() * block_size + pos % block_size
            flat[:, ctx_slots] = torch.randn(2, ctx, hkv, d)
        cache_tri = cache_ref.clone()
    ref = TorchRefBackend()
    tri = TritonBackend(force_splits=splits, tile_n=tile_n)
    rotary = None
    if rope is not None:  # each token at its place after its sequence's context
        positions = torch.cat([torch.arange(c, c + n) for c, n in seqs]
                              + [torch.zeros(pad_tokens, dtype=torch.int64)])
        rotary = Rotary(rope, positions, *(qk_norm or (None, None)))
    out_ref = ref.forward(layer, q, k, v, cache_ref, ref.build_metadata(meta), rotary)
    # The Triton backend rotates q in place when it fuses the rotation into the KV write.
    out_tri = tri.forward(layer, q.clone(), k.clone(), v, cache_tri, tri.build_metadata(meta),
                          rotary)
    n = meta.num_actual_tokens
    torch.testing.assert_close(out_tri[:n], out_ref[:n], atol=2e-5, rtol=2e-5)
    if with_cache:
        # the fused q/k norms sum their squares in another order: fp32 rounding apart
        tol = 0 if qk_norm is None else 1e-5
        torch.testing.assert_close(cache_tri, cache_ref, atol=tol, rtol=tol, equal_nan=True)


MIX = [(0, 7), (5, 1), (19, 3), (0, 1), (33, 1)]  # prefill, decode, chunk with context...


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_mixed_batch_gqa(h, hkv):
    run_both(make_layer(h, hkv, 32), MIX)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_sizes(head_dim):
    run_both(make_layer(2, 1, head_dim), [(3, 5), (10, 1)])


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_block_sizes(block_size):
    run_both(make_layer(4, 2, 32), [(12, 4), (0, 9), (40, 1)], block_size=block_size)


def test_long_prefill_many_q_blocks():
    # more than one BLOCK_Q of queries in one sequence, with context, plus decodes; the
    # production key tile size (tile_n=None) too
    run_both(make_layer(2, 1, 16), [(20, 80), (70, 1), (0, 66)])
    run_both(make_layer(2, 1, 16), [(20, 80), (70, 1), (0, 66)], tile_n=None)


def test_decode_only_batch():
    run_both(make_layer(8, 2, 32), [(40, 1), (3, 1), (90, 1), (0, 1)])


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_kv(splits):
    run_both(make_layer(4, 2, 32), [(100, 1), (1, 1), (64, 1), (30, 3)], splits=splits)
    # 128-key tiles: 3, 6 and 2 tiles, so some sequences have fewer tiles than splits (the
    # splits past the last tile write no partial and the combine skips them) and the
    # 2-key one has one tile (its only split writes the output itself)
    run_both(make_layer(4, 2, 32), [(300, 1), (1, 1), (700, 1), (130, 1)], splits=splits)


def test_sliding_window():
    layer = make_layer(4, 2, 32, sliding_window=10)
    run_both(layer, [(50, 1), (30, 20), (0, 25), (3, 2)])
    run_both(layer, [(70, 1), (9, 1)], splits=3)


def test_soft_cap():
    layer = make_layer(4, 2, 32, logits_soft_cap=2.0)
    run_both(layer, MIX)


def test_alibi():
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / 4) for i in range(4)])
    run_both(make_layer(4, 2, 32, alibi_slopes=slopes), MIX)


def test_all_hooks_together_with_split():
    slopes = torch.rand(6) * 0.3
    layer = make_layer(6, 2, 32, alibi_slopes=slopes, sliding_window=17, logits_soft_cap=5.0)
    run_both(layer, [(60, 1), (2, 1), (40, 1)], splits=4)
    run_both(layer, [(20, 9), (0, 12)])


def test_cuda_graph_padding():
    # padded tokens (slot -1) and padded empty requests must be ignored
    run_both(make_layer(4, 2, 32), [(10, 1), (4, 1), (22, 1)], pad_tokens=5, pad_reqs=2)
    run_both(make_layer(4, 2, 32), [(10, 1), (30, 1)], pad_tokens=2, pad_reqs=2, splits=2)
    # as the graphs pad: one token per padded request, so the decode grid (a program per
    # sequence) runs, and padded requests have seq_len 0
    run_both(make_layer(4, 2, 32), [(10, 1), (4, 1), (22, 1)], pad_tokens=2, pad_reqs=2)
    run_both(make_layer(4, 2, 32), [(10, 1), (40, 1)], pad_tokens=3, pad_reqs=3, splits=4)


def record_decode_rope(monkeypatch) -> list:
    """The decode_rope argument of every paged_attention call the Triton backend makes."""
    import pagoda.attention.backends.triton as triton_backend
    calls, attend = [], triton_backend.paged_attention

    def recording(*args, **kwargs):
        calls.append(kwargs.get("decode_rope"))
        return attend(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "paged_attention", recording)
    return calls


@pytest.fixture(params=[False, True], ids=["kv-write", "in-attention"])
def attn_rope(request, monkeypatch):
    """Where decode steps rotate: the KV-write kernel, or (PAGODA_ATTN_ROPE=1) the attention
    kernel itself. Yields the list of decode_rope arguments attention was called with."""
    import pagoda.attention.backends.triton as triton_backend
    monkeypatch.setattr(triton_backend, "_ATTN_ROPE", request.param)
    calls = record_decode_rope(monkeypatch)
    yield calls
    if request.param:  # the decode batches below took the in-attention path
        assert any(call is not None for call in calls)


# decode batches as CUDA graphs pad them (as many padded tokens as padded sequences), with
# and without splits; with 16-key tiles, 3 splits give the new key to a middle split. The
# kernel's key loads skip the new key's slot (NaN here, as the cache before the write) and
# take its score and value from registers: the last case has the new key in a split's first
# tile (48 keys) and in a later one (60 keys: split 1 walks tiles 2 and 3)
DECODE_ROPE_CASES = [dict(seqs=[(10, 1), (30, 1), (4, 1)], pad_tokens=2, pad_reqs=2),
                     dict(seqs=[(40, 1), (7, 1)], splits=3),
                     dict(seqs=[(59, 1), (47, 1)], splits=2)]


@pytest.mark.parametrize("neox,rotary_dim", [(True, 32), (False, 32), (True, 16)])
def test_rotary_fused_into_kv_write(neox, rotary_dim, attn_rope):
    from types import SimpleNamespace
    from pagoda.layers.rotary import RotaryEmbedding
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), 32, rotary_dim, 64, neox)
    run_both(make_layer(4, 2, 32), MIX, rope=rope)  # prefill, chunks, decode: cache equal
    run_both(make_layer(4, 2, 32), [(10, 1), (30, 1)], pad_tokens=3, pad_reqs=1, rope=rope)
    run_both(make_layer(4, 2, 32), [(0, 9), (0, 3)], with_cache=False, rope=rope)
    for case in DECODE_ROPE_CASES:
        run_both(make_layer(4, 2, 32), rope=rope, **case)


def test_large_decode_batches_rotate_in_the_kv_write(monkeypatch):
    """Above _ATTN_ROPE_MAX_BATCH sequences the separate rotary + KV-write kernel runs (it
    is cheaper there); the results are the same either way."""
    from types import SimpleNamespace
    import pagoda.attention.backends.triton as triton_backend
    from pagoda.layers.rotary import RotaryEmbedding
    monkeypatch.setattr(triton_backend, "_ATTN_ROPE", True)
    monkeypatch.setattr(triton_backend, "_ATTN_ROPE_MAX_BATCH", 2)
    calls = record_decode_rope(monkeypatch)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), 32, 32, 64, True)
    run_both(make_layer(4, 2, 32), [(10, 1), (30, 1)], rope=rope)
    assert calls[-1] is not None  # two sequences: in the attention kernel
    run_both(make_layer(4, 2, 32), **DECODE_ROPE_CASES[0], rope=rope)
    assert calls[-1] is None  # three (plus padding): in the KV-write kernel


def test_qk_norm_fused_into_kv_write(attn_rope):
    """Qwen3's per-head q/k norms: fused into the KV write with the rotation (decode, chunks,
    padding), and applied unfused where the Triton backend cannot fuse them (no cache)."""
    from types import SimpleNamespace
    from pagoda.layers.layernorm import RMSNorm
    from pagoda.layers.rotary import RotaryEmbedding
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), 32, 32, 64, True)
    norms = (RMSNorm(32, 1e-6), RMSNorm(32, 1e-6))
    for norm in norms:
        norm.weight.copy_(torch.rand(32) + 0.5)
    run_both(make_layer(4, 2, 32), MIX, rope=rope, qk_norm=norms)
    run_both(make_layer(4, 2, 32), [(10, 1), (30, 1)], pad_tokens=3, pad_reqs=1, rope=rope,
             qk_norm=norms)
    run_both(make_layer(4, 2, 32), [(0, 9), (0, 3)], with_cache=False, rope=rope,
             qk_norm=norms)
    for case in DECODE_ROPE_CASES:
        run_both(make_layer(4, 2, 32), rope=rope, qk_norm=norms, **case)


def test_profiling_run_without_cache():
    run_both(make_layer(4, 2, 32), [(0, 9), (0, 1), (0, 20)], with_cache=False)


def test_registry_and_split_heuristic():
    backend = get_attention_backend("triton")
    assert backend.name == "triton"
    meta = make_batch([(4000, 1), (3000, 1)], 16, 500)
    meta.max_seq_len = 4001
    built = backend.build_metadata(meta)
    assert built.num_splits(num_kv_heads=1) == 4  # 2 programs on the 4-SM CPU fallback: split
    assert built.num_splits(num_kv_heads=8) == 1  # 16 programs already fill it
    meta_long = make_batch([(0, 9), (5, 1)], 16, 10)
    assert backend.build_metadata(meta_long).num_splits(8) == 1  # prefill: never split
    # a power of 2 (a compile-time constant): 3 by length becomes 2
    one = make_batch([(900, 1)], 16, 100)
    one.max_seq_len = 901
    assert backend.build_metadata(one).num_splits(num_kv_heads=1) == 2


@pytest.mark.parametrize("trial", range(3))
def test_random_mixes(trial):
    g = torch.Generator().manual_seed(100 + trial)
    hkv = [1, 2][trial % 2]
    h = hkv * [1, 3, 4][trial]
    seqs = []
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        kind = int(torch.randint(0, 3, (1,), generator=g))
        ctx = 0 if kind == 0 else int(torch.randint(1, 60, (1,), generator=g))
        n = 1 if kind == 2 else int(torch.randint(1, 20, (1,), generator=g))
        seqs.append((ctx, n))
    bs = [4, 16, 32][trial]
    run_both(make_layer(h, hkv, 32), seqs, block_size=bs)
