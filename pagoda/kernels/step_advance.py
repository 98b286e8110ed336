"""The decode lookahead's next step inputs, computed on the device from this step's.

Each sequence of a decode batch moves one token on: its position and length grow by one, its
new token's KV slot is read off the device block table, and its input id is the token just
sampled. One kernel does all four, where uploading the positions, slots and lengths from the
host and copying the samples took four copies on the stream (worker/cuda_graphs.py,
DecodeLookahead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.pdl import launch_args, wait_then_release

_BLOCK = 128


@triton.jit(do_not_specialize=["n"])  # one compiled variant for every batch size
def _advance_kernel(input_ids_ptr, sampled_ptr, pos_ptr, slot_ptr, seq_lens_ptr,
                    block_table_ptr, stride_bt, n, block_size, BLOCK: tl.constexpr,
                    USE_PDL: tl.constexpr):
    wait_then_release(USE_PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    pos = tl.load(pos_ptr + i, mask=mask, other=0) + 1
    block = tl.load(block_table_ptr + i.to(tl.int64) * stride_bt + pos // block_size,
                    mask=mask, other=0)
    tl.store(pos_ptr + i, pos, mask=mask)
    tl.store(seq_lens_ptr + i, (pos + 1).to(seq_lens_ptr.dtype.element_ty), mask=mask)
    tl.store(slot_ptr + i, block.to(tl.int64) * block_size + pos % block_size, mask=mask)
    tl.store(input_ids_ptr + i, tl.load(sampled_ptr + i, mask=mask), mask=mask)


def advance_decode_inputs(input_ids: torch.Tensor, sampled: torch.Tensor,
                          positions: torch.Tensor, slot_mapping: torch.Tensor,
                          seq_lens: torch.Tensor, block_table: torch.Tensor, n: int,
                          block_size: int) -> None:
    """For rows i < n, in place: positions[i] += 1, seq_lens[i] = positions[i] + 1,
    slot_mapping[i] = the slot of positions[i] in block_table row i, input_ids[i] =
    sampled[i]. Every row must be a live decode sequence whose next block is in the table."""
    assert block_table.stride(1) == 1 and sampled.shape[0] >= n
    if n == 0:
        return
    _advance_kernel[(triton.cdiv(n, _BLOCK),)](
        input_ids, sampled, positions, slot_mapping, seq_lens, block_table,
        block_table.stride(0), n, block_size, BLOCK=_BLOCK, **launch_args(positions.device))
