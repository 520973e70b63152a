"""RadixCache: prefix matching, edge splits, insert ownership, locking, LRU eviction, stats."""

from __future__ import annotations

import torch

from cubeserve.mem_cache.kv_pool import TokenSlotAllocator
from cubeserve.mem_cache.radix_cache import RadixCache

POOL = 64


def make_cache(disable: bool = False) -> tuple[RadixCache, TokenSlotAllocator]:
    allocator = TokenSlotAllocator(POOL)
    return RadixCache(allocator, disable=disable), allocator


def cache_sequence(
    cache: RadixCache, allocator: TokenSlotAllocator, tokens: list[int]
) -> torch.Tensor:
    """What the scheduler does when a request finishes: insert, then free its duplicates."""
    slots = allocator.alloc(len(tokens))
    already = cache.insert(tokens, slots)
    allocator.free(slots[:already])
    return slots


def test_empty_cache_matches_nothing() -> None:
    cache, _ = make_cache()
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots.numel() == 0 and node is cache.root


def test_insert_then_match_returns_the_inserted_slots() -> None:
    cache, allocator = make_cache()
    slots = cache_sequence(cache, allocator, [1, 2, 3, 4])
    matched, _ = cache.match_prefix([1, 2, 3, 4, 5])
    assert matched.tolist() == slots.tolist()
    matched, _ = cache.match_prefix([1, 2, 9])
    assert matched.tolist() == slots[:2].tolist()
    assert cache.match_prefix([7])[0].numel() == 0


def test_partial_match_splits_the_edge_at_the_prefix() -> None:
    cache, allocator = make_cache()
    slots = cache_sequence(cache, allocator, [1, 2, 3, 4])
    _, node = cache.match_prefix([1, 2, 7])
    assert node.key == [1, 2] and node.value.tolist() == slots[:2].tolist()
    (child,) = node.children.values()
    assert child.key == [3, 4] and child.parent is node
    assert cache.total_size() == 4  # splitting moves no tokens


def test_insert_reports_the_cached_prefix_and_takes_only_the_rest() -> None:
    cache, allocator = make_cache()
    first = cache_sequence(cache, allocator, [1, 2, 3, 4])
    second = allocator.alloc(6)
    assert cache.insert([1, 2, 3, 9, 9, 9], second) == 3
    allocator.free(second[:3])
    matched, _ = cache.match_prefix([1, 2, 3, 9, 9, 9])
    assert matched.tolist() == first[:3].tolist() + second[3:].tolist()
    assert cache.total_size() == 7
    assert allocator.used_size() == 7  # no slot leaked, none owned twice


def test_reinserting_a_cached_sequence_takes_nothing() -> None:
    cache, allocator = make_cache()
    cache_sequence(cache, allocator, [5, 6, 7])
    assert cache.insert([5, 6, 7], allocator.alloc(3)) == 3
    assert cache.insert([5, 6], torch.tensor([60, 61])) == 2


def test_locks_protect_the_whole_path_and_survive_splits() -> None:
    cache, allocator = make_cache()
    cache_sequence(cache, allocator, [1, 2, 3, 4])
    _, leaf = cache.match_prefix([1, 2, 3, 4, 5])
    cache.inc_lock_ref(leaf)
    assert (cache.protected_size(), cache.evictable_size()) == (4, 0)
    cache.match_prefix([1, 2, 8])  # splits the locked edge
    assert (cache.protected_size(), cache.evictable_size()) == (4, 0)
    assert cache.evict(POOL) == 0
    cache.dec_lock_ref(leaf)
    assert (cache.protected_size(), cache.evictable_size()) == (0, 4)


def test_shared_prefix_stays_locked_while_any_user_holds_it() -> None:
    cache, allocator = make_cache()
    cache_sequence(cache, allocator, [1, 2, 3])
    cache_sequence(cache, allocator, [1, 2, 4])
    _, a = cache.match_prefix([1, 2, 3, 0])
    _, b = cache.match_prefix([1, 2, 4, 0])
    cache.inc_lock_ref(a)
    cache.inc_lock_ref(b)
    cache.dec_lock_ref(a)
    assert cache.evict(POOL) == 1  # only [3]; [1, 2] and [4] are still used by b
    assert cache.match_prefix([1, 2, 4])[0].numel() == 3
    assert (cache.protected_size(), cache.evictable_size()) == (3, 0)


def test_evict_takes_least_recently_used_leaves_first_and_frees_their_slots() -> None:
    cache, allocator = make_cache()
    cache_sequence(cache, allocator, [1, 1])
    cache_sequence(cache, allocator, [2, 2])
    cache_sequence(cache, allocator, [3, 3])
    cache.match_prefix([1, 1])  # [1, 1] is now the most recently used
    assert cache.evict(3) == 4  # whole leaves: [2, 2] then [3, 3]
    assert allocator.used_size() == 2
    assert cache.match_prefix([1, 1])[0].numel() == 2
    assert cache.match_prefix([2, 2])[0].numel() == 0
    assert cache.match_prefix([3, 3])[0].numel() == 0


def test_evict_climbs_to_parents_that_become_leaves() -> None:
    cache, allocator = make_cache()
    cache_sequence(cache, allocator, [1, 2, 3])
    cache_sequence(cache, allocator, [1, 2, 4])
    assert cache.evict(POOL) == 4
    assert cache.total_size() == 0 and allocator.used_size() == 0
    assert not cache.root.children


def test_reset_frees_everything_and_keeps_stats() -> None:
    cache, allocator = make_cache()
    cache_sequence(cache, allocator, [1, 2, 3])
    cache_sequence(cache, allocator, [4, 5])
    cache.stats.record(query_tokens=10, hit_tokens=4)
    cache.reset()
    assert allocator.available_size() == POOL
    assert cache.total_size() == 0 and cache.match_prefix([1, 2, 3])[0].numel() == 0
    assert (cache.stats.query_tokens, cache.stats.hit_tokens) == (10, 4)


def test_disabled_cache_matches_nothing_and_keeps_nothing() -> None:
    cache, allocator = make_cache(disable=True)
    slots = allocator.alloc(3)
    assert cache.insert([1, 2, 3], slots) == 3  # the caller frees all of them
    allocator.free(slots)
    matched, node = cache.match_prefix([1, 2, 3])
    assert matched.numel() == 0 and node is cache.root
    assert cache.total_size() == 0 and allocator.used_size() == 0
