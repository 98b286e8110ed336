"""GPU tests: every test here is marked `gpu` and skipped without CUDA (CI deselects them
with -m "not gpu"; benchmarks/gpu_suite.sh runs them on the H200)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the CPU emulation test runs Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Every test here is a GPU test, except the CPU emulation ones (test_cpu_*)."""
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        path = str(item.fspath).replace("\\", "/")
        if "tests/gpu/" not in path or item.name.startswith("test_cpu_"):
            continue
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_gpu_path(tmp_path_factory) -> str:
    """A tiny random Llama (fp32 checkpoint) with decisive logits, for GPU end-to-end tests."""
    from tests.utils import make_model, tiny_llama_config
    path = str(tmp_path_factory.mktemp("tiny-llama-gpu"))
    make_model(path, tiny_llama_config(num_hidden_layers=3))
    return path
