"""Rotary embedding (neox and GPT-J styles, partial rotary) against pure PyTorch."""

import pytest
import torch

from pagoda.kernels.rotary import apply_rotary


def cos_sin_cache(max_pos, rot_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def ref_rotary(positions, x, cache, is_neox):
    rot_dim = cache.shape[-1]
    cos, sin = cache[positions].chunk(2, dim=-1)  # [T, rot/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("h,hkv,d,rot", [(4, 2, 16, 16), (3, 1, 32, 16), (2, 2, 80, 80),
                                         (6, 3, 24, 12)])
def test_rotary(is_neox, h, hkv, d, rot):
    t = 9
    cache = cos_sin_cache(64, rot)
    positions = torch.randint(0, 64, (t,))
    q, k = torch.randn(t, h, d), torch.randn(t, hkv, d)
    want_q, want_k = ref_rotary(positions, q, cache, is_neox), ref_rotary(positions, k, cache,
                                                                          is_neox)
    out_q, out_k = apply_rotary(positions, q, k, cache, is_neox)
    assert out_q is q and out_k is k  # in place
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, want_k, atol=1e-5, rtol=1e-5)


def test_rotary_on_qkv_views():
    # q and k as strided 2-D slices of one fused qkv output, as the attention layer sees them
    t, h, hkv, d = 5, 4, 2, 16
    qkv = torch.randn(t, (h + 2 * hkv) * d)
    q, k = qkv[:, :h * d], qkv[:, h * d:(h + hkv) * d]
    cache = cos_sin_cache(32, d)
    positions = torch.arange(t) + 3
    want_q = ref_rotary(positions, q.reshape(t, h, d), cache, True)
    want_k = ref_rotary(positions, k.reshape(t, hkv, d), cache, True)
    v_before = qkv[:, (h + hkv) * d:].clone()
    apply_rotary(positions, q, k, cache, True, head_dim=d)
    torch.testing.assert_close(q.reshape(t, h, d), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.reshape(t, hkv, d), want_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (h + hkv) * d:], v_before)  # v untouched
