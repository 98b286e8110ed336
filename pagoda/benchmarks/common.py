"""Shared pieces of the offline benchmarks: engine flags, model preparation, JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Optional

from pagoda.config import EngineArgs

# EngineArgs fields exposed as flags, with their types (bool fields get --x/--no-x).
_ENGINE_FLAGS: dict[str, type] = {
    "model": str, "tokenizer": str, "dtype": str, "seed": int, "max_model_len": int,
    "block_size": int, "enable_prefix_caching": bool, "max_num_seqs": int,
    "max_num_batched_tokens": int, "gpu_memory_utilization": float,
    "num_gpu_blocks_override": int, "kv_cache_memory_bytes": int, "enforce_eager": bool,
    "load_format": str, "skip_tokenizer_init": bool, "device": str,
    "tensor_parallel_size": int,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "vocab.json")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per engine argument, named as vLLM's (--max-num-seqs, ...); defaults come
    from EngineArgs. --model also accepts a config.json file (then load_format is dummy)."""
    defaults = {f.name: f.default for f in dataclasses.fields(EngineArgs)
                if f.default is not dataclasses.MISSING}
    group = parser.add_argument_group("engine arguments (pagoda backend)")
    for name, kind in _ENGINE_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        default = defaults.get(name)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            group.add_argument(flag, type=kind, default=default,
                               help=f"(default: {default})")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _ENGINE_FLAGS if hasattr(args, name)}


def prepare_model(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A `model` that is a config .json file becomes a folder holding it as config.json,
    loaded with dummy weights; a folder without tokenizer files skips tokenizer init."""
    kwargs = dict(kwargs)
    model = kwargs.get("model")
    if not model:
        from pagoda.model_loader.default_model import default_model_path
        model = kwargs["model"] = default_model_path()
    if model and model.endswith(".json") and os.path.isfile(model):
        folder = tempfile.mkdtemp(prefix="pagoda-bench-model-")
        shutil.copyfile(model, os.path.join(folder, "config.json"))
        kwargs["model"] = folder
        kwargs["load_format"] = "dummy"
        model = folder
    if model and os.path.isdir(model) and not any(
            os.path.exists(os.path.join(model, f)) for f in _TOKENIZER_FILES):
        kwargs["skip_tokenizer_init"] = True
    return kwargs


def make_llm(kwargs: dict[str, Any]):
    from pagoda.entrypoints.llm import LLM
    kwargs = prepare_model(kwargs)
    model = kwargs.pop("model", None)
    return LLM(model, **kwargs)


def engine_vocab_size(llm) -> int:
    return llm.engine.config.model_config.vocab_size


def write_json(path: Optional[str], data: dict) -> None:
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    print(f"{'=' * 15} {title} {'=' * 15}")
    for name, value in rows:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{name + ':':<44}{shown:>12}")
    print("=" * (32 + len(title)))


def wait_healthy(url: str, proc, timeout: float = 180.0) -> None:
    """Waits until a `pagoda serve` at `url` answers /health with 200; raises if the process
    `proc` exits first or the time runs out."""
    import time

    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pagoda serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"pagoda serve at {url} did not answer /health in {timeout:.0f} s")


def stop_process(proc, timeout: float = 20.0) -> None:
    """SIGTERM a server process (it shuts its engine core down), SIGKILL it if it is still
    there after `timeout`, and reap it."""
    import subprocess
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
