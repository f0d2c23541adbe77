"""Tests for jarvis.llm.prefix_store: unit tests per rule plus Hypothesis state-machine tests."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jarvis.llm.prefix_store import Entry, Match, PrefixStore, StoreStats


def lcp(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def make(max_entries: int = 100, max_bytes: int = 10_000) -> tuple[PrefixStore[str], list[str]]:
    """A store whose on_evict records evicted payloads into the returned list."""
    evicted: list[str] = []
    store: PrefixStore[str] = PrefixStore(
        max_entries, max_bytes, on_evict=lambda e: evicted.append(e.payload)
    )
    return store, evicted


def put(store: PrefixStore[str], tokens: Sequence[int], nbytes: int = 1, **kw: bool) -> Entry[str]:
    entry = store.insert(tokens, "".join(map(str, tokens)), nbytes, **kw)
    assert entry is not None
    return entry


def payloads(store: PrefixStore[str]) -> set[str]:
    return {e.payload for e in store}


# --------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(("max_entries", "max_bytes"), [(0, 10), (10, 0), (-1, 10), (10, -5)])
def test_constructor_rejects_non_positive_caps(max_entries: int, max_bytes: int) -> None:
    with pytest.raises(ValueError):
        PrefixStore[str](max_entries, max_bytes)


def test_insert_rejects_empty_tokens_and_negative_nbytes() -> None:
    store, _ = make()
    with pytest.raises(ValueError):
        store.insert([], "x", 1)
    with pytest.raises(ValueError):
        store.insert([1], "x", -1)
    assert len(store) == 0
    assert store.stats.rejected == 0


def test_acquire_and_release_errors() -> None:
    store, _ = make()
    entry = put(store, [1, 2])
    with pytest.raises(ValueError):
        store.release(entry)
    store.remove(entry)
    with pytest.raises(ValueError):
        store.acquire(entry)
    other, _ = make()
    with pytest.raises(ValueError):
        other.acquire(put(store, [3]))


# ---------------------------------------------------------------------------- lookups


def test_exact_prefix_hit() -> None:
    store, _ = make()
    entry = put(store, [1, 2, 3])
    assert store.longest_prefix([1, 2, 3, 4, 5]) == Match(entry, 3)
    assert store.longest_prefix([1, 2, 3]) == Match(entry, 3)
    assert entry.tokens == (1, 2, 3)


def test_partial_and_divergent_hits() -> None:
    store, _ = make()
    entry = put(store, [1, 2, 3, 4])
    assert store.longest_prefix([1, 2, 9, 9]) == Match(entry, 2)
    assert store.longest_prefix([1, 2]) == Match(entry, 2)  # query shorter than entry
    assert store.longest_prefix([1]) == Match(entry, 1)


def test_no_match_returns_none() -> None:
    store, _ = make()
    assert store.longest_prefix([1]) is None
    put(store, [1, 2])
    assert store.longest_prefix([2, 1]) is None
    assert store.longest_prefix([]) is None
    assert store.stats.lookups == 3
    assert store.stats.hits == 0


def test_longest_match_wins() -> None:
    store, _ = make()
    put(store, [1, 2])
    best = put(store, [1, 2, 3, 4])
    put(store, [1, 5])
    put(store, [1, 2, 3, 9, 9, 9])  # also serves 3 tokens, but has more extra tokens
    assert store.longest_prefix([1, 2, 3, 4, 7]) == Match(best, 4)
    assert store.longest_prefix([1, 2, 3, 5]) == Match(best, 3)


def test_tie_prefers_fewest_extra_tokens() -> None:
    store, _ = make()
    put(store, [1, 2, 3, 4, 5, 6])
    short = put(store, [1, 2, 3, 7])
    put(store, [1, 2, 3, 8, 8])
    assert store.longest_prefix([1, 2, 3, 9]) == Match(short, 3)
    exact = put(store, [1, 2, 3])
    assert store.longest_prefix([1, 2, 3, 9]) == Match(exact, 3)
    store.longest_prefix([1, 2, 3, 4, 5, 6])  # recency does not beat fewer extra tokens
    assert store.longest_prefix([1, 2, 3, 9]) == Match(exact, 3)


def test_tie_prefers_most_recently_used() -> None:
    store, _ = make()
    a = put(store, [1, 2, 5])
    b = put(store, [1, 2, 6])
    assert store.longest_prefix([1, 2, 9]) == Match(b, 2)
    assert store.longest_prefix([1, 2, 5]) == Match(a, 3)  # touches a
    assert store.longest_prefix([1, 2, 9]) == Match(a, 2)


def test_touch_false_leaves_recency_alone() -> None:
    store, _ = make()
    a = put(store, [1, 2, 5])
    b = put(store, [1, 2, 6])
    before = a.last_used
    assert store.longest_prefix([1, 2, 5], touch=False) == Match(a, 3)
    assert a.last_used == before
    assert store.longest_prefix([1, 2, 9]) == Match(b, 2)


# ------------------------------------------------------------------ insert / replace


def test_replace_same_tokens() -> None:
    store, evicted = make()
    old = put(store, [1, 2], nbytes=5)
    new = store.insert([1, 2], "new", 7)
    assert new is not None and new is not old
    assert new.payload == "new" and len(store) == 1 and store.nbytes == 7
    assert old not in store and not store.remove(old)
    assert store.longest_prefix([1, 2]) == Match(new, 2)
    assert store.stats.replaced == 1 and store.stats.inserts == 2
    assert store.stats.evictions == 0 and evicted == []


def test_replace_refused_while_old_in_use() -> None:
    store, _ = make()
    old = put(store, [1, 2])
    with store.use(old):
        assert store.insert([1, 2], "new", 1) is None
    assert list(store) == [old] and old.payload == "12"
    assert store.stats.rejected == 1 and store.stats.replaced == 0


def test_oversize_rejected() -> None:
    store, _ = make(max_bytes=10)
    put(store, [1], nbytes=3)
    assert store.insert([2], "big", 11) is None
    assert payloads(store) == {"1"} and store.stats.rejected == 1
    assert store.insert([2], "fits", 10) is not None  # exactly max_bytes is fine
    assert payloads(store) == {"fits"}


def test_insert_rejected_when_in_use_entries_leave_no_room() -> None:
    store, evicted = make(max_entries=3, max_bytes=10)
    held = put(store, [1], nbytes=8)
    put(store, [2], nbytes=1)
    with store.use(held):
        assert store.insert([3], "x", 5) is None  # 8 in use + 5 > 10: nothing evicted
        assert payloads(store) == {"1", "2"} and evicted == []
        put(store, [4], nbytes=2)  # fits once [2] is evicted
        assert payloads(store) == {"1", "4"} and evicted == ["2"]
    one, _ = make(max_entries=1)
    only = put(one, [1])
    one.acquire(only)
    assert one.insert([2], "x", 1) is None
    assert list(one) == [only]


# -------------------------------------------------------------------------- eviction


def test_lru_eviction_by_entry_count() -> None:
    store, evicted = make(max_entries=2)
    put(store, [1])
    put(store, [2])
    store.longest_prefix([1])  # [2] is now least recently used
    put(store, [3])
    assert payloads(store) == {"1", "3"} and evicted == ["2"]


def test_eviction_by_bytes_evicts_as_many_as_needed() -> None:
    store, evicted = make(max_bytes=10)
    for t in range(5):
        put(store, [t], nbytes=2)
    put(store, [9], nbytes=6)
    assert evicted == ["0", "1", "2"] and payloads(store) == {"3", "4", "9"}
    assert store.nbytes == 10 and store.stats.evictions == 3


def test_in_use_entry_is_never_evicted() -> None:
    store, evicted = make(max_entries=2)
    oldest = put(store, [1])
    store.acquire(oldest)
    store.acquire(oldest)  # counted
    for t in range(2, 6):
        put(store, [t])
    assert oldest in store and evicted == ["2", "3", "4"]
    store.release(oldest)
    put(store, [6])
    assert oldest in store
    store.release(oldest)
    put(store, [7])
    assert oldest not in store and evicted[-1] == "1"


def test_use_context_manager_releases_on_error() -> None:
    store, _ = make()
    entry = put(store, [1])
    with pytest.raises(RuntimeError), store.use(entry) as held:
        assert held is entry and entry.in_use == 1
        raise RuntimeError
    assert entry.in_use == 0


def test_pinned_evicted_last() -> None:
    store, evicted = make(max_entries=3)
    system = put(store, [0, 1], pinned=True)
    put(store, [2])
    put(store, [3])
    put(store, [4])
    put(store, [5])
    assert system in store and evicted == ["2", "3"]
    a, b = store.longest_prefix([4]), store.longest_prefix([5])
    assert a is not None and b is not None
    store.acquire(a.entry)
    store.acquire(b.entry)
    put(store, [6])  # only the pinned entry can go
    assert system not in store and evicted[-1] == "01"


def test_pinned_oldest_first_among_pinned() -> None:
    store, evicted = make(max_entries=2)
    put(store, [1], pinned=True)
    put(store, [2], pinned=True)
    store.longest_prefix([1])
    put(store, [3], pinned=True)
    assert evicted == ["2"]


def test_redundant_prefix_evicted_first() -> None:
    store, evicted = make(max_entries=3)
    put(store, [7, 7])  # oldest, not redundant
    put(store, [1, 2, 3])
    put(store, [1, 2, 3, 4])  # makes [1, 2, 3] redundant
    put(store, [9])
    assert evicted == ["123"] and payloads(store) == {"77", "1234", "9"}


def test_prefix_used_more_recently_is_not_redundant() -> None:
    store, evicted = make(max_entries=3)
    put(store, [1, 2, 3, 4])
    put(store, [1, 2, 3])  # newer than its extension
    put(store, [5])
    put(store, [9])
    assert evicted == ["1234"]


def test_pinned_prefix_is_not_redundant() -> None:
    store, evicted = make(max_entries=3)
    put(store, [1, 2], pinned=True)
    put(store, [5])
    put(store, [1, 2, 3])
    put(store, [9])
    assert evicted == ["5"]


def test_on_evict_only_for_cap_evictions() -> None:
    store, evicted = make(max_entries=2)
    a = put(store, [1])
    b = put(store, [1], nbytes=2)  # replace
    assert store.remove(b)
    put(store, [2])
    put(store, [3])
    store.clear()
    assert evicted == [] and a not in store
    put(store, [4])
    put(store, [5])
    put(store, [6])
    assert evicted == ["4"] and store.stats.evictions == 1


# ------------------------------------------------------------------ remove / clear


def test_remove() -> None:
    store, _ = make()
    a = put(store, [1, 2])
    b = put(store, [1, 3])
    assert store.remove(a) and not store.remove(a)
    with store.use(b):
        assert not store.remove(b)
    assert store.remove(b) and len(store) == 0 and store.nbytes == 0
    assert store._node_count() == 1


def test_clear_keeps_in_use_entries() -> None:
    store, evicted = make()
    entries = [put(store, [t, t + 1]) for t in range(5)]
    store.acquire(entries[2])
    assert store.clear() == 4
    assert list(store) == [entries[2]] and store.nbytes == 1 and evicted == []
    store.release(entries[2])
    assert store.clear() == 1 and len(store) == 0 and store._node_count() == 1


def test_stats_snapshot() -> None:
    store, _ = make(max_entries=1, max_bytes=5)
    put(store, [1], nbytes=2)
    put(store, [1], nbytes=3)
    store.insert([2], "x", 9)
    put(store, [3], nbytes=4)
    store.longest_prefix([3, 1])
    store.longest_prefix([4])
    assert store.stats == StoreStats(
        entries=1, nbytes=4, inserts=3, replaced=1, evictions=1, rejected=1, lookups=2, hits=1
    )


# ---------------------------------------------------------------- tree structure


def test_nodes_split_and_merge() -> None:
    store, _ = make()
    a = put(store, [1, 2, 3, 4])
    b = put(store, [1, 2, 5])
    c = put(store, [1, 2])
    assert store._node_count() == 4  # root, [1 2], [3 4], [5]
    store.remove(c)
    assert store._node_count() == 4  # [1 2] still branches
    store.remove(b)
    assert store._node_count() == 2  # merged back into one edge
    store._check_invariants()
    assert store.longest_prefix([1, 2, 5]) == Match(a, 2)


def test_no_node_growth_over_many_cycles() -> None:
    store, evicted = make(max_entries=4)
    for i in range(2000):
        put(store, [i % 7, (i * 3) % 5, i % 11, i % 13][: 1 + i % 4])
        assert store._node_count() <= 2 * len(store) + 1
    store._check_invariants()
    assert len(store) == 4 and len(evicted) + len(store) + store.stats.replaced == 2000


def test_lookup_accepts_any_int_sequence() -> None:
    store, _ = make()
    entry = put(store, (5, 6, 7))
    assert store.longest_prefix(range(5, 9)) == Match(entry, 3)
    assert store.longest_prefix([5, 6, 7]) == Match(entry, 3)


# ------------------------------------------------------------------- property tests

TOKENS = st.lists(st.integers(0, 3), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(TOKENS, max_size=30), st.lists(st.lists(st.integers(0, 3), max_size=14)))
def test_longest_prefix_matches_brute_force(
    keys: list[list[int]], queries: list[list[int]]
) -> None:
    store: PrefixStore[int] = PrefixStore(1000, 10**9)
    for i, key in enumerate(keys):
        store.insert(key, i, 1)
    store._check_invariants()
    for query in queries + keys:
        expected = max((lcp(e.tokens, query) for e in store), default=0)
        match = store.longest_prefix(query, touch=False)
        if expected == 0:
            assert match is None
        else:
            assert match is not None and match.length == expected
            assert lcp(match.entry.tokens, query) == expected


class StoreMachine(RuleBasedStateMachine):
    """Random op sequences checked against a brute-force model of held entries."""

    def __init__(self) -> None:
        super().__init__()
        self.store: PrefixStore[int] = PrefixStore(1, 1)
        self.held: dict[tuple[int, ...], Entry[int]] = {}
        self.gone: list[Entry[int]] = []  # entries once held, now dropped
        self.evicted: list[Entry[int]] = []
        self.inserting: tuple[int, ...] | None = None
        self.counter = 0

    @initialize(max_entries=st.integers(1, 6), max_bytes=st.integers(1, 30))
    def setup(self, max_entries: int, max_bytes: int) -> None:
        self.store = PrefixStore(max_entries, max_bytes, on_evict=self.on_evict)

    def on_evict(self, victim: Entry[int]) -> None:
        """Check the victim against a brute-force reading of the eviction order."""
        assert victim.in_use == 0 and victim not in self.store
        assert victim.tokens != self.inserting, "new entry evicted by its own insert"
        pool = [*self.store, victim]

        def klass(e: Entry[int]) -> int:
            if e.pinned:
                return 2
            newer_ext = any(
                len(o.tokens) > len(e.tokens)
                and o.tokens[: len(e.tokens)] == e.tokens
                and o.last_used > e.last_used
                for o in pool
            )
            return 0 if newer_ext else 1

        candidates = [e for e in pool if not e.in_use and e.tokens != self.inserting]
        best = min(candidates, key=lambda e: (klass(e), e.last_used))
        assert best is victim
        self.evicted.append(victim)

    def in_use(self) -> tuple[int, int]:
        used = [e for e in self.held.values() if e.in_use]
        return len(used), sum(e.nbytes for e in used)

    @rule(tokens=TOKENS, nbytes=st.integers(0, 12), pinned=st.booleans())
    def insert(self, tokens: list[int], nbytes: int, pinned: bool) -> None:
        key = tuple(tokens)
        old = self.held.get(key)
        count, used_bytes = self.in_use()
        fits = (
            nbytes <= self.store.max_bytes
            and not (old is not None and old.in_use)
            and count + 1 <= self.store.max_entries
            and used_bytes + nbytes <= self.store.max_bytes
        )
        self.counter += 1
        self.inserting = key
        entry = self.store.insert(tokens, self.counter, nbytes, pinned=pinned)
        self.inserting = None
        assert (entry is not None) == fits
        if entry is None:
            assert not self.evicted
            return
        assert entry.tokens == key and entry.payload == self.counter and entry in self.store
        if old is not None:
            self.gone.append(old)
        self.held[key] = entry
        for victim in self.evicted:
            assert self.held.pop(victim.tokens) is victim
            self.gone.append(victim)
        self.evicted.clear()

    @rule(query=st.lists(st.integers(0, 3), max_size=14), touch=st.booleans())
    def lookup(self, query: list[int], touch: bool) -> None:
        recency = {e: e.last_used for e in self.held.values()}
        best_len = max((lcp(e.tokens, query) for e in self.held.values()), default=0)
        match = self.store.longest_prefix(query, touch=touch)
        if best_len == 0:
            assert match is None
            return
        assert match is not None and match.length == best_len
        ties = [e for e in self.held.values() if lcp(e.tokens, query) == best_len]
        expected = min(ties, key=lambda e: (len(e.tokens), -recency[e]))
        assert match.entry is expected
        assert (match.entry.last_used > recency[expected]) == touch

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def acquire(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(sorted(self.held.values(), key=lambda e: e.tokens)))
        self.store.acquire(entry)

    @precondition(lambda self: any(e.in_use for e in self.held.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        used = sorted((e for e in self.held.values() if e.in_use), key=lambda e: e.tokens)
        entry = data.draw(st.sampled_from(used))
        self.store.release(entry)
        assert not self.evicted  # caps already hold, so releasing never evicts

    @precondition(lambda self: self.held or self.gone)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        pool = sorted(self.held.values(), key=lambda e: e.tokens) + self.gone[-5:]
        entry = data.draw(st.sampled_from(pool))
        removable = self.held.get(entry.tokens) is entry and not entry.in_use
        assert self.store.remove(entry) == removable
        if removable:
            del self.held[entry.tokens]
            self.gone.append(entry)
        elif entry.in_use == 0:
            with pytest.raises(ValueError):
                self.store.release(entry)

    @rule()
    def clear(self) -> None:
        dropped = [k for k, e in self.held.items() if not e.in_use]
        assert self.store.clear() == len(dropped)
        for key in dropped:
            self.gone.append(self.held.pop(key))

    @invariant()
    def consistent(self) -> None:
        store = self.store
        store._check_invariants()
        entries = list(store)
        assert len(entries) == len(store) == len(self.held)
        assert set(entries) == set(self.held.values())
        assert store.nbytes == store.stats.nbytes == sum(e.nbytes for e in entries)
        assert store.stats.entries == len(entries)
        # Caps always hold: an insert that would need in-use entries evicted is refused.
        assert len(store) <= store.max_entries and store.nbytes <= store.max_bytes
        assert all(e not in store for e in self.gone if e not in self.held.values())


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
