"""Compiles the decode-path Triton kernels for an H100/H200 (sm90) on any machine, GPU or
not: Triton's wheel carries ptxas. A compile error that the interpreter (CI's CPU path) cannot
see shows up here before a device call is spent on it. With Triton 3.6 on the path (the H200
image's: `pip install --no-deps --target DIR triton==3.6.0`, then PYTHONPATH=DIR:.) it checks
what the device will compile. Each kernel is compiled with the engine's launch options and
the alignment hints Triton's launcher gives, and must fit sm90's shared memory. Exits 1 if
any kernel fails; prints one line per kernel, with its shared memory.

    python benchmarks/compile_check.py
"""

from __future__ import annotations

import inspect
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from pagoda.kernels.activation import _act_and_mul_kernel  # noqa: E402
from pagoda.kernels.kv_cache import _copy_slot_kernel, _rope_write_kv_kernel  # noqa: E402
from pagoda.kernels.layernorm import _rms_norm_kernel  # noqa: E402
from pagoda.kernels.paged_attention import _attention_kernel  # noqa: E402
from pagoda.kernels.rotary import _rotary_kernel  # noqa: E402
from pagoda.kernels.sampling import _chunk_best_kernel, _sample_kernel  # noqa: E402
from pagoda.kernels.skinny_gemm import _skinny_gemm_kernel  # noqa: E402
from pagoda.kernels.step_advance import _advance_kernel  # noqa: E402

BF16 = "*bf16"
ATTENTION_TYPES = {"q_ptr": BF16, "k_ptr": BF16, "v_ptr": BF16, "out_ptr": BF16,
                   "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "counter_ptr": "*i32",
                   "block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_ptr": "*i32",
                   "alibi_ptr": BF16, "pos_ptr": "*i64", "cos_sin_ptr": "*fp32",
                   "new_k_ptr": BF16, "new_v_ptr": BF16, "slot_ptr": "*i64",
                   "q_norm_ptr": BF16, "k_norm_ptr": BF16, "eps": "fp32",
                   "scale": "fp32", "soft_cap": "fp32"}


def _attention(splits: int, window: bool = False, decode: bool = True, rope: bool = False,
               qk_norm: bool = False) -> dict:
    return dict(BLOCK_Q=4, BLOCK_M=16, QPKV_P2=4, DIM_P2=128, TILE_N=128, NUM_SPLITS=splits,
                USE_SOFT_CAP=window, USE_WINDOW=window, USE_ALIBI=False, PAGED=True,
                DECODE=decode, SPLITS_P2=splits, ROPE=rope, IS_NEOX=True, QK_NORM=qk_norm,
                PRELOAD=rope, DOT_PREC="tf32", USE_PDL=True)


SKINNY_TYPES = {"x_ptr": BF16, "w_ptr": BF16, "b_ptr": BF16, "r_ptr": BF16, "y_ptr": BF16,
                "s_in_ptr": "*fp32", "s_out_ptr": "*fp32", "eps": "fp32"}


def _skinny(**flags) -> dict:
    """The skinny GEMM as Llama-3.1-8B's decode layers launch it (plain: q/k/v's tiles)."""
    return dict(dict(HAS_BIAS=False, NORM=False, PARTS_P2=128, GATED=False, ACT=0,
                     RESIDUAL=False, SUM_SQUARES=False, EVEN_K=True, BLOCK_N=64, BLOCK_K=256,
                     DOT_PREC="tf32", USE_PDL=True), **flags)


ROPE_TYPES = {"pos_ptr": "*i64", "q_ptr": BF16, "k_ptr": BF16, "v_ptr": BF16,
              "cos_sin_ptr": "*fp32", "cache_ptr": BF16, "slot_ptr": "*i64",
              "q_norm_ptr": BF16, "k_norm_ptr": BF16, "eps": "fp32"}


# (kernel, constexprs, argument types; unnamed arguments are i32) at Llama-3.1-8B decode shapes
CASES = [
    (_attention_kernel, _attention(1), ATTENTION_TYPES),
    (_attention_kernel, _attention(16), ATTENTION_TYPES),
    (_attention_kernel, _attention(16, window=True), ATTENTION_TYPES),
    (_attention_kernel, _attention(1, decode=False), ATTENTION_TYPES),  # prefill grid
    (_attention_kernel, _attention(16, rope=True), ATTENTION_TYPES),  # PAGODA_ATTN_ROPE=1
    (_attention_kernel, _attention(1, rope=True, qk_norm=True), ATTENTION_TYPES),
    (_skinny_gemm_kernel, _skinny(), SKINNY_TYPES),
    (_skinny_gemm_kernel, _skinny(NORM=True, GATED=True, BLOCK_N=32),
     SKINNY_TYPES),
    (_skinny_gemm_kernel, _skinny(NORM=True, HAS_BIAS=True), SKINNY_TYPES),
    (_skinny_gemm_kernel, _skinny(RESIDUAL=True, SUM_SQUARES=True, BLOCK_N=32, BLOCK_K=512),
     SKINNY_TYPES),
    (_rms_norm_kernel, dict(BLOCK_N=4096, ADD_RESIDUAL=True, USE_PDL=True),
     {"x_ptr": BF16, "res_ptr": BF16, "w_ptr": BF16, "out_ptr": BF16, "eps": "fp32"}),
    (_act_and_mul_kernel, dict(ACT=0, BLOCK=1024, USE_PDL=True),
     {"x_ptr": BF16, "out_ptr": BF16}),
    (_rope_write_kv_kernel, dict(QH_P2=32, KH_P2=8, DIM_P2=128, HALF_P2=64, IS_NEOX=True,
                                 QK_NORM=False, USE_PDL=True), ROPE_TYPES),
    (_rope_write_kv_kernel, dict(QH_P2=16, KH_P2=8, DIM_P2=128, HALF_P2=64, IS_NEOX=True,
                                 QK_NORM=True, USE_PDL=True), ROPE_TYPES),  # Qwen3-0.6B
    (_copy_slot_kernel, dict(BLOCK=1024),  # the lookahead's KV move
     {"cache_ptr": BF16, "src_ptr": "*i64", "dst_ptr": "*i64", "stride_plane": "i64",
      "stride_blk": "i64"}),
    (_rotary_kernel, dict(QH_P2=32, KH_P2=8, HALF_P2=64, IS_NEOX=True),  # unfused (profiling run)
     {"pos_ptr": "*i64", "q_ptr": BF16, "k_ptr": BF16, "cache_ptr": "*fp32"}),
    (_chunk_best_kernel, dict(NOISE=2, BLOCK=1024, USE_PDL=True),
     {"logits_ptr": BF16, "q_ptr": BF16, "temp_ptr": "*fp32", "best_ptr": "*fp32",
      "idx_ptr": "*i32", "greedy_eps": "fp32"}),
    (_advance_kernel, dict(BLOCK=128, USE_PDL=True),  # the lookahead's next inputs
     {"input_ids_ptr": "*i64", "sampled_ptr": "*i64", "pos_ptr": "*i64", "slot_ptr": "*i64",
      "seq_lens_ptr": "*i32", "block_table_ptr": "*i32"}),
    (_sample_kernel, dict(NT=8, ROUNDS=9, BLOCK=1024, SEARCH_BLOCK=512),
     {"logits_ptr": "*fp32", "q_ptr": "*fp32", "temp_ptr": "*fp32", "top_k_ptr": "*i64",
      "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "out_ptr": "*i64", "buf_ptr": "*fp32",
      "greedy_eps": "fp32"}),
]


# What Triton's launcher tells the compiler at Llama shapes: tensors are 16-byte aligned, and
# these integers are multiples of 16. Without the hints the loads compile to scalar ones and
# the pipelining (cp.async stages) the real launch gets is not what is checked.
ALIGNED_INTS = {"N", "K", "V", "head_dim", "block_size"}
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm90
LAUNCH = {"_skinny_gemm_kernel": dict(num_warps=4, num_stages=4),
          "_attention_kernel": dict(num_warps=4, num_stages=3),
          "_sample_kernel": dict(num_warps=8), "_chunk_best_kernel": dict(num_warps=4)}


def compile_sm90(kernel, constexprs: dict, types: dict) -> int:
    """Compiles with the launch options the engine uses; returns the shared memory bytes."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n not in constexprs
               and (signature[n].startswith("*") or n.startswith("stride_") or n in ALIGNED_INTS)]
    source = triton.compiler.ASTSource(
        fn=kernel, signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    options = LAUNCH.get(kernel.fn.__name__, {})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared


def main() -> int:
    print(f"triton {triton.__version__}")
    failed = 0
    for kernel, constexprs, types in CASES:
        name = kernel.fn.__name__
        try:
            shared = compile_sm90(kernel, constexprs, types)
        except Exception as exc:  # report every kernel, then fail
            failed += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {str(exc)[:600]}")
            continue
        if shared > SHARED_LIMIT:
            failed += 1
            print(f"FAIL  {name}: {shared} bytes of shared memory, more than {SHARED_LIMIT}")
        else:
            print(f"ok    {name}  {shared // 1024} KB shared")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
