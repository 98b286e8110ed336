"""Gated activations: x[..., 2d] -> act(x[..., :d]) * x[..., d:].

Rounding follows HF's `act_fn(gate) * up`: the activation is computed in fp32 and rounded to
the input dtype, then the product is computed in fp32 and rounded once more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.pdl import launch_args, wait_then_release

_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # tanh via exp(-2|x|): portable across Triton versions and the interpreter, no overflow
        e = tl.exp(-2.0 * tl.abs(inner))
        tanh = (1.0 - e) / (1.0 + e)
        return 0.5 * g * (1.0 + tl.where(inner < 0, -tanh, tanh))


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, ACT: tl.constexpr,
                        BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_then_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    a = _act(g.to(tl.float32), ACT).to(x_ptr.dtype.element_ty)
    y = a.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2d = x.reshape(-1, x.shape[-1])
    assert x2d.stride(-1) == 1
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    n_rows = x2d.shape[0]
    if n_rows == 0 or d == 0:
        return out
    block = min(triton.next_power_of_2(d), 1024)
    grid = (n_rows, triton.cdiv(d, block))
    _act_and_mul_kernel[grid](x2d, out.view(-1, d), x2d.stride(0), d, d,
                              ACT=_ACTS[act], BLOCK=block, **launch_args(x.device))
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul(x, "silu")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """approximate: "none" (erf) or "tanh", as torch.nn.functional.gelu."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"unknown gelu approximation {approximate!r}")
    return _act_and_mul(x, "gelu" if approximate == "none" else "gelu_tanh")
