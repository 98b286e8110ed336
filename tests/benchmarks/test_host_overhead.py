"""benchmarks/host_overhead.py runs the real scheduler and output processor with no model."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_host_overhead_measures_each_part(tiny_llama_path):
    from transformers import AutoTokenizer
    spec = importlib.util.spec_from_file_location(
        "host_overhead", os.path.join(ROOT, "benchmarks", "host_overhead.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.measure(AutoTokenizer.from_pretrained(tiny_llama_path), batch=8, steps=20)
    assert set(figures) == {"schedule", "update", "outputs"}
    assert all(0 < ms < 1000 for ms in figures.values())
