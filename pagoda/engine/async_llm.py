"""`AsyncLLM`: the asyncio front end used for online serving.

Tokenization, validation and detokenization run here, in the caller's process, so they
overlap with the engine core's work (a separate process by default). One background task
reads core outputs, turns them into RequestOutputs and routes them to per-request queues."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncGenerator, Optional

from pagoda.config import EngineArgs, EngineConfig
from pagoda.engine.core_client import EngineDeadError, InprocClient, MPClient
from pagoda.engine.parallel_sampling import fan_out
from pagoda.engine.input_processor import InputProcessor, PromptType
from pagoda.engine.messages import EngineCoreOutputs
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.tokenizer import get_tokenizer
from pagoda.metrics.loggers import LoggingStatLogger, PrometheusStatLogger
from pagoda.metrics.stats import IterationStats, RequestStatsTracker
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "RequestStream"]


class RequestStream:
    """The outputs of one request, in order; iterate it with `async for`. Ends after the
    finished output (finish_reason "abort" when aborted); raises EngineDeadError if the core
    dies first."""

    def __init__(self, engine: "AsyncLLM", request_id: str, kind: RequestOutputKind):
        self.engine = engine
        self.request_id = request_id
        self.kind = kind
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False  # the engine has let go of the request (finished or aborted)
        self.done = False  # the reader has seen the last item
        self._held = None  # taken from the queue while merging, handed out next

    def put(self, item) -> None:
        self.queue.put_nowait(item)

    async def get(self) -> RequestOutput:
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self.queue.get()
        # A reader that fell behind gets one output for all that is queued: the latest
        # cumulative one, or the deltas folded together (fewer SSE chunks and socket
        # writes exactly when the server is busiest). An exception is raised after it.
        while (self.kind != RequestOutputKind.FINAL_ONLY and not self.queue.empty()
               and not isinstance(item, BaseException) and not item.finished):
            later = self.queue.get_nowait()
            if isinstance(later, BaseException):
                self._held = later
                break
            if self.kind == RequestOutputKind.DELTA:
                item.add_delta(later)
            else:
                item = later
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.done = item.finished
        return item

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        return await self.get()

    def abort(self) -> None:
        if not self.closed:
            self.engine.abort_now([self.request_id])


class AsyncLLM:
    def __init__(self, config: EngineConfig, engine_args: Optional[EngineArgs] = None,
                 use_process: bool = True, log_stats: bool = True,
                 log_interval: float = 5.0):
        self.config = config
        self.model_config = config.model_config
        self.tokenizer = get_tokenizer(config.model_config)
        self.input_processor = InputProcessor(config.model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.model_name = config.model_config.served_model_name or config.model_config.model
        if use_process:
            if engine_args is None:
                raise ValueError("use_process=True needs the EngineArgs to start the core")
            self.client = MPClient(engine_args)
        else:
            self.client = InprocClient(config)
        self.streams: dict[str, RequestStream] = {}
        self.request_stats = RequestStatsTracker()
        self.prometheus = PrometheusStatLogger(self.model_name, self.model_config.max_model_len)
        self.log_stats = log_stats
        self.log_interval = log_interval
        self.stat_logger = LoggingStatLogger(log_interval)
        self.last_core_stats = None
        self.dead_error: Optional[EngineDeadError] = None
        self._tasks: list[asyncio.Task] = []

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, use_process: bool = True,
                         **kwargs) -> "AsyncLLM":
        if engine_args.model is None:  # as LLM(): no model named means the default one
            from pagoda.model_loader.default_model import default_model_path
            engine_args = dataclasses.replace(engine_args, model=default_model_path())
        return cls(engine_args.create_engine_config(), engine_args, use_process, **kwargs)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: Optional[float] = None) -> RequestStream:
        """Validates (ValueError on bad input, before anything is queued) and submits."""
        if self.dead_error is not None:
            raise self.dead_error
        self._start_tasks()
        req, prompt_text = self.input_processor.process(request_id, prompt, params,
                                                        arrival_time)
        core_reqs = fan_out(req, prompt_text, self.output_processor)  # rejects a reused id
        stream = RequestStream(self, request_id, params.output_kind)
        self.streams[request_id] = stream
        try:
            for core_req in core_reqs:
                self.request_stats.add(core_req.request_id, req.arrival_time,
                                       len(req.prompt_token_ids))
                self.client.add_request(core_req)
        except EngineDeadError:
            self.abort_now([request_id])
            raise
        return stream

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str, arrival_time: Optional[float] = None
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Yields RequestOutputs per `sampling_params.output_kind`. Leaving the loop early
        (break, cancellation, a closed connection) aborts the request and frees its blocks."""
        stream = self.add_request(request_id, prompt, sampling_params, arrival_time)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()  # synchronous on purpose: it must run even in a dying task

    async def abort(self, request_id: str) -> None:
        self.abort_now([request_id])

    def abort_now(self, request_ids: list[str]) -> None:
        """Aborts in the core (freeing KV blocks) and ends each stream with a final output
        whose unfinished samples say "abort", so a reader waiting on it wakes up."""
        it = IterationStats()
        core_ids = []
        for request_id in request_ids:
            core_ids += self.output_processor.core_ids_of(request_id)
            stream = self.streams.pop(request_id, None)
            if stream is not None:
                stream.closed = True
                final = self._aborted_output(request_id, stream.kind)
                if final is not None:
                    stream.put(final)
        to_abort = self.output_processor.abort(request_ids)
        for core_id in core_ids:
            self.request_stats.finish(core_id, "abort", it)
        self.prometheus.record(None, it)
        self.client.abort_requests(to_abort)

    def _aborted_output(self, request_id: str, kind: RequestOutputKind
                        ) -> Optional[RequestOutput]:
        parent = self.output_processor.parents.get(request_id)
        if parent is None:
            return None
        delta = kind == RequestOutputKind.DELTA
        completions = [CompletionOutput(
            c.index, "" if delta else c.text_so_far(), [] if delta else list(c.token_ids),
            c.cumulative_logprob, None if delta or c.logprobs is None else list(c.logprobs),
            c.finish_reason or "abort", c.stop_reason)
            for _, c in sorted(parent.children.items())]
        return RequestOutput(request_id, parent.prompt, parent.prompt_token_ids,
                             parent.prompt_logprobs, completions, True,
                             parent.num_cached_tokens, parent.metrics)

    # -- the output loop --------------------------------------------------------------------
    def _start_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks.append(loop.create_task(self._output_loop(), name="pagoda-outputs"))
            if self.log_stats:
                self._tasks.append(loop.create_task(self._log_loop(), name="pagoda-stats"))

    async def _output_loop(self) -> None:
        try:
            while True:
                self._handle_batch(await self.client.get_output())
        except EngineDeadError as exc:
            self._fail_all(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here would hang every request: fail them instead
            logger.exception("output loop failed")
            self._fail_all(EngineDeadError(f"front-end output loop failed: {exc}"))

    def _handle_batch(self, batch: EngineCoreOutputs) -> None:
        it = self.request_stats.on_outputs(batch)
        outputs, to_abort = self.output_processor.process_outputs(batch.outputs)
        for core_id in to_abort:  # stopped by a stop string: the core must drop it
            self.request_stats.finish(core_id, "stop", it)
        if to_abort:
            self.client.abort_requests(to_abort)
        for output in outputs:
            stream = self.streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self.streams[output.request_id]
                stream.closed = True
            stream.put(output)
        if batch.stats is not None:
            self.last_core_stats = batch.stats
        self.prometheus.record(batch.stats, it)
        self.stat_logger.record(batch.stats, it)

    def _fail_all(self, exc: EngineDeadError) -> None:
        self.dead_error = exc
        for stream in self.streams.values():
            stream.closed = True
            stream.put(exc)
        self.streams.clear()

    async def _log_loop(self) -> None:
        while True:
            await asyncio.sleep(self.log_interval)
            self.stat_logger.log()

    # -- state ------------------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        return self.dead_error is not None or not self.client.is_alive()

    async def check_health(self) -> None:
        if self.errored:
            raise self.dead_error or EngineDeadError("engine core is not running")

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def core_pid(self) -> Optional[int]:
        return getattr(self.client, "pid", None)

    def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.client.shutdown()
