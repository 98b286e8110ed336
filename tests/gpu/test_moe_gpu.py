"""The fused Triton MoE at real shapes in bf16 on CUDA against an fp32 `torch_moe` reference.

Pass mark: relative error ||out - ref|| / ||ref|| under 1e-2. Also: no host sync inside the
call, CUDA-graph capture and replay under new routings, and the layer hook dispatching to it.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from pagoda.layers.activation import SiluAndMul  # noqa: E402
from pagoda.layers.moe import route, torch_moe  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16
# name: (hidden, intermediate, experts, top_k, renormalize)
SHAPES = {
    "mixtral-8x7b": (4096, 14336, 8, 2, True),
    "qwen3-30b-a3b": (2048, 768, 128, 8, True),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4, False),
}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module", params=list(SHAPES))
def experts(request):
    hidden, inter, num_experts, top_k, renorm = SHAPES[request.param]
    g = torch.Generator(device=DEV).manual_seed(0)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=DEV, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, device=DEV, generator=g) / inter ** 0.5
    return w13.to(BF), w2.to(BF), top_k, renorm


def make_inputs(tokens, hidden, num_experts, top_k, renorm):
    x = torch.randn(tokens, hidden, device=DEV).to(BF)
    weights, ids = route(torch.randn(tokens, num_experts, device=DEV) * 2, top_k, renorm)
    return x, weights, ids


def reference(x, w13, w2, weights, ids):
    return torch_moe(x.float(), w13.float(), w2.float(), weights, ids, SiluAndMul())


@pytest.mark.parametrize("tokens", [1, 7, 64, 1024, 4096])
def test_fused_moe_bf16_vs_fp32(experts, tokens):
    from pagoda.kernels.moe import fused_moe
    w13, w2, top_k, renorm = experts
    x, weights, ids = make_inputs(tokens, w13.shape[2], w13.shape[0], top_k, renorm)
    out = fused_moe(x, w13, w2, weights, ids, SiluAndMul())
    assert out.dtype == BF and out.shape == x.shape
    assert rel_err(out, reference(x, w13, w2, weights, ids)) < 1e-2


def test_fused_moe_fp16(experts):
    from pagoda.kernels.moe import fused_moe
    w13, w2, top_k, renorm = experts
    x, weights, ids = make_inputs(33, w13.shape[2], w13.shape[0], top_k, renorm)
    out = fused_moe(x.half(), w13.half(), w2.half(), weights, ids, SiluAndMul())
    assert out.dtype == torch.float16
    assert rel_err(out, reference(x, w13, w2, weights, ids)) < 1e-2


@pytest.mark.parametrize("tokens", [48, 2048])
def test_fused_moe_no_host_sync(experts, tokens):
    from pagoda.kernels.moe import fused_moe
    w13, w2, top_k, renorm = experts
    x, weights, ids = make_inputs(tokens, w13.shape[2], w13.shape[0], top_k, renorm)
    fused_moe(x, w13, w2, weights, ids, SiluAndMul())  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(x, w13, w2, weights, ids, SiluAndMul())
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("tokens", [16, 512])  # the one-program align; torch ops (except Mixtral)
def test_fused_moe_cuda_graph_replays_new_routing(experts, tokens):
    from pagoda.kernels.moe import fused_moe
    w13, w2, top_k, renorm = experts
    hidden, num_experts = w13.shape[2], w13.shape[0]
    x, weights, ids = make_inputs(tokens, hidden, num_experts, top_k, renorm)
    act = SiluAndMul()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) off the capture
        fused_moe(x, w13, w2, weights, ids, act)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids, act)
    for _ in range(3):
        new_x, new_w, new_ids = make_inputs(tokens, hidden, num_experts, top_k, renorm)
        if num_experts > 8:
            new_ids[:, 0] = 0  # a crowded expert: a different block layout than the capture
        x.copy_(new_x)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        eager = fused_moe(x, w13, w2, weights, ids, act)
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert rel_err(out, reference(x, w13, w2, weights, ids)) < 1e-2


def test_layer_hook_uses_triton_kernel(experts):
    from pagoda.kernels.moe import fused_moe as triton_fused_moe
    from pagoda.layers import moe
    w13, w2, top_k, renorm = experts
    assert moe._HAS_TRITON_MOE
    x, weights, ids = make_inputs(5, w13.shape[2], w13.shape[0], top_k, renorm)
    got = moe.fused_moe(x, w13, w2, weights, ids, SiluAndMul())
    assert torch.equal(got, triton_fused_moe(x, w13, w2, weights, ids, SiluAndMul()))


def test_no_compiles_after_the_layer_warm_up(experts):
    """After FusedExperts.warm_up (worker/warm_up.py calls it at start-up with the longest
    step), no step size up to that compiles a MoE kernel variant."""
    from pagoda.layers.moe import FusedExperts
    from tests.gpu.test_e2e_gpu import _compiled_variants
    w13, w2, top_k, renorm = experts
    num_experts, two_inter, hidden = w13.shape
    layer = FusedExperts(num_experts, hidden, two_inter // 2)
    layer.w13_weight.data, layer.w2_weight.data = w13, w2
    layer.warm_up(max_tokens=2048, top_k=top_k)
    before = _compiled_variants()
    for tokens in (1, 2, 3, 7, 16, 31, 33, 64, 65, 100, 129, 256, 257, 300, 512, 1000, 1025,
                   1500, 2048):
        layer(*make_inputs(tokens, hidden, num_experts, top_k, renorm))
    torch.cuda.synchronize()
    after = _compiled_variants()
    assert after == before, {k: (before.get(k), n) for k, n in after.items()
                             if n != before.get(k)}
