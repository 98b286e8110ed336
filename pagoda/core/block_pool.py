"""Physical KV blocks: reference counts, the prefix-cache hash map and an O(1) LRU free list.

A block whose reference count drops to zero goes to the tail of the free list but keeps its
hash, so a later request with the same prefix can take it back (a prefix-cache hit). Blocks
are evicted from the head of the free list (least recently freed) only when needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

BlockHash = bytes
_ROOT_HASH = b"pagoda-root"


def hash_block_tokens(parent_hash: Optional[BlockHash], token_ids: Sequence[int],
                      extra_key: Optional[str] = None) -> BlockHash:
    """A full block's hash chains its parent's hash, its token ids and extra keys.

    SHA-256 over the exact bytes makes a hit equivalent to an identical prefix in practice."""
    digest = hashlib.sha256(parent_hash or _ROOT_HASH)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra_key:
        digest.update(b"\x00" + extra_key.encode())
    return digest.digest()


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: Optional[BlockHash] = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("BlockPool needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Insertion order is the LRU order; OrderedDict gives O(1) pop, append and removal.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockHash, int] = {}
        self.num_queries = 0
        self.num_hits = 0

    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> Optional[KVBlock]:
        block_id = self.cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    def allocate(self, count: int) -> list[KVBlock]:
        if count > len(self.free_blocks):
            raise ValueError(f"cannot allocate {count} blocks, {len(self.free_blocks)} free")
        taken = []
        for _ in range(count):
            block_id, _ = self.free_blocks.popitem(last=False)
            block = self.blocks[block_id]
            self._evict_hash(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference to blocks found in the prefix cache (maybe sitting free)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_blocks[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the tail of the free list.
        Callers pass a request's blocks in reverse so its tail is evicted before its head."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed twice")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_blocks[block.block_id] = None
                    self.free_blocks.move_to_end(block.block_id, last=False)
                else:
                    self.free_blocks[block.block_id] = None

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # an identical block is cached already; this one stays private
        block.block_hash = block_hash
        self.cached[block_hash] = block.block_id

    def reset_prefix_cache(self) -> bool:
        if len(self.free_blocks) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True

    def _evict_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block.block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
