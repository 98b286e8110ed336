"""Gated activations against torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F

from pagoda.kernels.activation import gelu_and_mul, silu_and_mul


@pytest.mark.parametrize("shape", [(1, 2), (7, 64), (2, 3, 2 * 1100)])
def test_silu_and_mul(shape):
    x = torch.randn(shape) * 4
    d = shape[-1] // 2
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[..., :d]) * x[..., d:],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul(approximate):
    x = torch.randn(5, 2 * 96) * 4
    x[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -1e-3])  # tails and zero
    want = F.gelu(x[:, :96], approximate=approximate) * x[:, 96:]
    torch.testing.assert_close(gelu_and_mul(x, approximate), want, atol=1e-5, rtol=1e-5)


def test_gelu_rejects_unknown_mode():
    with pytest.raises(ValueError):
        gelu_and_mul(torch.randn(1, 4), "fast")
