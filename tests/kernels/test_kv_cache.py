"""KV-cache write against torch_ref.write_kv_cache, with padding slots (-1) skipped."""

import pytest
import torch

from pagoda.attention.backends.torch_ref import write_kv_cache as ref_write
from pagoda.kernels.kv_cache import write_kv_cache


@pytest.mark.parametrize("block_size,hkv,d", [(16, 2, 32), (4, 3, 80), (1, 1, 64)])
def test_write_kv_cache(block_size, hkv, d):
    num_blocks, t = 12, 11
    cache = torch.randn(2, num_blocks, block_size, hkv, d)
    want = cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:t]
    k, v = torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    ref_write(k, v, want, slots)
    padded = torch.cat([slots, torch.full((3,), -1)])  # CUDA-graph padding tokens
    kp, vp = torch.cat([k, torch.randn(3, hkv, d)]), torch.cat([v, torch.randn(3, hkv, d)])
    write_kv_cache(kp, vp, cache, padded)
    assert torch.equal(cache, want)


def test_write_from_strided_views():
    qkv = torch.randn(5, 3, 2, 16)  # [T, (q,k,v), Hkv, D]
    k, v = qkv[:, 1], qkv[:, 2]
    cache = torch.zeros(2, 2, 8, 2, 16)
    want = cache.clone()
    slots = torch.tensor([3, 0, 9, 15, 4])
    ref_write(k, v, want, slots)
    write_kv_cache(k, v, cache, slots)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rot_dim", [32, 16])  # full and partial rotary
def test_rope_and_write_matches_rotary_then_write(neox, rot_dim):
    from pagoda.kernels.kv_cache import rope_and_write_kv
    from pagoda.kernels.rotary import apply_rotary
    t, h, hkv, d = 5, 4, 2, 32
    q, k, v = torch.randn(t, h, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    positions, cos_sin = torch.tensor([0, 3, 7, 1, 20]), torch.randn(64, rot_dim)
    slots = torch.tensor([0, 5, -1, 9, 23])  # one padding token
    want_cache, cache = torch.zeros(2, 6, 4, hkv, d), torch.zeros(2, 6, 4, hkv, d)
    want_q, want_k = q.clone(), k.clone()
    apply_rotary(positions, want_q, want_k, cos_sin, neox)
    write_kv_cache(want_k, v, want_cache, slots)
    got_q, k_in = q.clone(), k.clone()
    rope_and_write_kv(positions, got_q, k_in, v, cos_sin, neox, cache, slots)
    assert torch.equal(got_q, want_q) and torch.equal(cache, want_cache)
    assert torch.equal(k_in, k)  # k itself is not rotated: the cache holds the rotated keys


@pytest.mark.parametrize("neox", [True, False])
def test_rope_and_write_with_qk_norm(neox):
    """Qwen3's per-head q/k RMSNorms applied in the same kernel: as the norm module, then
    the rotary kernel, then the cache write."""
    from pagoda.kernels.kv_cache import rope_and_write_kv
    from pagoda.kernels.rotary import apply_rotary
    from pagoda.layers.layernorm import RMSNorm
    t, h, hkv, d = 5, 4, 2, 32
    qkv = torch.randn(t, (h + 2 * hkv) * d) * 3  # strided views, as out of the projection
    q, k, v = (x.view(t, -1, d) for x in qkv.split([h * d, hkv * d, hkv * d], dim=-1))
    q_norm, k_norm = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
    q_norm.weight.copy_(torch.rand(d) + 0.5)
    k_norm.weight.copy_(torch.rand(d) + 0.5)
    positions, cos_sin = torch.tensor([0, 3, 7, 1, 20]), torch.randn(64, d)
    slots = torch.tensor([0, 5, -1, 9, 23])
    want_cache, cache = torch.zeros(2, 6, 4, hkv, d), torch.zeros(2, 6, 4, hkv, d)
    want_q, want_k = q_norm(q.contiguous()), k_norm(k.contiguous())
    apply_rotary(positions, want_q, want_k, cos_sin, neox)
    write_kv_cache(want_k, v, want_cache, slots)
    k_before = k.clone()
    rope_and_write_kv(positions, q, k, v, cos_sin, neox, cache, slots,
                      (q_norm.weight, k_norm.weight, 1e-6))
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache, want_cache, atol=1e-5, rtol=1e-5)
    assert torch.equal(k, k_before)


@pytest.mark.parametrize("heads,dim", [(2, 16), (3, 80), (16, 128)])  # 2048: two passes
def test_copy_first_slot(heads, dim):
    """The lookahead's KV move out of scratch blocks: slot 0 of each source block lands in
    its destination block in every layer's k and v; nothing else changes."""
    from pagoda.kernels.kv_cache import copy_first_slot
    kv_all = torch.randn(3, 2, 10, 4, heads, dim)
    want = kv_all.clone()
    src, dst = torch.tensor([8, 9, 1]), torch.tensor([2, 5, 7])
    want[:, :, dst, 0] = kv_all[:, :, src, 0]
    copy_first_slot(kv_all, src, dst)
    torch.testing.assert_close(kv_all, want, rtol=0, atol=0)
