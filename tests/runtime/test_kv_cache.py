import pytest
import torch

from tinyllm.errors import ConfigError
from tinyllm.runtime.kv_cache import CacheShape, OutOfBlocks, PagedKVCache

SHAPE = CacheShape(layers=2, kv_heads=(2, 1), head_dim=4)


def test_bytes_per_token_is_the_theory() -> None:
    # 2 (K, V) x sum of kv_heads over layers x head_dim x 4 bytes
    assert SHAPE.bytes_per_token() == 2 * (2 + 1) * 4 * 4
    smol = CacheShape(30, (3,) * 30, 64, torch.float16)
    assert smol.bytes_per_token() == 2 * 30 * 3 * 64 * 2


def test_budget_sizes_the_pool_and_pool_bytes_match() -> None:
    block = SHAPE.bytes_per_token() * 4
    cache = PagedKVCache.for_budget(SHAPE, budget_bytes=10 * block + block // 2, block_size=4)
    assert cache.num_blocks == 10
    assert cache.pool_bytes() == 10 * block
    with pytest.raises(ConfigError, match="holds no block"):
        PagedKVCache.for_budget(SHAPE, budget_bytes=block - 1, block_size=4)


def test_slots_follow_the_block_table_and_release_frees_all() -> None:
    cache = PagedKVCache(SHAPE, num_blocks=4, block_size=4)
    cache.add(1)
    first = cache.reserve(1, 6)  # blocks 0 and 1
    assert first.tolist() == [0, 1, 2, 3, 4, 5]
    cache.add(2)
    cache.reserve(2, 1)  # block 2
    more = cache.reserve(1, 3)  # fills block 1, then block 3
    assert more.tolist() == [6, 7, 12]
    assert cache.slots(1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12]
    with pytest.raises(OutOfBlocks):
        cache.reserve(2, 4)
    cache.release(1)
    cache.release(2)
    assert cache.free_blocks == 4 and cache.used_blocks == 0


def test_identical_prompt_blocks_are_shared_and_freed_once() -> None:
    cache = PagedKVCache(SHAPE, num_blocks=8, block_size=4)
    prompt = list(range(10))  # two full blocks + 2 tokens
    assert cache.add(1, prompt) == 0
    cache.reserve(1, len(prompt))
    # same first 9 tokens: both full blocks are found (never the last prompt token)
    assert cache.add(2, [*prompt[:9], 99]) == 8
    assert cache.seqs[2].table == cache.seqs[1].table[:2]
    # a different first block shares nothing, even if the second block matches
    assert cache.add(3, [7, *prompt[1:]]) == 0
    cache.reserve(2, 2)
    used = cache.used_blocks
    cache.release(1)
    assert cache.used_blocks == used - 1  # the shared two stay for sequence 2
    cache.release(2)
    cache.release(3)
    assert cache.used_blocks == 0 and not cache.by_hash


def test_fork_copies_a_shared_partial_block_on_write() -> None:
    cache = PagedKVCache(SHAPE, num_blocks=4, block_size=4)
    cache.add(1)
    slots = cache.reserve(1, 2)
    for layer in range(2):
        cache.k[layer][slots] = 1.0
    cache.fork(1, 2)
    assert cache.seqs[2].table == cache.seqs[1].table
    new = cache.reserve(2, 1)  # writing into the shared block copies it first
    assert cache.seqs[2].table != cache.seqs[1].table
    copied = cache.slots(2)[:2]
    assert torch.equal(cache.k[0][copied], cache.k[0][slots])
    assert int(new) // 4 == cache.seqs[2].table[0]
    cache.release(1)
    cache.release(2)
    assert cache.used_blocks == 0


def test_int8_pool_round_trips_within_half_a_step_and_copies_scales_on_write() -> None:
    import torch

    from tinyllm.runtime.kv_cache import CacheShape, PagedKVCache, quantize_kv

    torch.manual_seed(0)
    x = torch.randn(5, 3, 16)
    x[2, 1] = 0.0  # a zero head: scale 0, codes 0
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.shape == (5, 3)
    back = codes.float() * scale[..., None]
    assert ((back - x).abs() <= scale[..., None] / 2 + 1e-7).all()
    assert torch.equal(back[2, 1], torch.zeros(16))
    cache = PagedKVCache(CacheShape(1, (3,), 16, torch.int8), num_blocks=4, block_size=4)
    cache.add(0)
    slots = cache.reserve(0, 3)
    cache.write(0, slots, x[:3], -x[:3])
    k, v = cache.read(0, slots)
    assert torch.equal(k, back[:3]) and torch.equal(v, -back[:3])
    cache.fork(0, 1)
    cache.reserve(1, 1)  # the shared partial block is copied, scales included
    k1, _ = cache.read(0, cache.slots(1)[:3])
    assert torch.equal(k1, back[:3])
    assert cache.pool_bytes() == 2 * 16 * 3 * 16 + 2 * 16 * 3 * 4
