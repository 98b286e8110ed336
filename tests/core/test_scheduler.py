from pagoda.core.request import RequestStatus
from tests.core.helpers import EOS, make_request, make_scheduler, step


def test_token_budget_chunks_a_long_prompt():
    s = make_scheduler(budget=8, max_model_len=64, num_blocks=32)
    s.add_request(make_request("a", list(range(1, 21))))
    sizes = []
    for _ in range(3):
        sched, _ = step(s)
        sizes.append(sched.num_scheduled_tokens["a"])
    assert sizes == [8, 8, 4]
    assert s.requests["a"].num_output_tokens == 1


def test_running_requests_come_first_then_waiting_fcfs():
    s = make_scheduler(budget=10, num_blocks=32)
    s.add_request(make_request("a", [1] * 6))
    s.add_request(make_request("b", [2] * 6))
    sched, _ = step(s)
    assert sched.num_scheduled_tokens == {"a": 6, "b": 4}
    sched, _ = step(s)
    assert sched.num_scheduled_tokens == {"a": 1, "b": 2}


def test_max_num_seqs_caps_the_batch():
    s = make_scheduler(max_num_seqs=2, num_blocks=32)
    for i in range(3):
        s.add_request(make_request(str(i), [i + 1] * 3))
    sched, _ = step(s)
    assert set(sched.num_scheduled_tokens) == {"0", "1"}


def test_prefix_cache_hit_skips_the_shared_blocks():
    s = make_scheduler(block_size=4, num_blocks=32)
    prompt = list(range(1, 14))
    s.add_request(make_request("a", prompt, max_tokens=1))
    step(s)
    assert "a" not in s.requests  # finished after one token
    s.add_request(make_request("b", prompt + [99], max_tokens=1))
    sched, _ = step(s)
    assert sched.scheduled_new_reqs[0].num_computed_tokens == 12
    assert sched.num_scheduled_tokens["b"] == 2


def test_full_prompt_hit_still_computes_the_last_token():
    s = make_scheduler(block_size=4, num_blocks=32)
    prompt = list(range(1, 9))
    for name in ("a", "b"):
        s.add_request(make_request(name, prompt, max_tokens=1))
        sched, _ = step(s)
    assert sched.scheduled_new_reqs[0].num_computed_tokens == 4
    assert sched.num_scheduled_tokens["b"] == 4


def test_requests_in_one_step_share_blocks():
    """Blocks are cached when allocated, so a twin scheduled in the same step hits them."""
    s = make_scheduler(block_size=4, num_blocks=32)
    prompt = list(range(1, 10))
    s.add_request(make_request("a", prompt))
    s.add_request(make_request("b", prompt))
    sched, _ = step(s)
    assert sched.num_scheduled_tokens == {"a": 9, "b": 1}
    assert s.kv.block_ids("a")[:2] == s.kv.block_ids("b")[:2]


def test_preemption_frees_the_newest_and_recomputes_it():
    s = make_scheduler(block_size=4, num_blocks=5, max_model_len=20, budget=64)
    s.add_request(make_request("a", [1] * 8, max_tokens=8))
    s.add_request(make_request("b", [2] * 8, max_tokens=8))
    step(s)
    preempted = False
    for _ in range(30):
        sched, _ = step(s)
        preempted |= s.num_preemptions > 0
        if not s.has_unfinished_requests():
            break
    assert preempted
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks() == 5


def test_eos_stop_token_and_length():
    s = make_scheduler(num_blocks=32)
    s.add_request(make_request("eos", [1, 2], max_tokens=5))
    _, outs = step(s, token=EOS)
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason is None
    s.add_request(make_request("stop", [1, 2], max_tokens=5, stop_token_ids=[7]))
    _, outs = step(s, token=7)
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == 7
    s.add_request(make_request("len", [1, 2], max_tokens=2))
    step(s)
    _, outs = step(s)
    assert outs[0].finish_reason == "length"


def test_min_tokens_and_ignore_eos_defer_eos():
    s = make_scheduler(num_blocks=32)
    s.add_request(make_request("a", [1, 2], max_tokens=5, min_tokens=2))
    _, outs = step(s, token=EOS)
    assert outs[0].finish_reason is None
    _, outs = step(s, token=EOS)
    assert outs[0].finish_reason == "stop"
    s.add_request(make_request("b", [1, 2], max_tokens=2, ignore_eos=True))
    step(s, token=EOS)
    _, outs = step(s, token=EOS)
    assert outs[0].finish_reason == "length"


def test_abort_frees_blocks_and_tells_the_runner():
    s = make_scheduler(num_blocks=8)
    s.add_request(make_request("a", [1] * 10))
    step(s)
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.pool.num_free_blocks() == 8
    assert not s.has_unfinished_requests()
    assert "a" in s.schedule().finished_req_ids


def test_max_model_len_caps_generation():
    s = make_scheduler(num_blocks=32, max_model_len=6)
    s.add_request(make_request("a", [1] * 4, max_tokens=100))
    outs = []
    while s.has_unfinished_requests():
        outs += step(s)[1]
    assert outs[-1].finish_reason == "length"
    assert sum(len(o.new_token_ids) for o in outs) == 2


def test_longrope_request_restarts_when_it_outgrows_the_original_context():
    """Past rope_long_after a request is recomputed from its first token (long rope factors)
    in the same step, without counting as a preemption, and its blocks are hashed apart from
    the short-factor ones."""
    s = make_scheduler(block_size=4, num_blocks=32)
    s.config.rope_long_after = 6
    s.add_request(make_request("a", [1, 2, 3, 4, 5], max_tokens=8))
    sched, _ = step(s)  # prefill: 5 tokens, short factors; samples token 6
    assert not s.requests["a"].rope_long
    sched, _ = step(s)  # the 6th token: still within the original context
    assert sched.num_scheduled_tokens == {"a": 1}
    short_hashes = list(s.requests["a"].block_hashes)
    sched, _ = step(s)  # 7 tokens now: recomputed from the start
    assert "a" in sched.finished_req_ids  # the runner drops its rows and starts over
    assert [d.req_id for d in sched.scheduled_new_reqs] == ["a"]
    assert sched.scheduled_new_reqs[0].num_computed_tokens == 0
    assert sched.num_scheduled_tokens == {"a": 7}
    request = s.requests["a"]
    assert request.rope_long and s.num_preemptions == 0
    assert request.block_hashes[0] != short_hashes[0]  # same tokens, other rope mode
    sched, _ = step(s)
    assert sched.num_scheduled_tokens == {"a": 1} and not sched.scheduled_new_reqs


def test_longrope_prompt_longer_than_the_original_starts_long():
    s = make_scheduler(block_size=4, num_blocks=32)
    s.config.rope_long_after = 6
    s.add_request(make_request("a", list(range(1, 11)), max_tokens=3))
    sched, _ = step(s)
    assert s.requests["a"].rope_long and sched.num_scheduled_tokens == {"a": 10}
    sched, _ = step(s)
    assert sched.num_scheduled_tokens == {"a": 1} and "a" not in sched.finished_req_ids
