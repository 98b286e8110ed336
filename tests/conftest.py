import os

# Triton chooses its interpreter when it is first imported, and torch or transformers may
# import it long before tests/kernels runs: decide here, first. Without a GPU, every Triton
# kernel runs through the interpreter.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# GGUF conversions (pagoda/model_loader/gguf_loader.py) are cached on disk: tests keep theirs
# in a folder of their own, not in the user's ~/.cache/pagoda (server subprocesses inherit it).
if "PAGODA_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["PAGODA_CACHE_DIR"] = tempfile.mkdtemp(prefix="pagoda-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PAGODA_CACHE_DIR"], ignore_errors=True)

import pytest

from tests.utils import make_model, tiny_llama_config


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> str:
    """A tiny random Llama checkpoint with a trained byte-level BPE tokenizer."""
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    make_model(path, tiny_llama_config())
    return path


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_path):
    from pagoda import LLM
    return LLM(tiny_llama_path, dtype="float32", max_model_len=256)
