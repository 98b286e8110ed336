"""RMSNorm and fused residual-add + RMSNorm, one row per program, one pass over memory.

Rounding follows Hugging Face Llama: normalise in fp32, cast to the input dtype, then multiply
by the weight (the product rounded once to the output dtype), so bf16 results match HF's.
The fused variant adds the residual in the input dtype first (HF: `residual + hidden`), then
normalises that sum; it writes the sum into `residual` and the normalised output into `x`,
which saves two allocations and a read-back per decoder layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.pdl import launch_args, wait_then_release


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
    BLOCK_N: tl.constexpr, ADD_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_then_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / n_cols
    normed = (xf * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x2d, res2d, weight, out2d, eps, add_residual):
    n_rows, n_cols = x2d.shape
    if n_rows == 0:
        return
    block_n = triton.next_power_of_2(n_cols)
    # One row in registers: more warps for wide rows keep each thread's share small.
    num_warps = min(max(block_n // 1024, 1), 16)
    _rms_norm_kernel[(n_rows,)](
        x2d, res2d, weight, out2d, x2d.stride(0), res2d.stride(0), out2d.stride(0),
        n_cols, eps, BLOCK_N=block_n, ADD_RESIDUAL=add_residual, num_warps=num_warps,
        **launch_args(x2d.device),
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1])
    assert t2.stride(-1) == 1
    return t2


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)  # HF: weight * hidden.to(input_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] -> new tensor, weight [N]."""
    out = torch.empty(x.shape, dtype=_out_dtype(x, weight), device=x.device)
    _launch(_rows(x), _rows(x), weight, out.view(-1, x.shape[-1]), eps, False)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; x <- rms_norm(residual). Returns (x, residual), both updated
    in place when x's dtype matches the weight's (the normal case); otherwise the normalised
    output is a new tensor of the promoted dtype."""
    assert x.shape == residual.shape and residual.is_contiguous()
    x2d, r2d = _rows(x), residual.view(-1, residual.shape[-1])
    if _out_dtype(x, weight) == x.dtype and x.is_contiguous():
        out = x
    else:
        out = torch.empty(x.shape, dtype=_out_dtype(x, weight), device=x.device)
    _launch(x2d, r2d, weight, out.view(-1, x.shape[-1]), eps, True)
    return out, residual
