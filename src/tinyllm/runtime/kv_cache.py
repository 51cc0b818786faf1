"""Paged KV cache: one preallocated pool of fixed-size blocks, a block table per sequence.

The pool holds, per layer, keys and values for `num_blocks * block_size` token slots
(`[slots, kv_heads, head_dim]`). A sequence owns a list of block ids; token position p lives in
slot `table[p // block_size] * block_size + p % block_size`. Blocks are reference counted: full
prompt blocks with identical token prefixes are shared between sequences (the hash of a block
covers every token before it too), a fork shares every block, and a write into a block that
another sequence also holds copies it first (copy on write). Freeing a sequence returns the
blocks nobody else holds to the free list at once.

An int8 pool (`CacheShape.dtype = torch.int8`, `--kv-dtype int8`) stores each token's key and
value of each KV head as 8-bit integers with one float32 scale (its absolute maximum / 127):
head_dim + 4 bytes per head and token instead of 2 x head_dim in float16. `write` quantizes what
a forward produces, `read` gives float32 back; the C++ decode attention reads the codes and scales
directly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from tinyllm.errors import ConfigError

NONE = torch.empty(0)  # "no tensor" for the native ops (a float pool's scales, a missing norm)


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than a request needs (the scheduler waits or preempts)."""


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: tuple[int, ...]  # per layer: pruned models may differ
    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def quantized(self) -> bool:
        return self.dtype == torch.int8

    def bytes_per_token(self) -> int:
        """2 (K and V) x sum over layers of kv_heads x (head_dim x bytes per element, plus a
        float32 scale per head in an int8 pool)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_head = self.head_dim * elem + (4 if self.quantized else 0)
        return 2 * sum(self.kv_heads) * per_head


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, heads, hd] float -> (int8 codes [T, heads, hd], float32 scales [T, heads]): symmetric,
    one scale per token and head (its absolute maximum maps to 127)."""
    x = x.float()
    scale = x.abs().amax(-1) / 127.0
    div = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / div[..., None]).round().clamp(-127, 127).to(torch.int8), scale


@dataclass
class SeqBlocks:
    """The block table of one sequence and how many of its token slots are filled."""

    table: list[int] = field(default_factory=list)
    length: int = 0
    hashes: list[bytes] = field(default_factory=list)  # of its full, shareable prompt blocks
    # the slot of every position (valid below `length`); grows by doubling, so a decode step
    # writes one entry instead of rebuilding the sequence's whole slot list
    slot_map: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


class PagedKVCache:
    def __init__(
        self,
        shape: CacheShape,
        num_blocks: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
    ) -> None:
        """The pool lives on `device` (the model's); the block tables are Python lists."""
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(
                f"KV cache needs at least one block of at least one token "
                f"(got {num_blocks} blocks of {block_size}); raise the KV memory budget"
            )
        self.shape, self.num_blocks, self.block_size = shape, num_blocks, block_size
        slots = num_blocks * block_size
        self.k = [
            torch.zeros(slots, h, shape.head_dim, dtype=shape.dtype, device=device)
            for h in shape.kv_heads
        ]
        self.v = [torch.zeros_like(t) for t in self.k]
        # an int8 pool's scales, [slots, kv_heads] float32 per layer (empty lists otherwise)
        scales = (
            [torch.zeros(t.shape[:2], device=device) for t in self.k] if shape.quantized else []
        )
        self.k_scale, self.v_scale = scales, [torch.zeros_like(t) for t in scales]
        self.refs = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.seqs: dict[int, SeqBlocks] = {}

    @classmethod
    def for_budget(
        cls,
        shape: CacheShape,
        budget_bytes: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """As many blocks as fit in `budget_bytes` (on `device`)."""
        per_block = shape.bytes_per_token() * block_size
        num = budget_bytes // per_block
        if num < 1:
            raise ConfigError(
                f"a KV budget of {budget_bytes / 2**20:.2f} MiB holds no block of {block_size} "
                f"tokens ({per_block / 2**20:.3f} MiB each for this model); raise --kv-memory"
            )
        return cls(shape, int(num), block_size, device)

    # --- accounting -------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self.free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def pool_bytes(self) -> int:
        tensors = self.k + self.v + self.k_scale + self.v_scale
        return sum(t.numel() * t.element_size() for t in tensors)

    # --- contents ---------------------------------------------------------------------------
    def write(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ops: object = None
    ) -> None:
        """Store the keys and values [T, kv_heads, hd] of layer `layer` at `slots` [T]. `ops`:
        the runtime's native kernels (CPU float32 k and v), which convert or quantize each row
        straight into the pool (the same values as the PyTorch ops below, no temporaries)."""
        if ops is not None:
            for pool, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
                ops.kv_write(pool[layer], scales[layer] if scales else NONE, slots, x)
            return
        if not self.shape.quantized:
            self.k[layer].index_copy_(0, slots, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(0, slots, v.to(self.v[layer].dtype))
            return
        for pool, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            codes, scale = quantize_kv(x)
            pool[layer].index_copy_(0, slots, codes)
            scales[layer].index_copy_(0, slots, scale)

    def read(self, layer: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer `layer` at slots `idx` (any shape), float32:
        [*idx.shape, kv_heads, hd] each."""
        if not self.shape.quantized:
            return self.k[layer][idx].float(), self.v[layer][idx].float()
        k = self.k[layer][idx].float() * self.k_scale[layer][idx][..., None]
        return k, self.v[layer][idx].float() * self.v_scale[layer][idx][..., None]

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # --- sequences --------------------------------------------------------------------------
    def add(self, seq_id: int, prompt: list[int] | None = None) -> int:
        """Register a sequence; share the longest run of cached full prompt blocks.

        Returns how many prompt tokens are already in the cache (a multiple of block_size, and
        always less than len(prompt) so the last prompt token is computed for its logits).
        """
        seq = SeqBlocks()
        self.seqs[seq_id] = seq
        if not prompt:
            return 0
        bs = self.block_size
        h = hashlib.sha1()
        for b in range((len(prompt) - 1) // bs):
            h.update(str(prompt[b * bs : (b + 1) * bs]).encode())
            digest = h.digest()
            seq.hashes.append(digest)
            block = self.by_hash.get(digest)
            if block is None or len(seq.table) != b:
                continue
            self.refs[block] += 1
            seq.table.append(block)
            seq.length += bs
        self._map(seq, 0, seq.length)
        return seq.length

    def fork(self, parent: int, child: int) -> None:
        """The child shares every block of the parent; the first write copies (copy on write)."""
        src = self.seqs[parent]
        for block in src.table:
            self.refs[block] += 1
        self.seqs[child] = SeqBlocks(
            list(src.table), src.length, list(src.hashes), src.slot_map.clone()
        )

    def reserve(self, seq_id: int, n: int) -> torch.Tensor:
        """Slots for the sequence's next `n` tokens (allocating and un-sharing blocks as needed)."""
        seq = self.seqs[seq_id]
        bs = self.block_size
        need = self.blocks_for(seq.length + n) - len(seq.table)
        shared_tail = seq.length % bs != 0 and self.refs[seq.table[-1]] > 1
        if need + int(shared_tail) > len(self.free):
            raise OutOfBlocks(f"need {need + int(shared_tail)} blocks, {len(self.free)} free")
        if shared_tail:
            self._copy_on_write(seq, len(seq.table) - 1)
        for _ in range(need):
            block = self.free.pop()
            self.refs[block] = 1
            seq.table.append(block)
        self._map(seq, seq.length, seq.length + n)
        slots = seq.slot_map[seq.length : seq.length + n]
        seq.length += n
        self._publish(seq)
        return slots

    def slots(self, seq_id: int) -> torch.Tensor:
        """Every filled slot of the sequence, in position order: [length] (a view, valid until
        the sequence's table next changes)."""
        seq = self.seqs[seq_id]
        return seq.slot_map[: seq.length]

    def _map(self, seq: SeqBlocks, start: int, end: int) -> None:
        """Write the slots of positions start..end-1 into the sequence's slot map."""
        if end <= start:
            return
        if seq.slot_map.shape[0] < end:
            grown = torch.empty(max(end, 2 * seq.slot_map.shape[0], 64), dtype=torch.long)
            grown[: seq.slot_map.shape[0]] = seq.slot_map
            seq.slot_map = grown
        bs = self.block_size
        if end - start == 1:  # a decode step: one entry, no temporaries (a numpy view's)
            seq.slot_map.numpy()[start] = seq.table[start // bs] * bs + start % bs
            return
        pos = torch.arange(start, end)
        seq.slot_map[start:end] = torch.tensor(seq.table)[pos // bs] * bs + pos % bs

    def release(self, seq_id: int) -> None:
        """Drop the sequence; blocks nobody else holds go back to the pool at once."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        for block in seq.table:
            self._unref(block)

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep the sequence's first `length` tokens (rejected draft tokens go): the blocks past
        them are given back, and the slots after `length` are written again by the next reserve."""
        seq = self.seqs[seq_id]
        if not 0 <= length <= seq.length:
            raise ValueError(f"cannot truncate {seq.length} tokens to {length}")
        keep = self.blocks_for(length)
        for block in seq.table[keep:]:
            self._unref(block)
        del seq.table[keep:]
        seq.length = length

    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            digest = self.hash_of.pop(block, None)
            if digest is not None and self.by_hash.get(digest) == block:
                del self.by_hash[digest]
            self.free.append(block)

    def _publish(self, seq: SeqBlocks) -> None:
        """Make the sequence's full prompt blocks findable by later sequences."""
        full = min(len(seq.hashes), seq.length // self.block_size)
        for b in range(full):
            block = seq.table[b]
            if block not in self.hash_of and seq.hashes[b] not in self.by_hash:
                self.by_hash[seq.hashes[b]] = block
                self.hash_of[block] = seq.hashes[b]

    def _copy_on_write(self, seq: SeqBlocks, index: int) -> None:
        old = seq.table[index]
        new = self.free.pop()
        bs = self.block_size
        src, dst = slice(old * bs, (old + 1) * bs), slice(new * bs, (new + 1) * bs)
        for t in self.k + self.v + self.k_scale + self.v_scale:
            t[dst] = t[src]
        self.refs[old] -= 1
        self.refs[new] = 1
        seq.table[index] = new
        self._map(seq, index * bs, min((index + 1) * bs, seq.length))
