"""Triton kernels. Each module imports triton itself, so importing this package stays cheap
and works where triton is absent (the CPU path never needs it).

Entry points (all CUDA-graph safe: no host sync, grids from host-side sizes only):
  kv_cache.write_kv_cache(k, v, kv_cache, slot_mapping)            slot -1 = skip
  paged_attention.paged_attention(q, key, value, out, ...)          prefill/chunked/decode
  layernorm.rms_norm(x, w, eps); layernorm.fused_add_rms_norm(x, residual, w, eps)
  rotary.apply_rotary(positions, q, k, cos_sin_cache, is_neox)      in place
  activation.silu_and_mul(x); activation.gelu_and_mul(x, approximate)
  sampling.sample(logits, temperature, top_k, top_p, min_p, q)      -> int64 ids
"""
