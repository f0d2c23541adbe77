"""Radix-tree store of saved model states keyed by prompt token ids.

The model-independent half of the context cache: a compressed trie (edges labelled
with runs of token ids, split where sequences diverge) holding one :class:`Entry` per
stored sequence, with entry/byte caps and eviction. A new prompt restores the entry
sharing the longest common prefix with it and evaluates only the rest.

Every node caches the best entry of its subtree (fewest tokens, then most recent), so
a lookup walks the query once: O(len(query)), plus with ``touch=True`` the returned
entry's depth in nodes; never a scan over entries. Recency is an integer tick bumped
by each insert and touching lookup, so behaviour is deterministic. Not thread-safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")


@dataclass(eq=False)
class Entry(Generic[P]):
    """One stored state; all fields are maintained by the store (read-only to callers).

    ``last_used`` is the tick of the insert or last touching lookup; ``in_use`` is the
    acquire count (an entry in use is never evicted, removed or replaced).
    """

    tokens: tuple[int, ...]
    payload: P
    nbytes: int
    pinned: bool = False
    last_used: int = 0
    in_use: int = 0
    _node: _Node[P] | None = field(default=None, init=False, repr=False)


@dataclass(frozen=True)
class Match(Generic[P]):
    """Result of :meth:`PrefixStore.longest_prefix`.

    ``length`` (>= 1) is how many leading query tokens ``entry``'s state can serve: the
    common prefix of ``entry.tokens`` and the query. When ``length < len(entry.tokens)``
    the caller restores the state and truncates the KV cache to ``length`` tokens.
    """

    entry: Entry[P]
    length: int


@dataclass(frozen=True)
class StoreStats:
    """Current size plus counters: ``inserts`` that stored an entry (``replaced`` of
    them overwrote the same tokens), inserts ``rejected`` (stored nothing), cap
    ``evictions``, ``lookups`` and their ``hits`` (a match returned)."""

    entries: int
    nbytes: int
    inserts: int
    replaced: int
    evictions: int
    rejected: int
    lookups: int
    hits: int


class _Node(Generic[P]):
    """Radix node. Non-root nodes have a non-empty label and hold an entry or >= 2 children."""

    __slots__ = ("best", "children", "entry", "label", "parent")

    def __init__(self, label: tuple[int, ...], parent: _Node[P] | None) -> None:
        self.label = label
        self.parent = parent
        self.children: dict[int, _Node[P]] = {}  # keyed by the child's first label token
        self.entry: Entry[P] | None = None
        self.best: Entry[P] | None = None  # best entry in this subtree, by _rank


def _rank(entry: Entry[P]) -> tuple[int, int]:
    """Lower is better: fewest tokens (cheapest to restore), then most recently used."""
    return (len(entry.tokens), -entry.last_used)


def _lcp(label: tuple[int, ...], query: tuple[int, ...], start: int) -> int:
    """Length of the common prefix of ``label`` and ``query[start:]``."""
    k, limit = 0, min(len(label), len(query) - start)
    while k < limit and label[k] == query[start + k]:
        k += 1
    return k


class PrefixStore(Generic[P]):
    """Capped map from token sequences to payloads with longest-common-prefix lookup.

    Caps: at most ``max_entries`` entries and ``max_bytes`` total ``nbytes``. Entries in
    use (see :meth:`acquire`) are never evicted; an insert that could only fit by
    evicting them is refused instead, so the caps hold after every call. (They are
    also re-enforced on :meth:`release`, as a safeguard.)

    Eviction order, among entries not in use:

    1. redundant unpinned entries, oldest first: an entry whose tokens are a strict
       prefix of a more recently used held entry, which serves every query at least
       as far;
    2. unpinned entries, least recently used first;
    3. pinned entries, oldest first (pinned entries are never considered redundant).

    ``on_evict`` is called with each entry evicted by the caps (after it is detached),
    not for :meth:`remove`, :meth:`clear` or replacement.
    """

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        *,
        on_evict: Callable[[Entry[P]], None] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._on_evict = on_evict
        self._root: _Node[P] = _Node((), None)
        self._entries: dict[Entry[P], None] = {}  # held entries, insertion-ordered
        self._nbytes = 0
        self._in_use_count = 0
        self._in_use_bytes = 0
        self._tick = 0
        self._inserts = self._replaced = self._evictions = self._rejected = 0
        self._lookups = self._hits = 0

    # ----------------------------------------------------------------- public API

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def nbytes(self) -> int:
        """Sum of ``nbytes`` over held entries."""
        return self._nbytes

    @property
    def stats(self) -> StoreStats:
        return StoreStats(
            entries=len(self._entries),
            nbytes=self._nbytes,
            inserts=self._inserts,
            replaced=self._replaced,
            evictions=self._evictions,
            rejected=self._rejected,
            lookups=self._lookups,
            hits=self._hits,
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry[P]]:
        """Held entries, no order promised (a snapshot: safe to mutate while iterating)."""
        return iter(list(self._entries))

    def __contains__(self, entry: object) -> bool:
        return entry in self._entries

    def insert(
        self, tokens: Sequence[int], payload: P, nbytes: int, *, pinned: bool = False
    ) -> Entry[P] | None:
        """Store ``payload`` for ``tokens`` and return its new entry, or None if not stored.

        Stores nothing (returns None, counts as rejected) when ``nbytes > max_bytes``,
        when an entry with the same tokens exists and is in use (the old one is kept),
        or when the caps cannot hold the new entry even after evicting everything not
        in use. In the last case nothing is evicted. Otherwise an existing entry with
        the same tokens is replaced (a fresh :class:`Entry` object; the old one is
        dropped without ``on_evict``), then other entries are evicted until the caps
        hold. The new entry is the most recently used one.
        """
        key = tuple(int(t) for t in tokens)
        if not key:
            raise ValueError("tokens must not be empty")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        admissible, old = self._admission(key, nbytes)
        if not admissible:
            self._rejected += 1
            return None
        if old is not None:
            self._detach(old)
            self._replaced += 1
        entry = Entry(key, payload, nbytes, pinned, last_used=self._next_tick())
        self._attach(entry)
        self._inserts += 1
        self._enforce_caps(protect=entry)
        return entry

    def _admission(self, key: tuple[int, ...], nbytes: int) -> tuple[bool, Entry[P] | None]:
        """Whether an entry of ``nbytes`` for ``key`` may be inserted at all (it fits
        the caps beside the entries in use, and does not replace one in use), and the
        entry it would replace."""
        node = self._find_node(key)
        old = node.entry if node is not None else None
        admissible = not (
            nbytes > self._max_bytes
            or (old is not None and old.in_use)
            or self._in_use_count + 1 > self._max_entries
            or self._in_use_bytes + nbytes > self._max_bytes
        )
        return admissible, old

    def make_room(self, tokens: Sequence[int], nbytes: int) -> bool:
        """Evict now what inserting ``nbytes`` for ``tokens`` would evict, so the payload
        can be produced without the store ever holding more than its caps.

        The order is :meth:`insert`'s, with held entries whose tokens are a strict prefix
        of ``tokens`` counted as redundant already (the new entry will serve them).
        False, with nothing evicted, when the insert would be refused anyway.
        """
        key = tuple(int(t) for t in tokens)
        if not key:
            raise ValueError("tokens must not be empty")
        admissible, old = self._admission(key, nbytes)
        if not admissible:
            return False
        held = self._nbytes - (old.nbytes if old is not None else 0)
        count = len(self._entries) - (old is not None)
        if count + 1 <= self._max_entries and held + nbytes <= self._max_bytes:
            return True
        prefixes = self._prefix_entries(key)
        while count + 1 > self._max_entries or held + nbytes > self._max_bytes:
            victim = self._pick_victim(old, redundant=prefixes)
            if victim is None:  # cannot happen given the checks above; be safe
                return False
            self._detach(victim)
            self._evictions += 1
            held -= victim.nbytes
            count -= 1
            if self._on_evict is not None:
                self._on_evict(victim)
        return True

    def longest_prefix(self, query: Sequence[int], *, touch: bool = True) -> Match[P] | None:
        """The entry serving the most leading tokens of ``query``, or None if none shares one.

        Ties on length go to the entry with the fewest tokens beyond the match, then to
        the most recently used. ``touch=True`` marks the returned entry as used.
        """
        self._lookups += 1
        q = tuple(query)
        node, depth = self._root, 0
        while depth < len(q):
            child = node.children.get(q[depth])
            if child is None:
                break
            node, label = child, child.label
            if q[depth : depth + len(label)] != label:  # diverges (or ends) inside the edge
                depth += _lcp(label, q, depth)
                break
            depth += len(label)
        if depth == 0:
            return None
        entry = node.best  # every entry below the match point shares exactly `depth` tokens
        assert entry is not None, "non-root radix node without entries"
        self._hits += 1
        if touch:
            entry.last_used = self._next_tick()
            self._promote(entry)
        return Match(entry, depth)

    def acquire(self, entry: Entry[P]) -> None:
        """Mark ``entry`` in use (counted) so it is not evicted until fully released.

        Does not change recency. ValueError if ``entry`` is not held by this store.
        """
        if entry not in self._entries:
            raise ValueError("entry is not held by this store")
        if entry.in_use == 0:
            self._in_use_count += 1
            self._in_use_bytes += entry.nbytes
        entry.in_use += 1

    def release(self, entry: Entry[P]) -> None:
        """Undo one :meth:`acquire`; ValueError if ``entry`` is not in use.

        The last release re-enforces the caps (a safeguard: inserts already keep them).
        """
        if entry.in_use <= 0 or entry not in self._entries:
            raise ValueError("entry is not in use")
        entry.in_use -= 1
        if entry.in_use == 0:
            self._in_use_count -= 1
            self._in_use_bytes -= entry.nbytes
            self._enforce_caps(protect=None)

    @contextlib.contextmanager
    def use(self, entry: Entry[P]) -> Iterator[Entry[P]]:
        """Hold ``entry`` in use for the duration of a ``with`` block."""
        self.acquire(entry)
        try:
            yield entry
        finally:
            self.release(entry)

    def remove(self, entry: Entry[P]) -> bool:
        """Remove ``entry``; False (and nothing done) if it is not held or is in use."""
        if entry not in self._entries or entry.in_use:
            return False
        self._detach(entry)
        return True

    def clear(self) -> int:
        """Remove every entry not in use (no ``on_evict``); return how many were removed."""
        victims = [e for e in self._entries if not e.in_use]
        for entry in victims:
            self._detach(entry)
        return len(victims)

    # ------------------------------------------------------------------ internals

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _find_node(self, key: tuple[int, ...]) -> _Node[P] | None:
        """The node whose path spells exactly ``key``, if there is one."""
        node, depth = self._root, 0
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None or key[depth : depth + len(child.label)] != child.label:
                return None
            node, depth = child, depth + len(child.label)
        return node

    def _attach(self, entry: Entry[P]) -> None:
        """Link ``entry`` into the tree (its tokens must not be held) and account for it."""
        key, node, depth = entry.tokens, self._root, 0
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None:
                child = _Node(key[depth:], node)
                node.children[key[depth]] = child
            else:
                k = _lcp(child.label, key, depth)
                if k < len(child.label):
                    child = self._split(child, k)
            node, depth = child, depth + len(child.label)
        node.entry = entry
        entry._node = node
        self._entries[entry] = None
        self._nbytes += entry.nbytes
        self._promote(entry)

    @staticmethod
    def _split(child: _Node[P], k: int) -> _Node[P]:
        """Split ``child``'s edge after ``k`` tokens; return the new middle node."""
        parent = child.parent
        assert parent is not None
        mid: _Node[P] = _Node(child.label[:k], parent)
        mid.best = child.best
        parent.children[child.label[0]] = mid
        child.label = child.label[k:]
        child.parent = mid
        mid.children[child.label[0]] = child
        return mid

    @staticmethod
    def _promote(entry: Entry[P]) -> None:
        """Update subtree bests after ``entry`` was attached or became more recent.

        Only ``entry``'s rank improved, so each ancestor's best is the better of its
        old best and ``entry``.
        """
        node = entry._node
        while node is not None:
            if node.best is None or _rank(entry) < _rank(node.best):
                node.best = entry
            node = node.parent

    def _detach(self, entry: Entry[P]) -> None:
        """Unlink ``entry``, prune/merge nodes left without purpose, fix subtree bests."""
        node = entry._node
        assert node is not None and node.entry is entry
        node.entry = None
        entry._node = None
        del self._entries[entry]
        self._nbytes -= entry.nbytes
        while node.parent is not None and node.entry is None and len(node.children) <= 1:
            parent = node.parent
            if node.children:  # single child: merge it into this node's edge
                (child,) = node.children.values()
                child.label = node.label + child.label
                child.parent = parent
                parent.children[node.label[0]] = child
            else:  # empty leaf: drop it; the parent may now need pruning too
                del parent.children[node.label[0]]
            node = parent
        cursor: _Node[P] | None = node
        while cursor is not None and cursor.best is entry:
            best = cursor.entry
            for child in cursor.children.values():
                if child.best is not None and (best is None or _rank(child.best) < _rank(best)):
                    best = child.best
            cursor.best = best
            cursor = cursor.parent

    def _over_caps(self) -> bool:
        return len(self._entries) > self._max_entries or self._nbytes > self._max_bytes

    def _enforce_caps(self, protect: Entry[P] | None) -> None:
        while self._over_caps():
            victim = self._pick_victim(protect)
            if victim is None:
                return
            self._detach(victim)
            self._evictions += 1
            if self._on_evict is not None:
                self._on_evict(victim)

    def _prefix_entries(self, key: tuple[int, ...]) -> set[Entry[P]]:
        """Held entries whose tokens are a strict prefix of ``key``."""
        found: set[Entry[P]] = set()
        node, depth = self._root, 0
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None or key[depth : depth + len(child.label)] != child.label:
                break
            node, depth = child, depth + len(child.label)
            if node.entry is not None and depth < len(key):
                found.add(node.entry)
        return found

    def _pick_victim(self, protect: Entry[P] | None,
                     redundant: set[Entry[P]] | None = None) -> Entry[P] | None:
        """The next entry to evict by the documented order (entries in ``redundant``
        count as redundant); O(number of nodes)."""
        nodes = self._nodes()
        newest: dict[_Node[P], int] = {}  # most recent tick in each subtree
        victim: Entry[P] | None = None
        victim_key = (3, 0)
        for node in reversed(nodes):  # children before parents
            below = max((newest[c] for c in node.children.values()), default=-1)
            entry = node.entry
            newest[node] = below if entry is None else max(below, entry.last_used)
            if entry is None or entry.in_use or entry is protect:
                continue
            klass = (2 if entry.pinned else
                     0 if below > entry.last_used or (redundant and entry in redundant) else 1)
            if (klass, entry.last_used) < victim_key:
                victim, victim_key = entry, (klass, entry.last_used)
        return victim

    def _nodes(self) -> list[_Node[P]]:
        """All nodes, breadth-first from the root (parents before children)."""
        nodes = [self._root]
        for node in nodes:  # appending while iterating is intended
            nodes.extend(node.children.values())
        return nodes

    # --------------------------------------------------------------- test helpers

    def _node_count(self) -> int:
        """Number of radix nodes, root included."""
        return len(self._nodes())

    def _check_invariants(self) -> None:
        """Assert structural and bookkeeping invariants (for tests)."""
        seen: list[Entry[P]] = []

        def walk(node: _Node[P], prefix: tuple[int, ...]) -> Entry[P] | None:
            best = node.entry
            if node.parent is not None:
                assert node.label, "empty edge label"
                assert node.entry is not None or len(node.children) >= 2, "useless node"
            if node.entry is not None:
                assert node.entry.tokens == prefix and node.entry._node is node
                seen.append(node.entry)
            for first, child in node.children.items():
                assert child.parent is node and child.label[0] == first
                sub = walk(child, prefix + child.label)
                if sub is not None and (best is None or _rank(sub) < _rank(best)):
                    best = sub
            assert node.best is best, "stale subtree best"
            return best

        walk(self._root, ())
        assert self._root.entry is None
        assert len(seen) == len(self._entries) and set(seen) == set(self._entries)
        assert self._nbytes == sum(e.nbytes for e in seen)
        in_use = [e for e in seen if e.in_use]
        assert self._in_use_count == len(in_use)
        assert self._in_use_bytes == sum(e.nbytes for e in in_use)
        assert self._node_count() <= 2 * len(seen) + 1
