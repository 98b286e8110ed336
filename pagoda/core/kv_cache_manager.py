"""Maps requests to KV blocks: prefix-cache lookup, slot allocation, caching and freeing."""

from __future__ import annotations

from typing import Optional

from pagoda.core.block_pool import BlockPool, KVBlock, hash_block_tokens
from pagoda.core.request import Request


def _first_block_key(request: Request) -> Optional[str]:
    """Extra key of a request's first block hash (the chain carries it to every block): its
    cache salt, and the rope mode, so KV computed with longrope's long factors is never
    shared with a request computed with the short ones."""
    if not request.rope_long:
        return request.cache_salt
    return (request.cache_salt or "") + "\x00rope:long"


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks already hashed

    # -- prefix cache -----------------------------------------------------------------
    def update_block_hashes(self, request: Request) -> None:
        """Extends the request's hash chain over every full block of its tokens."""
        size = self.block_size
        hashes = request.block_hashes
        while (len(hashes) + 1) * size <= request.num_tokens:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else None
            extra = _first_block_key(request) if not hashes else None
            hashes.append(hash_block_tokens(parent, request.all_token_ids[start:start + size],
                                            extra))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of full blocks. At least one token is always left to
        compute, because the last prompt position's logits are needed to sample."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.pool.num_queries += request.num_tokens
        self.pool.num_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # -- allocation ---------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Optional[list[KVBlock]] = None
                       ) -> Optional[list[KVBlock]]:
        """Makes room for `num_new_tokens` more tokens; returns the newly allocated blocks, or
        None (nothing changed) when the pool cannot supply them."""
        blocks = self.req_blocks.get(request.request_id, [])
        if not new_computed_blocks:
            # The common decode step: the token lands in a block the request already holds
            # and fills none, so there is nothing to allocate or hash (~8 us of Python saved
            # per running request per step).
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(blocks) * self.block_size and (
                    not self.enable_caching or min(total, request.num_tokens) // self.block_size
                    <= self.num_cached_blocks.get(request.request_id, 0)):
                return []
        new_computed_blocks = new_computed_blocks or []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_required = -(-total // self.block_size)
        num_new_blocks = num_required - len(blocks) - len(new_computed_blocks)
        evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks() - evictable_hits:
            return None
        self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.allocate(max(num_new_blocks, 0))
        blocks = self.req_blocks.setdefault(request.request_id, blocks)
        blocks.extend(new_computed_blocks)
        blocks.extend(new_blocks)
        if self.enable_caching:
            # Prefix hits are already in the cache map; hashing resumes after them.
            cached = max(self.num_cached_blocks.get(request.request_id, 0),
                         len(new_computed_blocks))
            self.num_cached_blocks[request.request_id] = cached
            num_full = min(total, request.num_tokens) // self.block_size
            if num_full > cached:  # most decode steps fill no block: skip the hashing
                self._cache_full_blocks(request, num_full)
        return new_blocks

    def _cache_full_blocks(self, request: Request, num_full: int) -> None:
        """Registers blocks that will be full once this step's tokens are written. Within a
        step every layer writes the new K/V before attending, so another request scheduled
        in the same step may already read them."""
        self.update_block_hashes(request)
        blocks = self.req_blocks[request.request_id]
        num_full = min(num_full, len(request.block_hashes), len(blocks))
        start = self.num_cached_blocks[request.request_id]
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = max(start, num_full)

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def usage(self) -> float:
        return self.pool.usage()

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
