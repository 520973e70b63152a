"""RadixAttention prefix cache: a radix tree over token ids whose edges own KV slots.

Pages hold one token, so prefixes are shared at token granularity. Every node on the path of
a running request is locked (``lock_ref > 0``); only unlocked leaves are evicted, least
recently used first. An unlocked node never has a locked descendant (locks count up the
path), so every unlocked token is evictable.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from cubeserve.mem_cache.kv_pool import TokenSlotAllocator

_EMPTY_SLOTS = torch.empty(0, dtype=torch.int64)


class TreeNode:
    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None) -> None:
        self.key = key  # token ids of the edge from ``parent``
        self.value = value  # KV slots of those tokens (CPU int64)
        self.parent = parent
        self.children: dict[int, TreeNode] = {}  # first token of the child's edge -> child
        self.lock_ref = 0
        self.last_access = 0

    def __lt__(self, other: TreeNode) -> bool:  # heap order for LRU eviction
        return self.last_access < other.last_access


@dataclass
class PrefixCacheStats:
    query_tokens: int = 0
    hit_tokens: int = 0

    def record(self, query_tokens: int, hit_tokens: int) -> None:
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens


class RadixCache:
    """Token-granular prefix cache.

    With ``disable=True`` (``--disable-radix-cache``) it caches nothing but keeps the same
    interface: matches are empty and ``insert`` hands every slot back to the caller.
    """

    def __init__(self, allocator: TokenSlotAllocator, disable: bool = False) -> None:
        self.allocator = allocator
        self.disable = disable
        self.stats = PrefixCacheStats()  # cumulative, kept across ``reset``
        self._clock = itertools.count(1)
        self._new_tree()

    def reset(self) -> None:
        """Drop every cached prefix, returning its slots to the allocator.

        Only valid while no request holds a lock (no request is running).
        """
        for node in self._iter_nodes():
            self.allocator.free(node.value)
        self._new_tree()

    def _new_tree(self) -> None:
        self.root = TreeNode([], _EMPTY_SLOTS, None)
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable_size = 0
        self._protected_size = 0

    # ------------------------------------------------------------------ lookups

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, TreeNode]:
        """KV slots of the longest cached prefix of ``token_ids`` and the node ending it.

        An edge matched only partly is split, so the returned node ends exactly at the prefix
        (the node to lock for a request reusing it).
        """
        if self.disable or not token_ids:
            return _EMPTY_SLOTS, self.root
        node, matched = self.root, []
        pos, now = 0, next(self._clock)
        while pos < len(token_ids) and token_ids[pos] in node.children:
            child = node.children[token_ids[pos]]
            child.last_access = now
            common = _common_prefix_len(child.key, token_ids, pos)
            if common < len(child.key):
                child = self._split(child, common)
            matched.append(child.value)
            node, pos = child, pos + common
        slots = torch.cat(matched) if matched else _EMPTY_SLOTS
        return slots, node

    def insert(self, token_ids: Sequence[int], kv_slots: torch.Tensor) -> int:
        """Cache ``kv_slots`` (one per token) under ``token_ids``.

        Returns how many leading tokens were already cached: the cache keeps its own slots for
        those, so the caller still owns (and must free) ``kv_slots[:returned]`` beyond any part
        it got from the cache itself. The cache takes ownership of ``kv_slots[returned:]``.
        A disabled cache keeps nothing and returns ``len(token_ids)``.
        """
        if self.disable:
            return len(token_ids)
        kv_slots = kv_slots.to("cpu", torch.int64)
        node, pos, now = self.root, 0, next(self._clock)
        while pos < len(token_ids):
            child = node.children.get(token_ids[pos])
            if child is None:
                self._add_leaf(node, list(token_ids[pos:]), kv_slots[pos:].clone(), now)
                break
            child.last_access = now
            common = _common_prefix_len(child.key, token_ids, pos)
            if common < len(child.key):
                child = self._split(child, common)
            node, pos = child, pos + common
        return pos

    # ------------------------------------------------------------------ locking

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction (one more request uses them)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 1:
                self._evictable_size += len(node.key)
                self._protected_size -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    # ------------------------------------------------------------------ eviction

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots (if that many are evictable), LRU leaves first.

        Returns the number of slots freed.
        """
        leaves = [n for n in self._iter_nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self._evictable_size -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def evictable_size(self) -> int:
        return self._evictable_size

    def protected_size(self) -> int:
        return self._protected_size

    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    # ------------------------------------------------------------------ internals

    def _add_leaf(self, parent: TreeNode, key: list[int], value: torch.Tensor, now: int) -> None:
        leaf = TreeNode(key, value, parent)
        leaf.last_access = now
        parent.children[key[0]] = leaf
        self._evictable_size += len(key)

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut ``child``'s edge after ``at`` tokens; returns the new upper node."""
        upper = TreeNode(child.key[:at], child.value[:at], child.parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children[child.key[at]] = child
        child.parent.children[child.key[0]] = upper
        child.parent = upper
        child.key = child.key[at:]
        child.value = child.value[at:]
        return upper

    def _iter_nodes(self) -> Iterator[TreeNode]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node


def _common_prefix_len(key: list[int], token_ids: Sequence[int], start: int) -> int:
    n = min(len(key), len(token_ids) - start)
    i = 0
    while i < n and key[i] == token_ids[start + i]:
        i += 1
    return i
