"""Time each Triton kernel with triton.testing.do_bench (median) at real shapes in bf16, and
report achieved bandwidth against the measured device-to-device copy rate (bytes read plus
bytes written), or TFLOP/s for compute-bound attention prefill.

    PYTHONPATH=. python benchmarks/kernels_bench.py [--skinny | --fused | --sampling]

Measured on one H200 (torch 2.11, triton 3.6), 2026-11-29, CUDA-graph replay medians; copy
ceiling 4247 GB/s (1 GiB device-to-device copy, eager). Decode H=32/8 D=128 block 16:
B=256 x 4096 keys 1194 us (3604 GB/s, 85%); B=256 x 1024 330 us (77%); B=64 x 2048 137 us
(93%, 2-stage tiles; 198 us with 3); B=1 x 32768 62 us with 32 splits (51%; 1177 us
unsplit), 48 us with 128-key tiles. Prefill 4096 tokens: 171-174 TFLOP/s with 128-row tiles
(145 with 64). rms_norm 87%, fused add+norm 90%, silu_and_mul 97%, rotary ~100% of copy.
Sampler (before candidate compaction): greedy B=256 34 us, plain 122 us, top-k+top-p 3.4 ms.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagoda.attention.backend import CommonAttentionMetadata  # noqa: E402
from pagoda.attention.backends.triton import TritonBackend  # noqa: E402
from pagoda.kernels.activation import silu_and_mul  # noqa: E402
from pagoda.kernels.kv_cache import write_kv_cache  # noqa: E402
from pagoda.kernels.layernorm import fused_add_rms_norm, rms_norm  # noqa: E402
from pagoda.kernels.paged_attention import paged_attention  # noqa: E402
from pagoda.kernels.rotary import apply_rotary  # noqa: E402
from pagoda.kernels.sampling import sample, sample_plain  # noqa: E402
from pagoda.kernels.skinny_gemm import skinny_gemm  # noqa: E402
from pagoda.layers.sampler import draw_exponential  # noqa: E402

DEV, BF = "cuda", torch.bfloat16
ROWS: list[tuple[str, float, str]] = []


def bench(fn, graph: bool = True) -> float:
    """Median ms. Decode-sized launches last less than the host takes to issue them (Python +
    Triton's launcher on the GPU machine's slow CPU), so by default time CUDA-graph replays,
    as the engine runs decode; graph=False shows the eager, host-bound figure."""
    fn()  # compile outside the capture
    if graph:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def record(name: str, ms: float, nbytes: float = 0.0, flops: float = 0.0, copy_gbs: float = 0.0):
    parts = [f"{ms * 1e3:9.1f} us"]
    if nbytes:
        gbs = nbytes / ms / 1e6
        parts.append(f"{gbs:7.0f} GB/s" + (f" ({100 * gbs / copy_gbs:3.0f}% of copy)" if copy_gbs else ""))
    if flops:
        parts.append(f"{flops / ms / 1e9:6.1f} TFLOP/s")
    ROWS.append((name, ms, "  ".join(parts)))
    print(f"{name:58s} {'  '.join(parts)}", flush=True)


def copy_rate() -> float:
    src = torch.randn(512 * 2**20, device=DEV, dtype=BF)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), graph=False)  # one 1 GiB copy: not host-bound
    gbs = 2 * src.numel() * 2 / ms / 1e6
    record("d2d copy 1 GiB (read+write)", ms, 2 * src.numel() * 2)
    return gbs


def decode_meta(batch: int, ctx: int, block_size: int, num_blocks: int, qlen: int = 1):
    """`batch` sequences of `ctx` cached tokens plus `qlen` new ones, random block tables."""
    seq = ctx + qlen
    nblk = -(-seq // block_size)
    table = torch.randperm(num_blocks, device=DEV)[: batch * nblk].view(batch, nblk).int()
    pos = torch.arange(ctx, seq, device=DEV)
    slots = (table[:, pos // block_size].long() * block_size + pos % block_size).flatten()
    qsl = torch.arange(0, batch + 1, device=DEV, dtype=torch.int32) * qlen
    sl = torch.full((batch,), seq, device=DEV, dtype=torch.int32)
    return CommonAttentionMetadata(batch, batch * qlen, qlen, seq, qsl, sl, table, slots,
                                   qsl.cpu(), sl.cpu())


class Layer:
    def __init__(self, h, hkv, d):
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.scale = 1.0 / math.sqrt(d)
        self.sliding_window = self.logits_soft_cap = self.alibi_slopes = None


def bench_attention(copy_gbs: float, label: str, batch: int, ctx: int, qlen: int,
                    h=32, hkv=8, d=128, block_size=16, force_splits=None, config=None,
                    graph=True):
    layer = Layer(h, hkv, d)
    seq = ctx + qlen
    num_blocks = batch * (-(-seq // block_size)) + 16
    meta = decode_meta(batch, ctx, block_size, num_blocks, qlen)
    cache = torch.randn(2, num_blocks, block_size, hkv, d, device=DEV, dtype=BF)
    t = batch * qlen
    q = torch.randn(t, h, d, device=DEV, dtype=BF)
    k, v = torch.randn(t, hkv, d, device=DEV, dtype=BF), torch.randn(t, hkv, d, device=DEV, dtype=BF)
    backend = TritonBackend(force_splits=force_splits)
    built = backend.build_metadata(meta)
    if config is not None:  # tuning sweep: the attention kernel alone, with given tiles
        splits = force_splits or 1
        out = torch.empty_like(q)
        fn = lambda: paged_attention(  # noqa: E731
            q, cache[0], cache[1], out, query_start_loc=meta.query_start_loc,
            seq_lens=meta.seq_lens, block_table=meta.block_table, num_seqs=batch,
            max_query_len=qlen, scale=layer.scale, num_splits=splits, config=config)
    else:
        fn = lambda: backend.forward(layer, q, k, v, cache, built)  # noqa: E731
    ms = bench(fn, graph)
    kv_bytes = 2 * batch * seq * hkv * d * 2  # every cached key and value read once
    io_bytes = 2 * q.numel() * 2 + 2 * k.numel() * 2 * 2  # q in, out, k/v in and written
    causal_pairs = batch * (qlen * ctx + qlen * (qlen + 1) / 2)
    flops = 4 * h * d * causal_pairs
    splits = built.num_splits(hkv) if force_splits is None else force_splits
    name = f"attn {label} B={batch} ctx={ctx} q={qlen} H={h}/{hkv} D={d} splits={splits}"
    if config is not None:
        name += " " + ",".join(f"{k}={v}" for k, v in config.items())
    if qlen == 1:
        record(name, ms, kv_bytes + io_bytes, copy_gbs=copy_gbs)
    else:
        record(name, ms, flops=flops)


def bench_small_kernels(copy_gbs: float):
    t, hid = 4096, 4096
    x = torch.randn(t, hid, device=DEV, dtype=BF)
    res, w = torch.randn_like(x), torch.rand(hid, device=DEV, dtype=BF) + 0.5
    record(f"rms_norm [{t}, {hid}]", bench(lambda: rms_norm(x, w, 1e-6)), 2 * x.numel() * 2,
           copy_gbs=copy_gbs)
    record(f"fused_add_rms_norm [{t}, {hid}]", bench(lambda: fused_add_rms_norm(x, res, w, 1e-6)),
           4 * x.numel() * 2, copy_gbs=copy_gbs)
    inter = 14336
    g = torch.randn(t, 2 * inter, device=DEV, dtype=BF)
    record(f"silu_and_mul [{t}, 2x{inter}]", bench(lambda: silu_and_mul(g)), 3 * t * inter * 2,
           copy_gbs=copy_gbs)
    h, hkv, d = 32, 8, 128
    q = torch.randn(t, h, d, device=DEV, dtype=BF)
    k = torch.randn(t, hkv, d, device=DEV, dtype=BF)
    cos_sin = torch.randn(8192, d, device=DEV)
    pos = torch.randint(0, 8192, (t,), device=DEV)
    record(f"rotary neox T={t} H={h}/{hkv} D={d}", bench(lambda: apply_rotary(pos, q, k, cos_sin)),
           2 * (q.numel() + k.numel()) * 2 + t * d * 4, copy_gbs=copy_gbs)
    num_blocks, bs = 4096, 16
    cache = torch.empty(2, num_blocks, bs, hkv, d, device=DEV, dtype=BF)
    slots = torch.randperm(num_blocks * bs, device=DEV)[:t]
    v = torch.randn_like(k)
    record(f"write_kv_cache T={t} Hkv={hkv} D={d}",
           bench(lambda: write_kv_cache(k, v, cache, slots)), 4 * k.numel() * 2,
           copy_gbs=copy_gbs)


def bench_sampling(copy_gbs: float):
    for b in (8, 256):
        vocab = 128256
        logits = torch.randn(b, vocab, device=DEV) * 4
        q = torch.empty_like(logits).exponential_()
        temp = torch.full((b,), 0.8, device=DEV)
        greedy = torch.zeros(b, device=DEV)
        top_k = torch.full((b,), 50, device=DEV, dtype=torch.int32)
        no_k = torch.zeros(b, device=DEV, dtype=torch.int32)
        top_p = torch.full((b,), 0.9, device=DEV)
        ones, zeros = torch.ones(b, device=DEV), torch.zeros(b, device=DEV)
        nbytes = 2 * logits.numel() * 4  # logits + noise read once: the floor
        record(f"sample greedy B={b} V={vocab}",
               bench(lambda: sample(logits, greedy, no_k, ones, zeros, q)), logits.numel() * 4,
               copy_gbs=copy_gbs)
        record(f"sample plain B={b}", bench(lambda: sample(logits, temp, no_k, ones, zeros, q)),
               nbytes, copy_gbs=copy_gbs)
        record(f"sample top_k=50 top_p=0.9 B={b}",
               bench(lambda: sample(logits, temp, top_k, top_p, zeros, q)), nbytes,
               copy_gbs=copy_gbs)
        # The engine's plain path (layers/sampler.py): bf16 logits straight from the LM head,
        # noise drawn in the kernel, against the fp32 copy + torch noise it replaced.
        half = logits.to(BF)
        record(f"plain sampler, noise in kernel, bf16 B={b}",
               bench(lambda: sample_plain(half, temp, None, seed=1)), half.numel() * 2,
               copy_gbs=copy_gbs)
        record(f"plain sampler, fp32 copy + torch noise B={b}",
               bench(lambda: sample_plain(half.float(), temp, draw_exponential(
                   half.shape, half.device))), half.numel() * 2, copy_gbs=copy_gbs)


# Decode projections (N, K): Llama-3.1-8B qkv, o, gate_up, down, lm_head; Qwen3-0.6B qkv, o,
# gate_up, down.
SKINNY_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
                 (4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072))
SKINNY_CONFIGS = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                  for bn in (16, 32, 64) for bk in (128, 256, 512)
                  for nw, ns in ((4, 4), (8, 3))]


def bench_skinny(copy_gbs: float, rows=(1, 8), configs=None):
    """Skinny GEMM vs cuBLAS. Each timed call walks several weight copies (> 150 MB in all), so
    the weights come from HBM as in a model's layer stack, not from the 50 MB L2."""
    for n, k in SKINNY_SHAPES:
        copies = max(1, min(8, -(-150 * 2**20 // (n * k * 2))))
        weights = [torch.randn(n, k, device=DEV, dtype=BF) / 64 for _ in range(copies)]
        nbytes = n * k * 2
        for m in rows:
            x = torch.randn(m, k, device=DEV, dtype=BF)
            ref = torch.nn.functional.linear(x, weights[0])
            torch.testing.assert_close(skinny_gemm(x, weights[0]), ref, rtol=2e-2, atol=2e-2)
            ms = bench(lambda: [torch.nn.functional.linear(x, w) for w in weights]) / copies
            record(f"cublas M={m} N={n} K={k}", ms, nbytes, copy_gbs=copy_gbs)
            best = None
            for cfg in configs or [None]:
                try:
                    ms = bench(lambda: [skinny_gemm(x, w, config=cfg) for w in weights]) / copies
                except triton.runtime.errors.OutOfResources:
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            record(f"skinny M={m} N={n} K={k} best {best[1]}", best[0], nbytes,
                   copy_gbs=copy_gbs)
        del weights


def bench_fused(copy_gbs: float):
    """The fused decode layer's GEMMs (layers/fused_decode.py) against their unfused parts:
    q/k/v and gate_up normalising through the producer's sums of squares, gate_up with the
    act in its epilogue, o_proj and down_proj adding into the residual stream."""
    from pagoda.kernels.skinny_gemm import add_linear
    for n, k, kind in ((6144, 4096, "qkv"), (28672, 4096, "gate_up"), (4096, 14336, "down"),
                       (4096, 4096, "o")):
        copies = max(1, min(8, -(-150 * 2**20 // (n * k * 2))))
        weights = [torch.randn(n, k, device=DEV, dtype=BF) / 64 for _ in range(copies)]
        for m in (1, 8):
            x = torch.randn(m, k, device=DEV, dtype=BF)
            sums = torch.rand(m, 128, device=DEV)
            stream = torch.randn(m, n, device=DEV, dtype=BF)

            def run(label, fn):
                ms = bench(lambda: [fn(w) for w in weights]) / copies
                record(f"{kind} M={m} {label}", ms, n * k * 2, copy_gbs=copy_gbs)
            run("skinny", lambda w: skinny_gemm(x, w))
            if kind == "qkv":
                run("skinny, normalising", lambda w: skinny_gemm(x, w, square_sums=sums))
            if kind == "gate_up":
                run("cublas + act kernel",
                    lambda w: silu_and_mul(torch.nn.functional.linear(x, w)))
                run("skinny, normalising, act", lambda w: skinny_gemm(x, w, square_sums=sums,
                                                                      act="silu"))
            if kind in ("down", "o"):
                run("add_linear", lambda w: add_linear(stream, x, w))
        del weights


def tuning_sweep(copy_gbs: float):
    """Tile shapes for the attention kernel alone (keys block_m, tile_n, num_warps, num_stages)."""
    for bm, tn, nw, ns in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 3),
                           (64, 32, 4, 3), (128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2),
                           (64, 128, 4, 2)):
        cfg = dict(block_m=bm, tile_n=tn, num_warps=nw, num_stages=ns)
        bench_attention(copy_gbs, "tune prefill", 1, 0, 4096, config=cfg)
    for tn, nw, ns in ((64, 4, 3), (32, 4, 3), (128, 4, 3), (64, 2, 3), (64, 4, 4), (128, 8, 3),
                       (64, 4, 2)):
        cfg = dict(block_m=16, tile_n=tn, num_warps=nw, num_stages=ns)
        bench_attention(copy_gbs, "tune decode", 64, 2048, 1, config=cfg)
        bench_attention(copy_gbs, "tune decode", 1, 32768, 1, config=cfg, force_splits=32)


def main():
    assert torch.cuda.is_available(), "needs a CUDA device"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}", flush=True)
    torch.manual_seed(0)
    copy_gbs = copy_rate()
    if "--fused" in sys.argv:  # the fused decode layer's GEMMs
        bench_fused(copy_gbs)
        return _save()
    if "--sampling" in sys.argv:
        bench_sampling(copy_gbs)
        return _save()
    if "--skinny" in sys.argv:  # the projection GEMMs only (with the config sweep)
        bench_skinny(copy_gbs, configs=SKINNY_CONFIGS)
        return _save()
    for batch, ctx in ((1, 4096), (1, 32768), (8, 8192), (64, 2048), (256, 1024), (256, 4096)):
        bench_attention(copy_gbs, "decode", batch, ctx, 1)
    bench_attention(copy_gbs, "decode EAGER", 64, 2048, 1, graph=False)
    for batch, ctx in ((1, 32768), (4, 8192)):  # split-KV sweep (1 = off)
        for splits in (1, 8, 16, 32, 64):
            bench_attention(copy_gbs, "decode", batch, ctx, 1, force_splits=splits)
    bench_attention(copy_gbs, "decode D=256 Hkv=8", 32, 4096, 1, h=16, hkv=8, d=256)
    bench_attention(copy_gbs, "prefill", 1, 0, 4096)
    bench_attention(copy_gbs, "prefill EAGER", 1, 0, 4096, graph=False)
    bench_attention(copy_gbs, "prefill", 8, 0, 512)
    bench_attention(copy_gbs, "chunked prefill", 4, 4096, 512)
    bench_small_kernels(copy_gbs)
    bench_sampling(copy_gbs)
    bench_skinny(copy_gbs, rows=(1, 8, 16))
    tuning_sweep(copy_gbs)
    _save()


def _save():
    if os.environ.get("OUT"):  # the device machine's result folder
        with open(os.path.join(os.environ["OUT"], "kernels_bench.txt"), "w") as f:
            f.writelines(f"{name:58s} {text}\n" for name, _, text in ROWS)


if __name__ == "__main__":
    main()
