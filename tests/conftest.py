import os

# Triton chooses its interpreter when it is first imported, and torch or transformers may
# import it long before tests/kernels runs: decide here, first. Without a GPU, every Triton
# kernel runs through the interpreter.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
