"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, ref counts, and the shared-prefix index.

A sequence's K/V lives in blocks of ``block_size`` positions, listed by its block table (block ids in
position order). Nothing here touches tensors: the model runner owns the K/V storage and reads the
tables; the scheduler asks this pool for blocks and hands them back.

- Blocks are reference counted. A block two sequences hold (the n samples of one request, or a run
  spec's few-shot prefix behind many requests) is stored once.
- A full block that a prompt has computed is indexed by its exact tokens and those of every block
  before it (keys are (parent entry, tokens), never a hash, so two different prefixes can't collide).
  When nobody holds it any more it stays cached, and the next prompt that starts the same way takes
  it by reference. Cached blocks nobody holds are reused least recently freed first, only when no
  never-used block is left.
- Block 0 is never handed out: padding entries of a block table point at it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PoolExhausted(RuntimeError):
    """More blocks were asked for than are free (the scheduler checks ``available`` first)."""


class KVPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a KV pool needs at least 2 blocks of at least 1 position, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # a stack: recently freed blocks first
        self._refs = [0] * num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # indexed blocks nobody holds, oldest first
        self._entry_of: dict[int, tuple] = {}  # block -> its index key
        self._index: dict[tuple, tuple[int, int]] = {}  # (parent entry id, tokens) -> (block, entry id)
        self._entry_ids = 0

    # --- counts -------------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (never used, or cached but held by nobody)."""
        return len(self._free) + len(self._cached)

    @property
    def held(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - 1 - self.available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # --- allocation ---------------------------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        if count > self.available:
            raise PoolExhausted(f"asked for {count} KV blocks, {self.available} available")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:  # reuse the cached block freed longest ago; its prefix is forgotten
                block, _ = self._cached.popitem(last=False)
                self._unindex(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: Sequence[int]) -> None:
        """One more holder for each of ``blocks``."""
        for block in blocks:
            if self._refs[block] == 0:
                self._cached.pop(block)
            self._refs[block] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """One holder less for each of ``blocks``; a block nobody holds is cached (if indexed) or free."""
        for block in blocks:
            if self._refs[block] <= 0:
                raise ValueError(f"KV block {block} freed more often than it was held")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._entry_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def refs(self, block: int) -> int:
        return self._refs[block]

    # --- the shared-prefix index --------------------------------------------------------------

    def match(self, ids: Sequence[int], max_blocks: int) -> list[int]:
        """The cached blocks that hold ``ids``'s first full blocks (at most ``max_blocks``), in order.

        The caller ``share``s them before anything else is allocated."""
        bs, parent, blocks = self.block_size, -1, []
        for i in range(min(max_blocks, len(ids) // bs)):
            hit = self._index.get((parent, tuple(ids[i * bs : (i + 1) * bs])))
            if hit is None:
                break
            block, parent = hit
            blocks.append(block)
        return blocks

    def register(self, ids: Sequence[int], table: Sequence[int], upto: int) -> None:
        """Index the full blocks of ``table`` that hold ``ids[:upto]`` (computed K/V), so later prompts
        can share them. A prefix already indexed under another block keeps that block."""
        bs, parent = self.block_size, -1
        for i in range(upto // bs):
            key = (parent, tuple(ids[i * bs : (i + 1) * bs]))
            hit = self._index.get(key)
            if hit is None:
                block = table[i]
                if block in self._entry_of:  # already indexed under another prefix: can't be this one
                    return
                self._entry_ids += 1
                hit = self._index[key] = (block, self._entry_ids)
                self._entry_of[block] = key
            parent = hit[1]

    def _unindex(self, block: int) -> None:
        key = self._entry_of.pop(block, None)
        if key is not None:
            del self._index[key]
