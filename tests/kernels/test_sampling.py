"""Sort-free sampler against a sorting PyTorch reference in vLLM's order (temperature,
min_p, top-k, top-p on the renormalised survivors, then argmax(probs / q))."""

import pytest
import torch

from pagoda.kernels.sampling import sample


def ref_sample(logits, temp, top_k, top_p, min_p, q):
    out = []
    for i in range(logits.shape[0]):
        if temp[i] < 1e-5:
            out.append(int(logits[i].argmax()))
            continue
        l = logits[i].double() / float(temp[i])
        if min_p[i] > 0:
            p = torch.softmax(l, -1)
            l = l.masked_fill(p < float(min_p[i]) * p.max(), float("-inf"))
        k = int(top_k[i])
        if 0 < k < l.numel():
            kth = l.topk(k).values[-1]
            l = l.masked_fill(l < kth, float("-inf"))
        if top_p[i] < 1:
            srt, idx = torch.sort(l)  # ascending
            cum = torch.softmax(srt, -1).cumsum(-1)
            drop = cum <= 1 - float(top_p[i])
            drop[-1] = False
            l = l.clone()
            l[idx[drop]] = float("-inf")
        probs = torch.softmax(l, -1)
        out.append(int((probs / q[i].double()).argmax()))
    return torch.tensor(out)


def params(rows):
    temp = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    top_k = torch.tensor([r[1] for r in rows], dtype=torch.int32)
    top_p = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    min_p = torch.tensor([r[3] for r in rows], dtype=torch.float32)
    return temp, top_k, top_p, min_p


ROWS = [  # temperature, top_k, top_p, min_p
    (0.0, 0, 1.0, 0.0),     # greedy
    (1.0, 0, 1.0, 0.0),     # plain sampling
    (0.7, 5, 1.0, 0.0),     # top-k
    (1.3, 0, 0.8, 0.0),     # top-p
    (1.0, 0, 1.0, 0.1),     # min-p
    (0.9, 20, 0.9, 0.05),   # all three
    (2.0, 1, 1.0, 0.0),     # top-k 1 == greedy on logits
    (1.0, 400, 0.5, 0.0),   # top-k larger than the vocabulary: off
    (0.5, 3, 0.999, 0.3),   # min_p leaves fewer than k
    (1.0, 100, 0.95, 0.0),  # k above the lane count: no floor from the lane maxima
    (0.3, 0, 0.6, 0.0),     # sharp top-p alone
]


@pytest.mark.parametrize("trial", range(3))
@pytest.mark.parametrize("cap", [4096, 8])  # candidates compacted, or too many: whole row
def test_sample_matches_reference(trial, cap):
    v = 300
    temp, top_k, top_p, min_p = params(ROWS)
    logits = torch.randn(len(ROWS), v) * 3
    q = torch.empty(len(ROWS), v).exponential_()
    got = sample(logits, temp, top_k, top_p, min_p, q, block=64, cap=cap)
    want = ref_sample(logits, temp, top_k, top_p, min_p, q)
    assert torch.equal(got, want), (got, want)


def test_banned_tokens_never_sampled():
    v = 130
    temp, top_k, top_p, min_p = params([(1.0, 0, 1.0, 0.0), (1.0, 10, 0.9, 0.0),
                                        (0.0, 0, 1.0, 0.0)])
    logits = torch.randn(3, v)
    logits[:, :70] = float("-inf")  # whole first chunks banned (structured output, bad words)
    q = torch.empty(3, v).exponential_()
    got = sample(logits, temp, top_k, top_p, min_p, q, block=32)
    assert (got >= 70).all()
    assert torch.equal(got, ref_sample(logits, temp, top_k, top_p, min_p, q))


def test_sampling_distribution():
    # With fresh noise per draw the empirical frequencies follow the filtered softmax. The
    # interpreter costs ~40 ms a row, so few draws and a loose (about 3 sigma) bound.
    v, n = 8, 256
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0]]).repeat(n, 1)
    temp, top_k, top_p, min_p = params([(1.0, 4, 1.0, 0.0)] * n)
    q = torch.empty(n, v).exponential_()
    got = sample(logits, temp, top_k, top_p, min_p, q)
    freq = torch.bincount(got, minlength=v).float() / n
    want = torch.softmax(logits[0, :4], -1)
    assert freq[4:].sum() == 0
    torch.testing.assert_close(freq[:4], want, atol=0.09, rtol=0)


@pytest.mark.parametrize("chunk", [64, 8192])  # many vocabulary chunks per row, or one
def test_plain_sampling_matches_reference(chunk):
    from pagoda.kernels.sampling import sample_plain
    rows = [(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.6, 0, 1.0, 0.0), (1e-6, 0, 1.0, 0.0)]
    temp, top_k, top_p, min_p = params(rows)
    logits = torch.randn(len(rows), 1000) * 3
    logits[0, 700] = logits[0, 900] = 50.0  # a tie in two chunks: the first index wins
    logits[2, :500] = float("-inf")  # banned tokens never win
    q = torch.empty_like(logits).exponential_()
    got = sample_plain(logits, temp, q, chunk=chunk)
    assert got.tolist() == ref_sample(logits, temp, top_k, top_p, min_p, q).tolist()
    assert got[0] == 700 and got[2] >= 500
    greedy = sample_plain(logits, torch.zeros(len(rows)), None, chunk=chunk)
    assert greedy.tolist() == logits.argmax(-1).tolist()


def test_plain_sampling_with_noise_drawn_in_the_kernel():
    """q None with a seed: Philox noise in the kernel. Frequencies follow the softmax at the
    row's temperature, a seed repeats its draws, greedy rows keep the argmax, and the
    logits may be half precision."""
    from pagoda.kernels.sampling import sample_plain
    v, n = 8, 256
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0]]).repeat(n, 1)
    temp = torch.full((n,), 0.8)
    temp[:4] = 0.0
    got = sample_plain(logits.to(torch.bfloat16), temp, None, seed=1234)
    assert (got[:4] == 0).all()
    freq = torch.bincount(got[4:], minlength=v).float() / (n - 4)
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.8, -1), atol=0.09, rtol=0)
    assert torch.equal(sample_plain(logits, temp, None, seed=1234), got)
    assert not torch.equal(sample_plain(logits, temp, None, seed=1235), got)


def test_philox_noise_covers_every_column_of_ragged_chunks():
    """Four draws per Philox call, a quarter block each: over several chunks and a ragged
    tail, equal logits still give every column its own draw (uniform frequencies), and
    unequal logits follow the softmax."""
    from pagoda.kernels.sampling import sample_plain
    n, v = 256, 24  # chunks of 16: one whole, one ragged
    temp = torch.ones(n)
    got = sample_plain(torch.zeros(n, v), temp, None, chunk=16, seed=5)
    freq = torch.bincount(got, minlength=v).float() / n
    torch.testing.assert_close(freq, torch.full((v,), 1 / v), atol=0.05, rtol=0)
    logits = torch.linspace(1.0, -1.0, v).repeat(n, 1)
    freq = torch.bincount(sample_plain(logits, temp, None, chunk=16, seed=6),
                          minlength=v).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.05, rtol=0)
