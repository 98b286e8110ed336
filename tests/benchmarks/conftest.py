import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a tokenizer, saved once per session."""
    from tests.utils import make_model, tiny_llama_config
    path = str(tmp_path_factory.mktemp("bench") / "tiny-llama")
    make_model(path, tiny_llama_config())
    return path


ENGINE_KWARGS = dict(dtype="float32", device="cpu", max_num_seqs=8,
                     max_num_batched_tokens=256, max_model_len=256)
