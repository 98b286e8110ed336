"""Property-based tests: after any sequence of add / abort / step (which finishes and
preempts), no block leaks or is freed twice, reference counts match the holders, and a
prefix-cache hit only ever happens on an identical prefix."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pagoda.core.request import RequestStatus
from tests.core.helpers import fake_output, make_request, make_scheduler

BLOCK = 4


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.s = make_scheduler(num_blocks=12, block_size=BLOCK, max_num_seqs=4, budget=16,
                                max_model_len=40)
        self.next_id = 0
        self.content: dict[int, tuple] = {}  # block id -> the tokens written into it

    @rule(prefix=st.sampled_from([(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8), (9, 9, 9, 9)]),
          tail=st.lists(st.integers(1, 6), min_size=1, max_size=14),
          max_tokens=st.integers(1, 6))
    def add(self, prefix, tail, max_tokens):
        self.s.add_request(make_request(str(self.next_id), list(prefix) + tail, max_tokens))
        self.next_id += 1

    @rule(data=st.data())
    def abort(self, data):
        if self.s.requests:
            victim = data.draw(st.sampled_from(sorted(self.s.requests)))
            self.s.finish_requests([victim], RequestStatus.FINISHED_ABORTED)

    @rule(token=st.integers(0, 6))
    def step(self, token):
        sched = self.s.schedule()
        # Writes of this step come first: a twin scheduled in the same step may hit blocks
        # that are only being written now (each layer writes K/V before it attends).
        self._record_writes(sched)
        for new in sched.scheduled_new_reqs:
            self._check_hit(new.req_id, new.block_ids, new.num_computed_tokens)
        self.s.update_from_output(sched, fake_output(self.s, sched, token))

    def _check_hit(self, req_id, block_ids, num_computed):
        tokens = self.s.requests[req_id].all_token_ids
        for i in range(num_computed // BLOCK):
            assert self.content[block_ids[i]] == tuple(tokens[i * BLOCK:(i + 1) * BLOCK]), \
                "prefix-cache hit on a block with other tokens"

    def _record_writes(self, sched):
        for req_id, n in sched.num_scheduled_tokens.items():
            req = self.s.requests[req_id]
            blocks = self.s.kv.block_ids(req_id)
            end = req.num_computed_tokens  # already advanced past this step's tokens
            for b in range((end - n) // BLOCK, -(-end // BLOCK)):
                self.content[blocks[b]] = tuple(req.all_token_ids[b * BLOCK:(b + 1) * BLOCK])

    @invariant()
    def ref_counts_match_holders(self):
        holders = Counter(b.block_id for blocks in self.s.kv.req_blocks.values() for b in blocks)
        pool = self.s.kv.pool
        for block in pool.blocks:
            assert block.ref_cnt == holders.get(block.block_id, 0)
            assert (block.ref_cnt == 0) == (block.block_id in pool.free_blocks)
        assert len(pool.free_blocks) + len(holders) == pool.num_blocks

    @invariant()
    def cache_map_is_consistent(self):
        pool = self.s.kv.pool
        for block_hash, block_id in pool.cached.items():
            assert pool.blocks[block_id].block_hash == block_hash

    @invariant()
    def only_live_requests_hold_blocks(self):
        assert set(self.s.kv.req_blocks) <= set(self.s.requests)
        for req in self.s.waiting:
            assert req.request_id not in self.s.kv.req_blocks


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None)


def test_everything_finishes_and_all_blocks_return():
    s = make_scheduler(num_blocks=10, block_size=BLOCK, max_model_len=40, budget=16)
    for i in range(12):
        s.add_request(make_request(str(i), [1 + i % 3] * (5 + i), max_tokens=6))
    for _ in range(500):
        if not s.has_unfinished_requests():
            break
        sched = s.schedule()
        s.update_from_output(sched, fake_output(s, sched))
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks() == 10
