"""`pagoda serve --tensor-parallel-size 2` on the CPU: the engine core spawns two ranks and
answers as the one-process server does."""

from __future__ import annotations

import openai

from tests.entrypoints.conftest import MODEL_NAME, ServerProcess


def test_tp2_server_answers_like_tp1(tiny_model, client, tmp_path):
    kwargs = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True})
    want = client.completions.create(**kwargs).choices[0].text
    server = ServerProcess(tiny_model, extra_args=["--tensor-parallel-size", "2"],
                           log_path=tmp_path / "tp2.log")
    try:
        tp2 = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                            timeout=60)
        assert tp2.completions.create(**kwargs).choices[0].text == want
        streamed = tp2.completions.create(stream=True, **kwargs)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == want
    finally:
        server.stop()
