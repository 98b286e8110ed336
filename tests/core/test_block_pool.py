import pytest

from pagoda.core.block_pool import BlockPool, hash_block_tokens


def test_allocate_free_lru_order():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.num_free_blocks() == 2
    pool.cache_block(a, hash_block_tokens(None, [1, 2]))
    pool.free([b, a])
    # the unhashed block is reused first; the cached one waits at the tail
    assert [blk.block_id for blk in pool.allocate(3)] == [b.block_id, 2, 3]
    assert pool.get_cached_block(hash_block_tokens(None, [1, 2])) is a


def test_touching_a_free_cached_block_takes_it_off_the_free_list():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    h = hash_block_tokens(None, [5])
    pool.cache_block(a, h)
    pool.free([a])
    assert pool.num_free_blocks() == 2
    pool.touch([pool.get_cached_block(h)])
    assert a.ref_cnt == 1 and pool.num_free_blocks() == 1


def test_eviction_forgets_the_hash():
    pool = BlockPool(1)
    (a,) = pool.allocate(1)
    h = hash_block_tokens(None, [5])
    pool.cache_block(a, h)
    pool.free([a])
    pool.allocate(1)
    assert pool.get_cached_block(h) is None and a.block_hash is None


def test_double_free_is_an_error():
    pool = BlockPool(1)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(RuntimeError):
        pool.free([a])


def test_over_allocation_is_refused():
    with pytest.raises(ValueError):
        BlockPool(2).allocate(3)


def test_hash_chains_parent_tokens_and_extra_keys():
    h1 = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(h1, [3]) != hash_block_tokens(None, [3])
    assert hash_block_tokens(None, [1, 2], "salt") != h1
    assert hash_block_tokens(None, [1, 2]) == h1
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
