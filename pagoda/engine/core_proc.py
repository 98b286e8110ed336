"""The engine core's busy loop: take requests in, step (schedule -> execute -> update), send
outputs out. `CoreLoop` is the transport-free part, shared by the in-process client (a thread)
and `run_engine_core`, the main function of the engine-core process behind ZMQ."""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback

import msgspec

from pagoda.engine.messages import (EngineCoreAbort, EngineCoreOutputs, EngineCoreRequest,
                                    EngineCoreStats)
from pagoda.gc_tuning import freeze_startup_heap

logger = logging.getLogger(__name__)

# Frame tags of the front end -> core messages (a multipart [tag, msgpack payload]).
ADD, ABORT, SHUTDOWN = b"ADD", b"ABORT", b"SHUTDOWN"
_IDLE_POLL_MS = 500  # how often an idle core checks that its parent is still alive


class CoreLoop:
    """Wraps an EngineCore; every step yields one EngineCoreOutputs with the scheduler's state."""

    def __init__(self, core):
        self.core = core
        # Requests not yet scheduled: their first scheduling time feeds the queue-time metric,
        # which the front end cannot see by itself.
        self.unscheduled: set[str] = set()

    def add(self, req: EngineCoreRequest) -> None:
        self.core.add_request(req)
        self.unscheduled.add(req.request_id)

    def abort(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)
        self.unscheduled.difference_update(request_ids)

    def busy(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        start = time.time()
        outputs = self.core.step()
        return EngineCoreOutputs(outputs, self.stats(), self._newly_scheduled(start))

    def idle_outputs(self) -> EngineCoreOutputs:
        """No step to run, but the state changed (an abort freed blocks): report it."""
        return EngineCoreOutputs([], self.stats())

    def stats(self) -> EngineCoreStats:
        return self.core.stats()

    def _newly_scheduled(self, step_start: float) -> dict[str, float]:
        if not self.unscheduled:
            return {}
        requests = self.core.scheduler.requests
        result = {}
        for req_id in list(self.unscheduled):
            request = requests.get(req_id)
            when = getattr(request, "first_scheduled_time", None)
            if request is None or when is not None:
                # Gone already: it was scheduled and finished within this very step.
                result[req_id] = when or step_start
                self.unscheduled.discard(req_id)
        return result


def run_engine_core(engine_args: bytes, input_addr: str, output_addr: str) -> None:
    """Main of the engine-core process. `engine_args` is EngineArgs as msgpack, so nothing
    but plain bytes and strings crosses the process boundary."""
    import zmq

    from pagoda.config import EngineArgs
    from pagoda.engine.engine_core import EngineCore

    logging.basicConfig(level=logging.INFO,
                        format="(EngineCore pid=%(process)d) %(levelname)s %(message)s")
    # Ctrl-C goes to the whole process group: the front end shuts us down in order instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    ctx = zmq.Context()
    inp, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock, addr in ((inp, input_addr), (out, output_addr)):
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        args = EngineArgs(**msgspec.msgpack.decode(engine_args))
        loop = CoreLoop(EngineCore(args.create_engine_config()))
        freeze_startup_heap()
        out.send(encoder.encode(EngineCoreOutputs(stats=loop.stats(), ready=True)))
        _busy_loop(loop, inp, out, encoder)
    except SystemExit:
        pass
    except BaseException as exc:  # tell the front end why before dying
        logger.error("engine core failed:\n%s", traceback.format_exc())
        out.send(encoder.encode(EngineCoreOutputs(error=f"{type(exc).__name__}: {exc}")))
        out.close(linger=1000)
        os._exit(1)
    finally:
        ctx.destroy(linger=1000)


def _exit_on_signal(*_) -> None:
    raise SystemExit(0)  # unwinds through `finally`, closing the sockets


def _busy_loop(loop: CoreLoop, inp, out, encoder) -> None:
    import zmq
    parent = os.getppid()
    add_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
    abort_decoder = msgspec.msgpack.Decoder(EngineCoreAbort)
    while True:
        changed = False
        # Busy: only peek at the socket between steps; idle: block (with a timeout so an
        # orphaned core notices its parent is gone and exits).
        if inp.poll(0 if loop.busy() else _IDLE_POLL_MS):
            while True:
                try:
                    frames = inp.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                tag = frames[0]
                if tag == SHUTDOWN:
                    return
                if tag == ADD:
                    loop.add(add_decoder.decode(frames[1]))
                elif tag == ABORT:
                    loop.abort(abort_decoder.decode(frames[1]).request_ids)
                changed = True
        elif os.getppid() != parent:
            logger.warning("front-end process is gone; engine core exits")
            return
        if loop.busy():
            out.send(encoder.encode(loop.step()))
        elif changed:
            out.send(encoder.encode(loop.idle_outputs()))
