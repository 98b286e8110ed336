"""Tensor parallelism on one machine: one worker process per rank (per GPU, or per CPU share).

Every rank holds its slice of the weights (the linear layers' weight loaders cut them) and of
the KV heads, runs the same step and meets the others in the all-reduces of the row-parallel
layers and the all-gather of the LM head (torch.distributed: NCCL on GPUs, gloo on the CPU).
All ranks see identical logits and draw from identically seeded generators, so they sample
the same tokens and their per-request state stays the same; rank 0's result is returned.

The executor talks to the workers over pipes with msgspec-encoded messages (no pickle on the
step path): the scheduler output goes to every rank, and every rank answers, so a failure on
any rank surfaces here instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import traceback

import msgspec

from pagoda.config import EngineConfig
from pagoda.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagoda.netutil import free_port

logger = logging.getLogger(__name__)

_STOP = b"stop"
_STEP_TIMEOUT_S = 600.0  # a rank that answers nothing for this long is taken as dead


class _Reply(msgspec.Struct):
    ok: bool
    error: str = ""
    num_blocks: int = 0
    output: bytes = b""  # rank 0's msgpack-encoded ModelRunnerOutput
    sampled: list[list[int]] = []  # every rank's sampled ids, to catch a divergence


class MultiprocExecutor:
    def __init__(self, config: EngineConfig):
        self.world_size = config.parallel_config.tensor_parallel_size
        port = free_port()
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(self.world_size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(config, rank, self.world_size, port,
                                                          theirs),
                               name=f"pagoda-tp{rank}", daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        self._encoder = msgspec.msgpack.Encoder()
        self._reply_decoder = msgspec.msgpack.Decoder(_Reply)
        self._output_decoder = msgspec.msgpack.Decoder(ModelRunnerOutput)
        try:
            # Every rank sizes its own KV cache; all use the smallest count.
            self.num_blocks = min(reply.num_blocks for reply in self._gather())
            self._broadcast(self._encoder.encode(self.num_blocks))
            self._gather()  # caches allocated (and CUDA graphs captured) everywhere
        except BaseException:
            self.shutdown()  # no rank outlives a failed start
            raise

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._broadcast(self._encoder.encode(sched))
        replies = self._gather()
        # Ranks keep their own copy of every request's tokens: one that sampled differently
        # would go on computing another sequence, so that is an error, not a warning.
        for rank, reply in enumerate(replies[1:], start=1):
            if reply.sampled != replies[0].sampled:
                raise RuntimeError(f"tensor-parallel rank {rank} sampled other tokens than rank 0")
        return self._output_decoder.decode(replies[0].output)

    def shutdown(self) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(_STOP)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    def _broadcast(self, payload: bytes) -> None:
        for conn in self.conns:
            conn.send_bytes(payload)

    def _gather(self) -> list[_Reply]:
        """Every rank's reply, in rank order. Replies are taken as they come, so a rank that
        fails is reported at once even while the others wait for it inside a collective."""
        replies: dict[int, _Reply] = {}
        pending = dict(enumerate(self.conns))
        while pending:
            ready = multiprocessing.connection.wait(list(pending.values()), _STEP_TIMEOUT_S)
            if not ready:
                raise RuntimeError(f"tensor-parallel ranks {sorted(pending)} did not answer")
            for rank in [r for r, conn in pending.items() if conn in ready]:
                replies[rank] = self._receive(rank, pending.pop(rank))
        return [replies[rank] for rank in range(len(self.conns))]

    def _receive(self, rank: int, conn) -> _Reply:
        try:
            reply = self._reply_decoder.decode(conn.recv_bytes())
        except EOFError:
            raise RuntimeError(
                f"tensor-parallel rank {rank} exited. Ranks are started with "
                "multiprocessing spawn, so a script that creates the engine needs an "
                "`if __name__ == '__main__':` guard") from None
        if not reply.ok:
            last = reply.error.strip().splitlines()[-1] if reply.error.strip() else "?"
            raise RuntimeError(f"tensor-parallel rank {rank} failed: {last}\n{reply.error}")
        return reply


def _worker_main(config: EngineConfig, rank: int, world_size: int, port: int, conn) -> None:
    """One rank: join the process group, build its slice of the model, then serve steps."""
    encoder = msgspec.msgpack.Encoder()

    def reply(**fields) -> None:
        conn.send_bytes(encoder.encode(_Reply(ok=True, **fields)))

    try:
        worker = _start_worker(config, rank, world_size, port)
        reply(num_blocks=worker.determine_num_blocks())
        worker.initialize_kv_cache(msgspec.msgpack.decode(conn.recv_bytes(), type=int))
        reply()
        decoder = msgspec.msgpack.Decoder(SchedulerOutput)
        while True:
            payload = conn.recv_bytes()
            if payload == _STOP:
                break
            output = worker.execute_model(decoder.decode(payload))
            reply(output=encoder.encode(output) if rank == 0 else b"",
                  sampled=output.sampled_token_ids)
    except (EOFError, KeyboardInterrupt):
        pass  # the executor went away
    except BaseException:
        try:
            conn.send_bytes(encoder.encode(_Reply(ok=False, error=traceback.format_exc())))
        except (BrokenPipeError, OSError):
            pass


def _start_worker(config: EngineConfig, rank: int, world_size: int, port: int):
    import torch
    import torch.distributed as dist

    from pagoda.distributed.parallel_state import init_tensor_parallel
    from pagoda.platform import distributed_backend
    from pagoda.worker.worker import Worker

    if config.device.type == "cuda":
        torch.cuda.set_device(rank)
        config = dataclasses.replace(config, device=torch.device("cuda", rank))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    dist.init_process_group(distributed_backend(config.device), rank=rank,
                            world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
    init_tensor_parallel(world_size, rank)
    return Worker(config)
