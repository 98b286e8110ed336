"""When kernels are launched with programmatic dependent launch (kernels/pdl.py)."""

from __future__ import annotations

import torch

from pagoda.kernels import pdl


def test_pdl_only_on_hopper_cuda_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(pdl, "_supported", lambda index: index == 0)  # GPU 0 is sm90+
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PAGODA_PDL", raising=False)
    assert pdl.launch_args(torch.device("cuda", 0)) == {"USE_PDL": True, "launch_pdl": True}
    assert pdl.launch_args(torch.device("cuda", 1)) == {"USE_PDL": False}
    assert pdl.launch_args(torch.device("cpu")) == {"USE_PDL": False}
    monkeypatch.setenv("PAGODA_PDL", "0")
    assert not pdl.enabled(torch.device("cuda", 0))
    monkeypatch.delenv("PAGODA_PDL")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.enabled(torch.device("cuda", 0))
