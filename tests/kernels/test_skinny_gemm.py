"""The skinny (decode-row) GEMM against torch.nn.functional.linear, under the interpreter."""

import pytest
import torch
import torch.nn.functional as F

from pagoda.kernels.skinny_gemm import add_linear, beats_cublas, skinny_gemm


@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (7, 40, 100), (16, 64, 256), (3, 33, 520)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear(m, n, k, with_bias):
    x, w = torch.randn(m, k), torch.randn(n, k)
    bias = torch.randn(n) if with_bias else None
    torch.testing.assert_close(skinny_gemm(x, w, bias), F.linear(x, w, bias),
                               atol=1e-4, rtol=1e-4)


def test_keeps_leading_dims_and_strided_rows():
    x = torch.randn(2, 3, 2 * 64)[..., ::2]  # a non-unit stride on K: copied first
    w = torch.randn(32, 64)
    out = skinny_gemm(x, w, config=dict(block_n=16, block_k=32, num_warps=4, num_stages=2))
    assert out.shape == (2, 3, 32)
    torch.testing.assert_close(out, F.linear(x, w), atol=1e-4, rtol=1e-4)


def test_zero_rows_and_too_many_rows():
    w = torch.randn(16, 32)
    assert skinny_gemm(torch.randn(0, 32), w).shape == (0, 16)
    with pytest.raises(ValueError):
        skinny_gemm(torch.randn(17, 32), w)


def test_dispatch_rule():
    bf16 = torch.bfloat16
    assert beats_cublas(1, 4096, 4096, bf16) and beats_cublas(16, 6144, 4096, torch.float16)
    assert not beats_cublas(17, 4096, 4096, bf16)  # prefill and big decode batches
    assert not beats_cublas(1, 28672, 4096, bf16)  # gate_up: cuBLAS is at the roofline
    assert beats_cublas(1, 128256, 4096, bf16)  # Llama-3.1-8B's LM head
    assert not beats_cublas(1, 151936, 1024, bf16)  # a narrow LM head was not measured
    assert not beats_cublas(1, 4096, 4096, torch.float32)


def test_dispatch_rule_all_shapes_for_ab_runs(monkeypatch):
    from pagoda.kernels import skinny_gemm
    monkeypatch.setattr(skinny_gemm, "_ALL_SHAPES", True)  # PAGODA_SKINNY_ALL=1
    assert beats_cublas(1, 28672, 4096, torch.bfloat16)
    assert not beats_cublas(17, 28672, 4096, torch.bfloat16)
    assert not beats_cublas(1, 28672, 4096, torch.float32)


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (5, 40, 100), (16, 32, 256)])
def test_add_linear_then_normalising_gemm(m, n, k):
    """The fused decoder layer's pair: o_proj adds into the residual stream and leaves its
    sums of squares; the next GEMM (with the norm weight folded into its own) normalises."""
    stream, delta = torch.randn(m, k) * 3, torch.randn(m, 24)
    w_o, w, g = torch.randn(k, 24) / 5, torch.randn(n, k), torch.rand(k) + 0.5
    bias_o, bias = torch.randn(k), torch.randn(n)
    new_stream = stream + F.linear(delta, w_o, bias_o)
    sums = add_linear(stream, delta, w_o, bias_o, config=dict(block_n=16, block_k=32,
                                                              num_warps=4, num_stages=2))
    torch.testing.assert_close(stream, new_stream, atol=1e-4, rtol=1e-4)  # in place
    assert sums.shape == (m, -(-k // 16))
    torch.testing.assert_close(sums.sum(1), new_stream.pow(2).sum(1), atol=1e-3, rtol=1e-4)
    want = F.linear(_rms_norm(new_stream, g, 1e-5), w, bias)
    got = skinny_gemm(stream, w * g, bias, square_sums=sums, eps=1e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act,ref", [("silu", F.silu), ("gelu", F.gelu),
                                     ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"))])
@pytest.mark.parametrize("with_norm", [False, True])
def test_gated_act_epilogue(act, ref, with_norm):
    m, d, k = 3, 40, 96
    x, w, g = torch.randn(m, k), torch.randn(2 * d, k), torch.rand(k) + 0.5
    bias = torch.randn(2 * d)
    if with_norm:  # x is the stream, given with its sums of squares in two parts
        sums = torch.stack([x[:, :50].pow(2).sum(1), x[:, 50:].pow(2).sum(1)], 1)
        gate, up = F.linear(_rms_norm(x, g, 1e-6), w, bias).split(d, dim=-1)
        got = skinny_gemm(x, w * g, bias, square_sums=sums.contiguous(), act=act)
    else:
        gate, up = F.linear(x, w, bias).split(d, dim=-1)
        got = skinny_gemm(x, w, bias, act=act)
    assert got.shape == (m, d)
    torch.testing.assert_close(got, ref(gate) * up, atol=1e-4, rtol=1e-4)


def test_fusion_arguments_are_checked():
    w = torch.randn(48, 64)
    with pytest.raises(ValueError):
        add_linear(torch.randn(2, 40), torch.randn(2, 64), w)
    with pytest.raises(ValueError):
        add_linear(torch.randn(48, 2).t(), torch.randn(2, 64), w)
    with pytest.raises(ValueError):
        skinny_gemm(torch.randn(2, 64), w, act="tanh")
    with pytest.raises(ValueError):
        skinny_gemm(torch.randn(2, 64), torch.randn(47, 64), act="silu")
    with pytest.raises(ValueError):
        skinny_gemm(torch.randn(2, 64), w, square_sums=torch.randn(3, 4))


def test_tile_overrides_for_ab_runs(monkeypatch):
    """PAGODA_SKINNY_TILES: tiles per weight shape, for A/B runs in the decode graph; the
    gated GEMM and add_linear (whose sums of squares count programs) follow the override."""
    from pagoda.kernels import skinny_gemm as sg
    tiles = sg._parse_tiles("96x64:16/32/3+ 64x96:32/64/2")
    assert tiles[(96, 64)] == dict(block_n=16, block_k=32, num_warps=4, num_stages=3)
    monkeypatch.setattr(sg, "_TILE_OVERRIDES", tiles)
    assert sg.choose_config(64, 96)["block_k"] == 64
    x, w = torch.randn(3, 64), torch.randn(96, 64)
    gate, up = (x @ w.T).split(48, dim=-1)
    got = sg.skinny_gemm(x, w, act="silu")
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, atol=1e-4, rtol=1e-4)
    stream, w_down = torch.randn(3, 64), torch.randn(64, 96)
    delta = torch.randn(3, 96)
    want = stream + delta @ w_down.T
    sums = sg.add_linear(stream, delta, w_down)
    torch.testing.assert_close(stream, want, atol=1e-4, rtol=1e-4)
    assert sums.shape == (3, 2)  # 64 columns in tiles of 32
    with pytest.raises(ValueError, match="NxK"):
        sg._parse_tiles("96x64:16/32")
