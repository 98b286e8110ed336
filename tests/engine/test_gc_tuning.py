"""The server processes' collector settings (pagoda/gc_tuning.py)."""

from __future__ import annotations

import gc

import pytest

from pagoda.gc_tuning import freeze_startup_heap


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_freeze_and_young_threshold(restore_gc, monkeypatch):
    monkeypatch.delenv("PAGODA_GC_FREEZE", raising=False)
    start = gc.get_threshold()
    freeze_startup_heap()  # the engine core: freeze only
    assert gc.get_freeze_count() > 0 and gc.get_threshold() == start
    freeze_startup_heap(12_345)  # the API server
    assert gc.get_threshold() == (12_345, *start[1:])


def test_opt_out(restore_gc, monkeypatch):
    monkeypatch.setenv("PAGODA_GC_FREEZE", "0")
    gc.unfreeze()
    start = gc.get_threshold()
    freeze_startup_heap(12_345)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == start
