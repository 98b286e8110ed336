"""A decode layer's whole gated MLP in one kernel: stream += down(act(gate_up(norm(stream)))).

At decode rows (M <= 16) gate_up and down_proj are two passes over their weights, and each
GEMM boundary costs its tail (the last programs finishing alone) and the next one's ramp; on
the H200 that is ~4 us of a Llama-3.1-8B layer's ~88 us MLP. Here one program per SM owns a
slice of the intermediate units: it streams its gate and up rows (the norm applied from the
stream's sums of squares, as `skinny_gemm(square_sums=...)`), applies act(gate) * up, and
streams the matching columns of down_proj, so every weight byte is still read once and each
program goes from one pass into the other without waiting for the rest of the grid.

Each program's down_proj product is a partial sum over its units for every output column.
The partials go to a workspace; then a grid-wide barrier (all programs are resident: one per
SM at most) and each program reduces one slice of the columns over all partials in a fixed
order, so the result does not depend on timing; it adds the residual and leaves the new rows'
sums of squares for the next layer's norm, one part per program, as `add_linear` does.

Triton's interpreter runs programs one after another, where a barrier cannot be waited on:
there (and for A/B runs) the two phases are two launches of the same kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda import platform
from pagoda.kernels.activation import _ACTS
from pagoda.kernels.pdl import enabled as pdl_enabled
from pagoda.kernels.skinny_gemm import MAX_ROWS, _epilogue, _inv_rms


@triton.jit
def _gated_units(x_ptr, wgu_ptr, s_in_ptr, rows, row_mask, units, unit_mask, I, H, stride_xm,
                 stride_w, num_parts, eps, PARTS_P2: tl.constexpr, ACT: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """act(gate) * up of the normalised rows for this program's units, [16, BLOCK_U]."""
    inv_rms = _inv_rms(s_in_ptr, rows, row_mask, num_parts, H, eps, PARTS_P2)
    ks = tl.arange(0, BLOCK_K)
    x_base = x_ptr + rows[:, None] * stride_xm
    gate_base = wgu_ptr + units.to(tl.int64)[:, None] * stride_w
    up_base = gate_base + I * stride_w  # the up rows follow the gate rows
    gate = tl.zeros([16, BLOCK_U], tl.float32)
    up = tl.zeros([16, BLOCK_U], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + ks
        if EVEN_K:
            x_mask = row_mask[:, None]
            w_mask = unit_mask[:, None]
        else:
            x_mask = row_mask[:, None] & (kk < H)[None, :]
            w_mask = unit_mask[:, None] & (kk < H)[None, :]
        x = tl.load(x_base + kk[None, :], mask=x_mask, other=0.0)
        wg = tl.load(gate_base + kk[None, :], mask=w_mask, other=0.0)
        gate = tl.dot(x, tl.trans(wg), gate, input_precision=DOT_PREC)
        wu = tl.load(up_base + kk[None, :], mask=w_mask, other=0.0)
        up = tl.dot(x, tl.trans(wu), up, input_precision=DOT_PREC)
    out_mask = row_mask[:, None] & unit_mask[None, :]
    return _epilogue(gate, up, inv_rms, wgu_ptr, x_ptr, rows, units, unit_mask, out_mask, I,
                     stride_xm, x_ptr.dtype.element_ty, False, True, True, ACT, False)


@triton.jit
def _down_partials(act, wd_ptr, part_ptr, rows, row_mask, u, unit_mask, H, stride_wd,
                   BLOCK_O: tl.constexpr, DOT_PREC: tl.constexpr):
    """This program's units' share of down_proj for every output column, to its partials
    [16, H] (fp32). wd_ptr points at the program's first unit of output column 0."""
    for o0 in range(0, H, BLOCK_O):
        outs = o0 + tl.arange(0, BLOCK_O)
        out_mask = outs < H
        wd = tl.load(wd_ptr + outs.to(tl.int64)[:, None] * stride_wd + u[None, :],
                     mask=out_mask[:, None] & unit_mask[None, :], other=0.0)
        part = tl.dot(act, tl.trans(wd), input_precision=DOT_PREC)
        tl.store(part_ptr + rows[:, None] * H + outs[None, :], part,
                 mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _grid_barrier(bar_ptr, num_programs):
    """Returns once every program of the grid has arrived. The counters reset themselves:
    the last program to leave zeroes them, after every program has seen the full count."""
    tl.debug_barrier()  # this program's partials are all stored before it arrives
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel") + 1
    while arrived < num_programs:
        arrived = tl.atomic_add(bar_ptr, 0, sem="acquire")
    if tl.atomic_add(bar_ptr + 1, 1, sem="relaxed") == num_programs - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed")
        tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed")
    tl.debug_barrier()


@triton.jit
def _reduce_into_stream(part_ptr, y_ptr, s_out_ptr, M, H, stride_ym, num_programs, pid,
                        SLICE: tl.constexpr, SLICE_P2: tl.constexpr, PROGS_P2: tl.constexpr):
    """Columns [pid * SLICE, +SLICE) of every row: the partials summed in program order,
    rounded as down_proj's output, added to the stream; their sums of squares to s_out."""
    c = tl.arange(0, SLICE_P2)
    cols = pid * SLICE + c
    col_mask = (c < SLICE) & (cols < H)
    progs = tl.arange(0, PROGS_P2)
    tile_mask = (progs < num_programs)[:, None] & col_mask[None, :]
    tile = part_ptr + progs.to(tl.int64)[:, None] * (16 * H) + cols[None, :]
    for r in range(M):
        down = tl.sum(tl.load(tile + r * H, mask=tile_mask, other=0.0), 0)
        res = tl.load(y_ptr + r * stride_ym + cols, mask=col_mask, other=0.0)
        new = (down.to(y_ptr.dtype.element_ty).to(tl.float32) + res.to(tl.float32))
        new = new.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + r * stride_ym + cols, new, mask=col_mask)
        newf = tl.where(col_mask, new.to(tl.float32), 0.0)
        tl.store(s_out_ptr + r * num_programs + pid, tl.sum(newf * newf, 0))


@triton.jit(do_not_specialize=["M"])  # decode rows: one compiled variant for 1..16
def _fused_mlp_kernel(
    y_ptr, wgu_ptr, wd_ptr, s_in_ptr, s_out_ptr, part_ptr, bar_ptr, M, I, H, stride_ym,
    stride_w, stride_wd, stride_wp, num_parts, units_per_program, eps, PARTS_P2: tl.constexpr,
    ACT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr, SLICE: tl.constexpr, SLICE_P2: tl.constexpr,
    PROGS_P2: tl.constexpr, COMPUTE: tl.constexpr, REDUCE: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # the previous grid's writes (the stream, its sums) first
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    rows = tl.arange(0, 16)
    row_mask = rows < M
    part_ptr_own = part_ptr + pid.to(tl.int64) * (16 * H)
    if COMPUTE:
        u = tl.arange(0, BLOCK_U)
        units = pid * units_per_program + u
        unit_mask = (u < units_per_program) & (units < I)
        act = _gated_units(y_ptr, wgu_ptr, s_in_ptr, rows, row_mask, units, unit_mask, I, H,
                           stride_ym, stride_w, num_parts, eps, PARTS_P2, ACT, EVEN_K,
                           BLOCK_U, BLOCK_K, DOT_PREC)
        _down_partials(act, wd_ptr + pid.to(tl.int64) * stride_wp, part_ptr_own, rows,
                       row_mask, u, unit_mask, H, stride_wd, BLOCK_O, DOT_PREC)
    if REDUCE:
        if COMPUTE:  # one launch: every program's partials, and its reads of the stream, done
            _grid_barrier(bar_ptr, num_programs)
        if USE_PDL:  # only now, when the whole grid is resident, may the next kernel launch
            tl.extra.cuda.gdc_launch_dependents()
        _reduce_into_stream(part_ptr, y_ptr, s_out_ptr, M, H, stride_ym, num_programs, pid,
                            SLICE, SLICE_P2, PROGS_P2)


@dataclass
class Workspace:
    """Shared by every layer of a model (they run one after another): the partial sums
    [programs, 16, H] in fp32 and the barrier's two counters, which must start at zero."""
    partials: torch.Tensor
    barrier: torch.Tensor


_WORKSPACES: dict = {}


def grid(intermediate: int, device: torch.device) -> tuple[int, int]:
    """(programs, units per program): one program per SM at most (the barrier needs the
    whole grid resident), units in multiples of 16 (the down_proj dot's inner size)."""
    slots = platform.num_sms(device) * int(os.environ.get("PAGODA_FUSED_MLP_PER_SM", "1"))
    units = triton.cdiv(triton.cdiv(intermediate, slots), 16) * 16
    return triton.cdiv(intermediate, units), units


def workspace(hidden: int, intermediate: int, device: torch.device) -> Workspace:
    """The workspace for this shape, made once (call it outside CUDA graph capture: after
    loading)."""
    programs = grid(intermediate, device)[0]
    key = (device, hidden, programs)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = Workspace(
            torch.empty(programs, MAX_ROWS, hidden, dtype=torch.float32, device=device),
            torch.zeros(2, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def _tiles(dtype: torch.dtype) -> dict:
    """block_k and block_o halved in fp32, so a tile holds as many bytes as in bf16.
    PAGODA_FUSED_MLP_TILES="block_k/block_o/num_stages" overrides them for A/B runs."""
    spec = os.environ.get("PAGODA_FUSED_MLP_TILES")
    block_k, block_o, stages, warps = 128, 128, 3, 4
    if spec:
        block_k, block_o, stages, *more = (int(x) for x in spec.split("/"))
        warps = more[0] if more else warps
    if dtype == torch.float32:
        block_k, block_o = block_k // 2, block_o // 2
    return dict(block_k=block_k, block_o=block_o, num_stages=stages, num_warps=warps)


def by_program(down: torch.Tensor) -> torch.Tensor:
    """down_proj [H, I] rearranged so that each program's columns are one contiguous block,
    [programs, H, units] (zero-padded): the kernel then streams it as gate_up, not in
    224-byte pieces of 28 KB rows."""
    hidden, intermediate = down.shape
    programs, units = grid(intermediate, down.device)
    padded = torch.nn.functional.pad(down, (0, programs * units - intermediate))
    return padded.view(hidden, programs, units).transpose(0, 1).contiguous()


def fused_mlp(stream: torch.Tensor, square_sums: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor, act: str, eps: float, space: Workspace) -> torch.Tensor:
    """stream [M, H] (M <= 16) += down @ (act(gate) * up) of the RMS-normalised stream, in
    place. gate_up [2I, H] has the norm's weight folded in (gate rows, then up rows); down
    is [H, I] or `by_program`'s [programs, H, units]; square_sums [M, P] are the stream
    rows' sums of squares in parts (add_linear's). Returns the new rows' sums of squares
    [M, programs]."""
    m, hidden = stream.shape
    intermediate = gate_up.shape[0] // 2
    if not 0 < m <= MAX_ROWS or not stream.is_contiguous():
        raise ValueError(f"fused_mlp takes 1..{MAX_ROWS} contiguous rows, got {m}")
    programs, units = grid(intermediate, stream.device)
    if gate_up.shape != (2 * intermediate, hidden) or down.shape not in (
            (hidden, intermediate), (programs, hidden, units)):
        raise ValueError(f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do "
                         f"not make an MLP of {hidden} -> {intermediate}")
    if space.partials.shape[0] != programs or space.partials.shape[2] != hidden:
        raise ValueError("the workspace was made for another shape")
    sums = torch.empty(m, programs, dtype=torch.float32, device=stream.device)
    one_launch = stream.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" \
        and os.environ.get("PAGODA_FUSED_MLP_LAUNCHES", "1") == "1"
    for compute, reduce in [(True, True)] if one_launch else [(True, False), (False, True)]:
        _launch(stream, square_sums, gate_up, down, sums, act, eps, space, compute, reduce)
    return sums


def _launch(stream, square_sums, gate_up, down, sums, act, eps, space, compute, reduce):
    """One launch: the gated units and down_proj partials (compute), the barrier-free or
    barrier-guarded reduction (reduce), or both."""
    m, hidden = stream.shape
    intermediate = gate_up.shape[0] // 2
    programs, units = grid(intermediate, stream.device)
    # where a program's down_proj columns start, and the step between output columns
    stride_wp, stride_wd = (down.stride(0), down.stride(1)) if down.dim() == 3 else \
        (units, down.stride(0))
    cfg = _tiles(stream.dtype)
    slice_cols = triton.cdiv(hidden, programs)
    use_pdl = pdl_enabled(stream.device)
    _fused_mlp_kernel[(programs,)](
        stream, gate_up, down, square_sums, sums, space.partials, space.barrier, m,
        intermediate, hidden, stream.stride(0), gate_up.stride(0), stride_wd, stride_wp,
        square_sums.shape[1], units, eps,
        PARTS_P2=triton.next_power_of_2(square_sums.shape[1]), ACT=_ACTS[act],
        EVEN_K=hidden % cfg["block_k"] == 0, BLOCK_U=triton.next_power_of_2(units),
        BLOCK_K=cfg["block_k"], BLOCK_O=cfg["block_o"], SLICE=slice_cols,
        SLICE_P2=triton.next_power_of_2(slice_cols),
        PROGS_P2=triton.next_power_of_2(programs), COMPUTE=compute, REDUCE=reduce,
        DOT_PREC="ieee" if stream.dtype == torch.float32 else None, USE_PDL=use_pdl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **({"launch_pdl": True} if use_pdl else {}))
