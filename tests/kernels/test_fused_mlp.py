"""The one-kernel gated MLP of a decode layer (kernels/fused_mlp.py) against PyTorch, under
the interpreter (where its two phases are two launches; the one-launch grid barrier is
tested on the GPU)."""

import pytest
import torch
import torch.nn.functional as F

from pagoda.kernels import fused_mlp as fm

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _reference(stream, gate_up, down, act, eps):
    normed = stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + eps)
    gate, up = F.linear(normed, gate_up).chunk(2, dim=-1)
    return stream + F.linear(ACTS[act](gate) * up, down)


# I=96: 4 "SMs" on the CPU -> 3 programs of 32 units; I=40: the last program has 8 of 16
# units; H=48 is not a multiple of the fp32 block_k (32), and its 3 column slices of 16
# leave none over; H=100 splits into slices of 34 with a short last one.
@pytest.mark.parametrize("m,hidden,inter", [(1, 64, 96), (3, 48, 40), (16, 100, 96)])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("down_by_program", [False, True], ids=["down-rows", "down-by-program"])
def test_matches_reference(m, hidden, inter, act, down_by_program):
    stream = torch.randn(m, hidden) * 3
    gate_up, down = torch.randn(2 * inter, hidden) / 4, torch.randn(hidden, inter) / 4
    want = _reference(stream, gate_up, down, act, 1e-5)
    sums_in = torch.stack([stream[:, :20].pow(2).sum(1), stream[:, 20:].pow(2).sum(1)], 1)
    space = fm.workspace(hidden, inter, stream.device)
    down_arg = fm.by_program(down) if down_by_program else down
    sums = fm.fused_mlp(stream, sums_in.contiguous(), gate_up, down_arg, act, 1e-5, space)
    torch.testing.assert_close(stream, want, atol=1e-4, rtol=1e-4)  # in place
    programs = fm.grid(inter, stream.device)[0]
    assert sums.shape == (m, programs)
    torch.testing.assert_close(sums.sum(1), want.pow(2).sum(1), atol=1e-3, rtol=1e-4)


def test_grid_fills_the_sms_with_whole_16_unit_steps(monkeypatch):
    monkeypatch.setattr(fm.platform, "num_sms", lambda device: 132)  # an H200
    assert fm.grid(14336, torch.device("cpu")) == (128, 112)  # Llama-3.1-8B
    assert fm.grid(3072, torch.device("cpu")) == (96, 32)  # Qwen3-0.6B
    for inter in (1, 17, 4096, 14336, 28672):
        programs, units = fm.grid(inter, torch.device("cpu"))
        assert programs <= 132 and units % 16 == 0 and programs * units >= inter


def test_arguments_are_checked():
    space = fm.workspace(32, 48, torch.device("cpu"))
    sums = torch.ones(2, 1)
    with pytest.raises(ValueError, match="rows"):
        fm.fused_mlp(torch.randn(17, 32), sums, torch.randn(96, 32), torch.randn(32, 48),
                     "silu", 1e-6, space)
    with pytest.raises(ValueError, match="do not make an MLP"):
        fm.fused_mlp(torch.randn(2, 32), sums, torch.randn(90, 32), torch.randn(32, 48),
                     "silu", 1e-6, space)
    with pytest.raises(ValueError, match="workspace"):
        fm.fused_mlp(torch.randn(2, 32), sums, torch.randn(400, 32), torch.randn(32, 200),
                     "silu", 1e-6, space)
