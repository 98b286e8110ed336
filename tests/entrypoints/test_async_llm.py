"""AsyncLLM with the in-process core client: output kinds, abort, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from pagoda.config import EngineArgs
from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.core_client import EngineDeadError
from pagoda.sampling_params import RequestOutputKind, SamplingParams

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine_args(tiny_model):
    return EngineArgs(model=tiny_model, max_model_len=256, kv_cache_memory_bytes=16 << 20)


def run(engine_args, body):
    """Runs `body(engine)` on a fresh in-process AsyncLLM inside an event loop."""
    async def main():
        engine = AsyncLLM.from_engine_args(engine_args, use_process=False, log_stats=False)
        try:
            return await body(engine)
        finally:
            engine.shutdown()
    return asyncio.run(main())


def params(kind, **kw):
    return SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, output_kind=kind,
                          **kw)


async def collect(engine, request_id, sp, prompt=PROMPT):
    return [out async for out in engine.generate(prompt, sp, request_id)]


def test_output_kinds_agree(engine_args):
    async def body(engine):
        final = await collect(engine, "f", params(RequestOutputKind.FINAL_ONLY))
        delta = await collect(engine, "d", params(RequestOutputKind.DELTA))
        cumulative = await collect(engine, "c", params(RequestOutputKind.CUMULATIVE))
        return final, delta, cumulative

    final, delta, cumulative = run(engine_args, body)
    assert len(final) == 1 and final[0].finished
    full = final[0].outputs[0]
    assert len(full.token_ids) == 12
    assert "".join(o.outputs[0].text for o in delta) == full.text
    assert [t for o in delta for t in o.outputs[0].token_ids] == full.token_ids
    assert len(delta) > 1 and delta[-1].finished and not delta[0].finished
    assert cumulative[-1].outputs[0].text == full.text
    lengths = [len(o.outputs[0].token_ids) for o in cumulative]
    assert lengths == sorted(lengths) and lengths[-1] == 12


def test_n2_delta_fans_in(engine_args):
    async def body(engine):
        sp = params(RequestOutputKind.DELTA, n=2, seed=5)
        sp.temperature = 1.0
        outs = await collect(engine, "n2", sp)
        final = await collect(engine, "n2f", SamplingParams(
            n=2, seed=5, max_tokens=12, ignore_eos=True,
            output_kind=RequestOutputKind.FINAL_ONLY))
        return outs, final

    outs, final = run(engine_args, body)
    texts = {0: "", 1: ""}
    for out in outs:
        for comp in out.outputs:
            texts[comp.index] += comp.text
    assert texts == {c.index: c.text for c in final[-1].outputs}


def _idle(engine) -> bool:
    stats = engine.last_core_stats
    return stats is not None and stats.num_running == 0 and stats.num_waiting == 0 \
        and stats.kv_cache_usage == 0.0


async def _wait_idle(engine, timeout=5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if _idle(engine):
            return True
        await asyncio.sleep(0.02)
    return False


def test_cancel_aborts_and_frees_blocks(engine_args):
    async def body(engine):
        started = asyncio.Event()

        async def consume():
            sp = SamplingParams(max_tokens=200, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
            async for _ in engine.generate(PROMPT, sp, "long"):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 30)
        assert engine.last_core_stats.num_running == 1
        assert engine.last_core_stats.kv_cache_usage > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "long" not in engine.streams
        assert await _wait_idle(engine)
        # the engine still works afterwards
        return await collect(engine, "after", params(RequestOutputKind.FINAL_ONLY))

    outs = run(engine_args, body)
    assert outs[-1].finished


def test_abort_by_id_and_break(engine_args):
    async def body(engine):
        sp = SamplingParams(max_tokens=200, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        stream = engine.add_request("a", PROMPT, sp)
        await stream.get()
        await engine.abort("a")
        assert await _wait_idle(engine)
        async for _ in engine.generate(PROMPT, sp, "b"):
            break  # leaving the loop closes the generator, which aborts
        await asyncio.sleep(0)
        assert await _wait_idle(engine)
        return engine.output_processor.parents

    assert run(engine_args, body) == {}


def test_abort_wakes_a_waiting_reader(engine_args):
    async def body(engine):
        sp = SamplingParams(max_tokens=200, ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)
        seen = []

        async def read():
            async for out in engine.generate(PROMPT, sp, "r"):
                seen.append(out)

        reader = asyncio.create_task(read())
        while not seen:
            await asyncio.sleep(0.01)
        await engine.abort("r")
        await asyncio.wait_for(reader, 5)  # ends instead of waiting forever
        assert await _wait_idle(engine)
        return seen

    seen = run(engine_args, body)
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert len(seen[-1].outputs[0].token_ids) >= len(seen[0].outputs[0].token_ids)


def test_bad_input_and_duplicate_ids(engine_args):
    async def body(engine):
        with pytest.raises(ValueError):
            engine.add_request("x", {"prompt_token_ids": [10 ** 6]}, SamplingParams())
        with pytest.raises(ValueError):
            engine.add_request("x", "a" * 2000, SamplingParams())  # longer than 256 tokens
        sp = SamplingParams(max_tokens=50, ignore_eos=True)
        engine.add_request("dup", PROMPT, sp)
        with pytest.raises(ValueError):
            engine.add_request("dup", PROMPT, sp)
        await engine.abort("dup")
        return True

    assert run(engine_args, body)


def test_core_failure_fails_requests(engine_args):
    async def body(engine):
        def boom():
            raise RuntimeError("simulated core crash")
        engine.client.loop.core.step = boom
        with pytest.raises(EngineDeadError):
            await collect(engine, "doomed", params(RequestOutputKind.DELTA))
        assert engine.errored
        with pytest.raises(EngineDeadError):
            engine.add_request("later", PROMPT, SamplingParams())
        return True

    assert run(engine_args, body)


def test_periodic_log_line_while_busy(engine_args, caplog):
    async def main():
        engine = AsyncLLM.from_engine_args(engine_args, use_process=False, log_interval=0.2)
        try:
            sp = SamplingParams(max_tokens=120, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
            with caplog.at_level("INFO", logger="pagoda.metrics"):
                await collect(engine, "busy", sp)
                await asyncio.sleep(0.5)
        finally:
            engine.shutdown()

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "pagoda.metrics"]
    assert any("generation throughput" in line and "KV cache usage" in line
               for line in lines)


def test_a_request_id_in_use_is_refused(engine_args):
    async def body(engine):
        stream = engine.add_request("same", PROMPT, params(RequestOutputKind.FINAL_ONLY))
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("same", PROMPT, params(RequestOutputKind.FINAL_ONLY))
        return [out async for out in stream]

    outputs = run(engine_args, body)
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 12


def test_aborted_final_only_request_keeps_its_text(engine_args):
    """A final-only request decodes its text at the end; aborted midway, its last output
    still carries the text of the tokens it had."""
    async def body(engine):
        sp = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0,
                            output_kind=RequestOutputKind.FINAL_ONLY)
        stream = engine.add_request("f", PROMPT, sp)
        while len(engine.output_processor.parents["f"].children[0].token_ids) < 5:
            await asyncio.sleep(0.01)
        await engine.abort("f")
        final = await stream.get()
        return final, engine.tokenizer

    final, tokenizer = run(engine_args, body)
    completion = final.outputs[0]
    assert completion.finish_reason == "abort" and len(completion.token_ids) >= 5
    assert completion.text and completion.text == tokenizer.decode(completion.token_ids)


def _delta(index, text, ids, finished=False):
    from pagoda.outputs import CompletionOutput, RequestOutput
    comp = CompletionOutput(index, text, list(ids), -1.0 * len(ids), None,
                            "length" if finished else None)
    return RequestOutput("r", "p", [1, 2], None, [comp], finished)


def test_a_reader_behind_gets_queued_deltas_folded_together():
    """Deltas queued while the reader was busy come out as one output per completion index;
    an error queued after them is raised on the next read, not lost."""
    from pagoda.engine.async_llm import RequestStream

    async def body():
        stream = RequestStream(None, "r", RequestOutputKind.DELTA)
        for item in (_delta(0, "Hel", [5]), _delta(1, "A", [9]), _delta(0, "lo", [6, 7]),
                     _delta(1, "B", [8], finished=True)):
            stream.put(item)
        merged = await stream.get()
        stream2 = RequestStream(None, "s", RequestOutputKind.DELTA)
        stream2.put(_delta(0, "x", [1]))
        stream2.put(RuntimeError("core died"))
        first = await stream2.get()
        with pytest.raises(RuntimeError, match="core died"):
            await stream2.get()
        return merged, first

    merged, first = asyncio.run(body())
    assert [(c.index, c.text, c.token_ids) for c in merged.outputs] == [
        (0, "Hello", [5, 6, 7]), (1, "AB", [9, 8])]
    assert merged.finished and merged.outputs[1].finish_reason == "length"
    assert merged.outputs[0].cumulative_logprob == -2.0  # the later value
    assert first.outputs[0].text == "x"
