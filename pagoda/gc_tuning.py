"""Garbage-collector settings for the long-running processes (API server, engine core).

Everything alive after start-up (model modules, tokenizer, the web app) lives until the
process ends, yet every full collection walks it again; freezing it takes it out of the
collector's reach. The API server also allocates many short-lived objects per token (pydantic
models, SSE chunks, outputs), so young collections ran often: py-spy at 256 streams put ~18%
of its samples on allocation sites. With the heap frozen and young collections every 20,000
allocations instead of 700, those samples were gone and a trivial model served 8,051-8,905
output tok/s instead of 6,178-7,201 on the 2-core development machine (docs/benchmarks.md).
The offline engine (`LLM`) runs in the user's process and keeps its settings; there the change
measured nothing.
"""

from __future__ import annotations

import gc
import os
from typing import Optional

SERVER_GEN0_THRESHOLD = 20_000


def freeze_startup_heap(gen0_threshold: Optional[int] = None) -> None:
    """Call once start-up is done. PAGODA_GC_FREEZE=0 leaves the collector as it was."""
    if os.environ.get("PAGODA_GC_FREEZE", "1") == "0":
        return
    gc.collect()
    gc.freeze()
    if gen0_threshold is not None:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
