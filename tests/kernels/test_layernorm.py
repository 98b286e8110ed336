"""rms_norm / fused_add_rms_norm against the HF-style PyTorch formula."""

import pytest
import torch

from pagoda.kernels.layernorm import fused_add_rms_norm, rms_norm


def ref_rms_norm(x, weight, eps):
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


@pytest.mark.parametrize("shape", [(1, 8), (5, 33), (3, 2, 64), (4, 300)])
def test_rms_norm(shape):
    x = torch.randn(shape) * 3
    w = torch.rand(shape[-1]) + 0.5
    out = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, ref_rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    assert out.shape == x.shape


@pytest.mark.parametrize("shape", [(1, 16), (6, 48), (2, 3, 130)])
def test_fused_add_rms_norm_in_place(shape):
    x, res = torch.randn(shape), torch.randn(shape)
    w = torch.rand(shape[-1]) + 0.5
    want_res = x + res
    want_out = ref_rms_norm(want_res, w, 1e-5)
    x_ptr, res_ptr = x.data_ptr(), res.data_ptr()
    out, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(new_res, want_res, atol=0, rtol=0)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    assert out.data_ptr() == x_ptr and new_res.data_ptr() == res_ptr  # in place


def test_rms_norm_strided_rows():
    # rows with a stride (a slice of a wider buffer) are read correctly
    big = torch.randn(7, 96)
    x = big[:, :64]
    w = torch.rand(64) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6),
                               atol=1e-5, rtol=1e-5)
