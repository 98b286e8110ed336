"""Kernel tests run on the CPU through Triton's interpreter at tiny fp32 shapes."""

import os

# The interpreter must be chosen before triton is first imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    import triton  # noqa: F401,E402
except Exception:  # triton is an optional test dependency: skip the whole folder cleanly
    triton = None

collect_ignore_glob = [] if triton is not None else ["test_*.py"]


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)  # random data, but a failure reproduces
