"""The lookahead's device-side input advance against the same update in numpy."""

import numpy as np
import pytest
import torch

from pagoda.kernels.step_advance import advance_decode_inputs


@pytest.mark.parametrize("n,size", [(1, 1), (5, 8), (130, 136)])  # 130: two programs
def test_advance_decode_inputs(n, size):
    block_size, max_blocks = 16, 9
    block_table = torch.randint(0, 500, (size + 2, max_blocks), dtype=torch.int32)
    positions = torch.randint(0, block_size * (max_blocks - 1), (size,))
    slots = torch.randint(-1, 1000, (size,))
    seq_lens = torch.randint(0, 100, (size,), dtype=torch.int32)
    input_ids = torch.randint(0, 100, (size,))
    sampled = torch.randint(0, 100, (n,))
    new_pos = positions[:n].numpy() + 1
    rows = block_table[:n].numpy()[np.arange(n), new_pos // block_size].astype(np.int64)
    want = {"positions": positions.clone(), "slots": slots.clone(),
            "seq_lens": seq_lens.clone(), "input_ids": input_ids.clone()}
    want["positions"][:n] = torch.from_numpy(new_pos)
    want["slots"][:n] = torch.from_numpy(rows * block_size + new_pos % block_size)
    want["seq_lens"][:n] = torch.from_numpy(new_pos + 1).to(torch.int32)
    want["input_ids"][:n] = sampled
    advance_decode_inputs(input_ids, sampled, positions, slots, seq_lens, block_table, n,
                          block_size)
    got = {"positions": positions, "slots": slots, "seq_lens": seq_lens,
           "input_ids": input_ids}
    for name, tensor in want.items():  # the padding rows past n are left as they were
        assert torch.equal(got[name], tensor), name
