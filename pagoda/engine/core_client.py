"""How the async front end talks to the engine core.

- `InprocClient`: the core runs in a thread of this process (tests, embedding).
- `MPClient`: the core runs in its own process (multiprocessing spawn), with msgpack messages
  over ZMQ PUSH/PULL sockets on ipc:// paths in a private temp folder. Never pickle: the
  process gets its EngineArgs as msgpack bytes.

Both expose `add_request`, `abort_requests` (non-blocking, safe to call from `finally` blocks)
and `async get_output()`, which raises EngineDeadError once the core has died."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Optional

import msgspec

from pagoda.engine.core_proc import ABORT, ADD, SHUTDOWN, CoreLoop, run_engine_core
from pagoda.engine.messages import EngineCoreAbort, EngineCoreOutputs, EngineCoreRequest

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core is gone; every in-flight and future request fails with this."""


class InprocClient:
    """The core loop in a daemon thread; outputs come back through an asyncio queue."""

    def __init__(self, config):
        from pagoda.engine.engine_core import EngineCore
        self.loop = CoreLoop(EngineCore(config))
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: Optional[asyncio.Queue] = None
        self.aio_loop: Optional[asyncio.AbstractEventLoop] = None
        self.thread: Optional[threading.Thread] = None
        self.dead: Optional[EngineDeadError] = None

    def _start(self) -> None:
        if self.thread is None:
            self.aio_loop = asyncio.get_running_loop()
            self.outbox = asyncio.Queue()
            self.thread = threading.Thread(target=self._run, name="pagoda-core", daemon=True)
            self.thread.start()

    def add_request(self, req: EngineCoreRequest) -> None:
        self._check()
        self.inbox.put((ADD, req))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self.dead is None:
            self.inbox.put((ABORT, request_ids))

    async def get_output(self) -> EngineCoreOutputs:
        self._start()
        item = await self.outbox.get()
        if isinstance(item, EngineDeadError):
            self.dead = item
            raise item
        return item

    def _check(self) -> None:
        if self.dead is not None:
            raise self.dead

    def is_alive(self) -> bool:
        return self.dead is None

    def _run(self) -> None:
        try:
            while self._drain():
                if self.loop.busy():
                    self._post(self.loop.step())
        except BaseException as exc:  # the thread is the core: its failure kills the engine
            logger.exception("engine core thread failed")
            self._post(EngineDeadError(f"engine core failed: {type(exc).__name__}: {exc}"))

    def _drain(self) -> bool:
        """Applies queued messages (blocking while idle); False on shutdown."""
        changed = False
        block = not self.loop.busy()
        while True:
            try:
                tag, payload = self.inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if tag == SHUTDOWN:
                return False
            if tag == ADD:
                self.loop.add(payload)
            else:
                self.loop.abort(payload)
            changed = True
        if changed and not self.loop.busy():
            self._post(self.loop.idle_outputs())
        return True

    def _post(self, item) -> None:
        try:
            self.aio_loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more

    def shutdown(self) -> None:
        self.inbox.put((SHUTDOWN, None))
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.loop.core.shutdown()


class MPClient:
    """Starts the engine-core process and talks to it over ZMQ."""

    def __init__(self, engine_args, startup_timeout: float = 900.0):
        import zmq
        self._zmq = zmq
        self.dead: Optional[EngineDeadError] = None
        self.closed = False
        # ipc:// paths must fit in a Unix socket address (~107 bytes): a long $TMPDIR won't.
        base = tempfile.gettempdir() if len(tempfile.gettempdir()) < 60 else "/tmp"
        self.tmpdir = tempfile.mkdtemp(prefix="pagoda-", dir=base)
        os.chmod(self.tmpdir, 0o700)  # the sockets accept anyone who can reach the path
        in_addr, out_addr = (f"ipc://{self.tmpdir}/{name}" for name in ("in", "out"))
        self.ctx = zmq.Context()
        self.input = self.ctx.socket(zmq.PUSH)
        self.output = self.ctx.socket(zmq.PULL)
        for sock, addr in ((self.input, in_addr), (self.output, out_addr)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.bind(addr)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        args = self.encoder.encode(dataclasses.asdict(engine_args))
        self.proc = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(args, in_addr, out_addr), name="PagodaEngineCore")
        self.proc.start()
        atexit.register(self.shutdown)
        self.async_output = None
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output.poll(200):
                msg = self.decoder.decode(self.output.recv())
                if msg.error:
                    self.shutdown()
                    raise RuntimeError(f"engine core failed to start: {msg.error}")
                if msg.ready:
                    return
            elif not self.proc.is_alive():
                code = self.proc.exitcode
                self.shutdown()
                raise RuntimeError(f"engine core process died during startup (exit {code})")
        self.shutdown()
        raise RuntimeError(f"engine core did not start within {timeout:.0f}s")

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid

    def _send(self, frames: list[bytes]) -> None:
        if self.dead is not None:
            raise self.dead
        try:
            self.input.send_multipart(frames, flags=self._zmq.NOBLOCK)
        except self._zmq.ZMQError as exc:
            raise self._die(f"cannot reach the engine core ({exc})")

    def add_request(self, req: EngineCoreRequest) -> None:
        self._send([ADD, self.encoder.encode(req)])

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self.dead is None:
            try:
                self._send([ABORT, self.encoder.encode(EngineCoreAbort(request_ids))])
            except EngineDeadError:
                pass  # nothing left to abort

    async def get_output(self) -> EngineCoreOutputs:
        if self.async_output is None:
            import zmq.asyncio
            self.async_output = zmq.asyncio.Socket.from_socket(self.output)
        while True:
            if self.dead is not None:
                raise self.dead
            # Poll with a timeout so a core killed without a word is noticed within ~0.5 s.
            if await self.async_output.poll(500):
                msg = self.decoder.decode(await self.async_output.recv())
                if msg.error:
                    raise self._die(f"engine core failed: {msg.error}")
                return msg
            if not self.proc.is_alive():
                raise self._die(f"engine core process died (exit code {self.proc.exitcode})")

    def _die(self, reason: str) -> EngineDeadError:
        if self.dead is None:
            logger.error("%s", reason)
            self.dead = EngineDeadError(reason)
        return self.dead

    def is_alive(self) -> bool:
        return self.dead is None and self.proc.is_alive()

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.proc.is_alive():
            try:
                self.input.send_multipart([SHUTDOWN], flags=self._zmq.NOBLOCK)
            except self._zmq.ZMQError:
                pass
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
