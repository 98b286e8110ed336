"""The Triton kernels at real shapes in bf16 on CUDA against fp32 references.

Pass mark: relative error ||out - ref|| / ||ref|| under 1e-2 (bf16 operands land between 1e-3
and 1e-2); writes and sampled ids are compared exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from pagoda.attention.backends.torch_ref import TorchRefBackend  # noqa: E402
from tests.kernels.test_attention_backend import make_batch, make_layer  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return float((out - ref).norm() / ref.norm())


def meta_to(meta, device):
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        setattr(meta, name, getattr(meta, name).to(device))
    return meta


def attention_case(layer, seqs, block_size=16, splits=None, pad_tokens=0, pad_reqs=0):
    from pagoda.attention.backends.triton import TritonBackend
    h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    num_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 8
    meta = meta_to(make_batch(seqs, block_size, num_blocks, pad_tokens, pad_reqs), DEV)
    t = meta.num_actual_tokens + pad_tokens
    q = torch.randn(t, h, d, device=DEV, dtype=BF)
    k = torch.randn(t, hkv, d, device=DEV, dtype=BF)
    v = torch.randn(t, hkv, d, device=DEV, dtype=BF)
    cache = torch.randn(2, num_blocks, block_size, hkv, d, device=DEV, dtype=BF)
    # The fp32 oracle runs on the CPU: torch_ref builds its position tensors there.
    cache_ref = cache.float().cpu()
    ref = TorchRefBackend()
    meta_cpu = meta_to(copy.copy(meta), "cpu")
    layer_cpu = copy.copy(layer)
    if layer.alibi_slopes is not None:
        layer_cpu.alibi_slopes = layer.alibi_slopes.cpu()
    out_ref = ref.forward(layer_cpu, q.float().cpu(), k.float().cpu(), v.float().cpu(),
                          cache_ref, ref.build_metadata(meta_cpu))
    tri = TritonBackend(force_splits=splits)
    out = tri.forward(layer, q, k, v, cache, tri.build_metadata(meta))
    torch.cuda.synchronize()
    n = meta.num_actual_tokens
    assert torch.equal(cache.float().cpu(), cache_ref)
    err = rel_err(out[:n].cpu(), out_ref[:n])
    assert err < 1e-2, err
    return err


def random_seqs(n, max_ctx, max_q, decode_frac=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        ctx = int(torch.randint(0, max_ctx, (1,), generator=g))
        decode = float(torch.rand(1, generator=g)) < decode_frac
        seqs.append((ctx, 1 if decode else int(torch.randint(1, max_q, (1,), generator=g))))
    return seqs


@pytest.mark.parametrize("h,hkv,d", [(32, 8, 128), (32, 32, 128), (16, 1, 64), (20, 4, 80),
                                     (24, 8, 96), (16, 8, 256)])
def test_attention_mixed_batch(h, hkv, d):
    attention_case(make_layer(h, hkv, d), random_seqs(12, 1500, 300, seed=h + d))


@pytest.mark.parametrize("block_size", [16, 32])
def test_attention_decode_large_batch(block_size):
    attention_case(make_layer(32, 8, 128), [(c, 1) for c in range(37, 37 + 128 * 23, 23)],
                   block_size=block_size)


def test_attention_long_prefill():
    attention_case(make_layer(32, 8, 128), [(0, 2048), (1024, 1000)])


@pytest.mark.parametrize("splits", [None, 4, 16])
def test_attention_split_kv(splits):
    # 300 and 1000 keys: fewer 128-key tiles than 16 splits (the splits past the last
    # tile exit; the combine reads only those with tiles); 50: one tile, written directly
    attention_case(make_layer(32, 8, 128), [(8000, 1), (12000, 1), (50, 1), (300, 1),
                                            (1000, 1)], splits=splits)


def test_attention_window_softcap_alibi():
    gemma = make_layer(16, 8, 256, sliding_window=512, logits_soft_cap=50.0)
    attention_case(gemma, random_seqs(6, 2000, 700, seed=3))
    attention_case(gemma, [(3000, 1), (900, 1)], splits=8)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / 16) for i in range(16)], device=DEV)
    attention_case(make_layer(16, 16, 128, alibi_slopes=slopes), random_seqs(6, 1000, 300, seed=4))


def test_attention_cuda_graph_replay():
    """Capture write + attention for a padded decode batch, then replay with new contents."""
    from pagoda.attention.backends.triton import TritonBackend
    layer, bs, n_real, n_pad = make_layer(32, 8, 128), 16, 6, 8
    num_blocks = 600
    tri, ref = TritonBackend(), TorchRefBackend()
    static = None
    for trial in range(3):
        seqs = [(int(c), 1) for c in torch.randint(10, 500, (n_real,))]
        meta = meta_to(make_batch(seqs, bs, num_blocks, n_pad - n_real, n_pad - n_real), DEV)
        meta.block_table = torch.nn.functional.pad(meta.block_table, (0, 40 - meta.block_table.shape[1]))
        meta.max_seq_len = 512  # what the runner would pin for the captured size
        if static is None:
            static = meta
            q = torch.randn(n_pad, 32, 128, device=DEV, dtype=BF)
            k = torch.randn(n_pad, 8, 128, device=DEV, dtype=BF)
            v = torch.randn_like(k)
            cache = torch.randn(2, num_blocks, bs, 8, 128, device=DEV, dtype=BF)
            built = tri.build_metadata(static)
            tri.forward(layer, q, k, v, cache, built)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = tri.forward(layer, q, k, v, cache, built)
        else:
            for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
                getattr(static, name).copy_(getattr(meta, name))
            static.query_start_loc_cpu, static.seq_lens_cpu = meta.query_start_loc_cpu, meta.seq_lens_cpu
            for x in (q, k, v):
                x.copy_(torch.randn_like(x))
        cache_ref = cache.float()
        graph.replay()
        out_ref = ref.forward(layer, q.float(), k.float(), v.float(), cache_ref,
                              ref.build_metadata(static))
        torch.cuda.synchronize()
        assert rel_err(out[:n_real], out_ref[:n_real]) < 1e-2


def test_rms_norms():
    from pagoda.kernels.layernorm import fused_add_rms_norm, rms_norm
    x = torch.randn(4096, 4096, device=DEV, dtype=BF)
    res = torch.randn_like(x)
    w = (torch.rand(4096, device=DEV) + 0.5).to(BF)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    assert rel_err(rms_norm(x, w, 1e-6), ref) < 1e-2
    s = x.float() + res.float()
    ref2 = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    out, new_res = fused_add_rms_norm(x, res, w, 1e-6)
    assert rel_err(new_res, s) < 1e-2 and rel_err(out, ref2) < 1e-2


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary(is_neox):
    from pagoda.kernels.rotary import apply_rotary
    from tests.kernels.test_rotary import cos_sin_cache, ref_rotary
    t, h, hkv, d = 2048, 32, 8, 128
    cache = cos_sin_cache(8192, d).to(DEV)
    pos = torch.randint(0, 8192, (t,), device=DEV)
    q = torch.randn(t, h, d, device=DEV, dtype=BF)
    k = torch.randn(t, hkv, d, device=DEV, dtype=BF)
    want_q, want_k = ref_rotary(pos, q.float(), cache, is_neox), ref_rotary(pos, k.float(), cache,
                                                                            is_neox)
    apply_rotary(pos, q, k, cache, is_neox)
    assert rel_err(q, want_q) < 1e-2 and rel_err(k, want_k) < 1e-2


def test_activations():
    from pagoda.kernels.activation import gelu_and_mul, silu_and_mul
    x = torch.randn(1024, 2 * 14336, device=DEV, dtype=BF)
    g, u = x[:, :14336].float(), x[:, 14336:].float()
    assert rel_err(silu_and_mul(x), torch.nn.functional.silu(g) * u) < 1e-2
    for approx in ("none", "tanh"):
        want = torch.nn.functional.gelu(g, approximate=approx) * u
        assert rel_err(gelu_and_mul(x, approx), want) < 1e-2


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336), (1024, 2048),
                                 (1000, 3000), (128256, 4096)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_skinny_gemm(m, n, k):
    from pagoda.kernels.skinny_gemm import skinny_gemm
    x = torch.randn(m, k, device=DEV, dtype=BF)
    w = torch.randn(n, k, device=DEV, dtype=BF) / k ** 0.5
    bias = torch.randn(n, device=DEV, dtype=BF)
    ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    assert rel_err(skinny_gemm(x, w, bias), ref) < 1e-2


@pytest.mark.parametrize("m", [1, 5, 16])
def test_skinny_gemm_fusions(m):
    """The fused decode layer's GEMMs at Llama-3.1-8B shapes: down_proj adding into the
    stream (in place) with its sums of squares, then q/k/v and gate_up (+ SiLU-and-mul)
    normalising through those sums with the norm weight folded in."""
    from pagoda.kernels.skinny_gemm import add_linear, skinny_gemm
    F = torch.nn.functional
    stream = torch.randn(m, 4096, device=DEV, dtype=BF) * 4
    act = torch.randn(m, 14336, device=DEV, dtype=BF)
    w_down = torch.randn(4096, 14336, device=DEV, dtype=BF) / 128
    want = stream.float() + F.linear(act.float(), w_down.float())
    sums = add_linear(stream, act, w_down)
    assert rel_err(stream, want) < 1e-2
    assert rel_err(sums.sum(1), stream.float().pow(2).sum(1)) < 1e-3
    g = torch.rand(4096, device=DEV, dtype=BF) + 0.5
    normed = F.rms_norm(stream.float(), (4096,), g.float(), 1e-5)
    w_qkv = torch.randn(6144, 4096, device=DEV, dtype=BF) / 64
    got = skinny_gemm(stream, (w_qkv * g).to(BF), square_sums=sums, eps=1e-5)
    assert rel_err(got, F.linear(normed, w_qkv.float())) < 1e-2
    w_gu = torch.randn(2 * 14336, 4096, device=DEV, dtype=BF) / 64
    gate, up = F.linear(normed, w_gu.float()).split(14336, dim=-1)
    got = skinny_gemm(stream, (w_gu * g).to(BF), square_sums=sums, eps=1e-5, act="silu")
    assert rel_err(got, F.silu(gate) * up) < 1e-2


def test_plain_sampling_noise_in_kernel():
    """The plain sampler's Philox noise at a real vocabulary and batch: bf16 logits, and the
    draws of 8192 rows over a 16-token softmax within 1.5% of its probabilities."""
    from pagoda.kernels.sampling import sample_plain
    logits = torch.full((8192, 128256), -30.0, device=DEV, dtype=BF)
    logits[:, :16] = torch.linspace(2.0, -2.0, 16, device=DEV, dtype=BF)
    temp = torch.full((8192,), 0.7, device=DEV)
    got = sample_plain(logits, temp, None, seed=7)
    freq = torch.bincount(got, minlength=128256)[:16].float() / 8192
    want = torch.softmax(logits[0, :16].float() / 0.7, -1)
    assert (freq - want).abs().max() < 0.015
    assert torch.equal(sample_plain(logits, temp, None, seed=7), got)


def test_copy_first_slot_beyond_32_bit_offsets():
    """The lookahead's KV move on a cache of more than 2^31 elements (Llama-3.1-8B's layer
    shape, 2100 blocks), where the last planes' offsets need 64-bit arithmetic: slot 0 of
    each source block lands in its destination block in every layer; nothing else moves."""
    from pagoda.kernels.kv_cache import copy_first_slot
    kv_all = torch.randn(32, 2, 2100, 16, 8, 128, device=DEV, dtype=BF)
    assert kv_all.numel() > 2**31
    src = torch.tensor([2099, 7, 1500], device=DEV)
    dst = torch.tensor([0, 2098, 1024], device=DEV)
    want = kv_all.clone()
    want[:, :, dst, 0] = kv_all[:, :, src, 0]
    copy_first_slot(kv_all, src, dst)
    assert torch.equal(kv_all, want)


def test_plain_sampler_compiles_once_for_every_batch():
    """Batch sizes pick different vocabulary chunks and every step a new seed; neither may
    compile a new kernel variant mid-run (the H200 P4 run lost ~3 s to that)."""
    from pagoda.kernels import sampling
    counts = []
    for rows in (1, 3, 16, 64, 256, 300):
        logits = torch.randn(rows, 151936, device=DEV, dtype=BF)
        temp = torch.full((rows,), 0.6, device=DEV)
        sampling.sample_plain(logits, temp, None, seed=rows * 7919 + 16)
        counts.append(tuple(len(kernel.device_caches[torch.cuda.current_device()][0])
                            for kernel in (sampling._chunk_best_kernel,
                                           sampling._pick_chunk_kernel)))
    assert counts[-1] == counts[0], counts


def test_sampling_real_vocab():
    from pagoda.kernels.sampling import sample
    from tests.kernels.test_sampling import ref_sample
    b, v = 64, 128256
    logits = torch.randn(b, v, device=DEV) * 4
    temp = torch.rand(b, device=DEV) + 0.3
    temp[:8] = 0.0
    top_k = torch.randint(0, 100, (b,), device=DEV, dtype=torch.int32)
    top_p = torch.where(torch.rand(b, device=DEV) < 0.5, torch.rand(b, device=DEV) * 0.5 + 0.5,
                        torch.ones(b, device=DEV))
    min_p = torch.where(torch.rand(b, device=DEV) < 0.3, torch.full((b,), 0.05, device=DEV),
                        torch.zeros(b, device=DEV))
    q = torch.empty(b, v, device=DEV).exponential_()
    got = sample(logits, temp, top_k, top_p, min_p, q).cpu()
    want = ref_sample(logits, temp, top_k, top_p, min_p, q).cpu()
    assert (got != want).sum() <= 1, (got, want)  # fp32 vs fp64 top-p mass at a boundary


@pytest.mark.parametrize("b", [1, 64])
def test_plain_sampling_real_vocab(b):
    from pagoda.kernels.sampling import sample_plain
    v = 128256
    logits = torch.randn(b, v, device=DEV) * 4
    temp = torch.rand(b, device=DEV) + 0.3
    temp[: b // 8] = 0.0
    q = torch.empty(b, v, device=DEV).exponential_()
    inv_temp = 1.0 / torch.where(temp < 1e-5, 1.0, temp)
    drawn = (logits * inv_temp[:, None] - q.log()).argmax(-1)
    want = torch.where(temp < 1e-5, logits.argmax(-1), drawn)
    # The kernel's log may differ from torch's in the last bit: allow one near-tie flip.
    assert (sample_plain(logits, temp, q) != want).sum() <= 1
    assert torch.equal(sample_plain(logits, torch.zeros(b, device=DEV), None), logits.argmax(-1))


@pytest.mark.parametrize("splits,qk_norm", [(None, False), (8, False), (None, True)])
def test_rotation_inside_decode_attention(monkeypatch, splits, qk_norm):
    """PAGODA_ATTN_ROPE=1 at Llama-3.1-8B decode shapes in bf16: the attention kernel
    rotates q, and this step's k into the cache, with the same cache bits and output as the
    KV-write kernel's rotation (graph-padded batch, long contexts split over programs)."""
    from types import SimpleNamespace
    from pagoda.attention.backend import Rotary
    from pagoda.attention.backends import triton as triton_backend
    from pagoda.layers.layernorm import RMSNorm
    from pagoda.layers.rotary import RotaryEmbedding
    layer, block_size = make_layer(32, 8, 128), 16
    seqs = [(1000, 1), (37, 1), (3000, 1), (5, 1)]
    num_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 8
    meta = meta_to(make_batch(seqs, block_size, num_blocks, 4, 4), DEV)
    q = torch.randn(8, 32, 128, device=DEV, dtype=BF)
    k, v = (torch.randn(8, 8, 128, device=DEV, dtype=BF) for _ in range(2))
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=500000.0), 128, 128, 4096, True).to(DEV)
    norms = None
    if qk_norm:
        norms = (RMSNorm(128, 1e-6).to(DEV, BF), RMSNorm(128, 1e-6).to(DEV, BF))
        for norm in norms:
            norm.weight.copy_(torch.rand(128) + 0.5)
    positions = torch.tensor([c for c, _ in seqs] + [0] * 4, device=DEV)
    cache = torch.randn(2, num_blocks, block_size, 8, 128, device=DEV, dtype=BF)
    results = []
    for in_attention in (False, True):
        monkeypatch.setattr(triton_backend, "_ATTN_ROPE", in_attention)
        tri = triton_backend.TritonBackend(force_splits=splits)
        c = cache.clone()
        out = tri.forward(layer, q.clone(), k, v, c, tri.build_metadata(meta),
                          Rotary(rope, positions, *(norms or (None, None))))
        results.append((out[:4], c))
    torch.cuda.synchronize()
    (out_a, cache_a), (out_b, cache_b) = results
    written = meta.slot_mapping[:4]  # the same math in two kernels: equal up to fp32 rounding
    flat_a, flat_b = cache_a.view(2, -1, 8, 128), cache_b.view(2, -1, 8, 128)
    assert rel_err(flat_b[:, written], flat_a[:, written]) < 1e-3
    flat_a[:, written] = flat_b[:, written]
    assert torch.equal(cache_a, cache_b)  # and nothing else written
    assert rel_err(out_b, out_a) < 1e-3
