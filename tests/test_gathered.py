"""One handling at a time, each taking everything handed in while the one before ran."""

import asyncio

import pytest

from bilten.batching import Gathered


class Recorder:
    """A handler that records what each handling got and holds it until released."""

    def __init__(self) -> None:
        self.handled: list[dict[str, int]] = []
        self.release = asyncio.Event()
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: dict[str, int]) -> dict[str, int]:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.handled.append(dict(items))
        await self.release.wait()
        self.running -= 1
        if "boom" in items:
            raise RuntimeError("boom")
        return {k: v * 10 for k, v in items.items() if k != "lost"}


async def test_calls_made_while_one_runs_are_handled_together_next():
    gathered: Gathered[str, int, int] = Gathered()
    handle = Recorder()
    first = asyncio.ensure_future(gathered.call({"a": 1}, handle))
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(gathered.call({k: n}, handle)) for n, k in enumerate("bcd")]
    await asyncio.sleep(0.01)
    assert handle.handled == [{"a": 1}]  # the others wait for the one running
    handle.release.set()
    assert await first == {"a": 10}
    assert [await c for c in later] == [{"b": 0}, {"c": 10}, {"d": 20}]
    assert handle.handled == [{"a": 1}, {"b": 0, "c": 1, "d": 2}]
    assert handle.most_running == 1
    assert gathered.runner is None and not gathered.waiting


async def test_each_caller_gets_only_the_keys_the_handler_answered():
    gathered: Gathered[str, int, int] = Gathered()
    handle = Recorder()
    handle.release.set()
    assert await gathered.call({"x": 1, "lost": 2}, handle) == {"x": 10}


async def test_a_failed_handling_of_several_calls_fails_only_the_call_at_fault():
    gathered: Gathered[str, int, int] = Gathered()
    handle = Recorder()
    first = asyncio.ensure_future(gathered.call({"a": 1}, handle))
    await asyncio.sleep(0)
    bad = asyncio.ensure_future(gathered.call({"boom": 1}, handle))
    mate = asyncio.ensure_future(gathered.call({"b": 1}, handle))
    await asyncio.sleep(0)
    handle.release.set()
    assert await first == {"a": 10}
    with pytest.raises(RuntimeError):
        await bad
    assert await mate == {"b": 10}  # handled again on its own
    assert handle.handled[1:] == [{"boom": 1, "b": 1}, {"boom": 1}, {"b": 1}]
    assert await gathered.call({"c": 3}, handle) == {"c": 30}


async def test_a_failed_handling_of_one_call_fails_it_once():
    gathered: Gathered[str, int, int] = Gathered()
    handle = Recorder()
    handle.release.set()
    with pytest.raises(RuntimeError):
        await gathered.call({"boom": 1}, handle)
    assert handle.handled == [{"boom": 1}]


async def test_a_caller_that_gives_up_leaves_the_others_answered():
    gathered: Gathered[str, int, int] = Gathered()
    handle = Recorder()
    first = asyncio.ensure_future(gathered.call({"a": 1}, handle))
    await asyncio.sleep(0)
    quitter = asyncio.ensure_future(gathered.call({"b": 2}, handle))
    stayer = asyncio.ensure_future(gathered.call({"c": 3}, handle))
    await asyncio.sleep(0)
    quitter.cancel()
    handle.release.set()
    assert await first == {"a": 10}
    assert await stayer == {"c": 30}
    assert handle.handled[1] == {"b": 2, "c": 3}  # its items were still handled


async def test_a_cache_load_begun_before_a_drop_is_not_shared_after_it():
    """Callers that find no entry at the same moment share one load; once the entry is dropped
    (its data changed), a caller starts a load of its own instead of joining the older one,
    and the older one, ending, leaves the newer one in place."""
    from bilten.cache import LocalCache

    cache: LocalCache[str] = LocalCache(max_age=60)
    gate = asyncio.Event()
    loads = []

    async def load() -> str:
        n = len(loads)
        loads.append(n)
        await gate.wait()
        return f"load {n}"

    old = [asyncio.ensure_future(cache.get_or_load("k", load)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert loads == [0]  # one load for the three
    cache.drop("k")
    new = asyncio.ensure_future(cache.get_or_load("k", load))
    await asyncio.sleep(0.01)
    assert loads == [0, 1]
    later = asyncio.ensure_future(cache.get_or_load("k", load))
    await asyncio.sleep(0.01)
    gate.set()
    assert [await f for f in old] == ["load 0"] * 3
    assert await new == await later == "load 1"
    assert loads == [0, 1] and not cache.loading


def test_a_cache_bounded_by_bytes_keeps_the_newest_entries_within_them():
    from bilten.cache import LocalCache

    cache: LocalCache[bytes] = LocalCache(max_age=60, max_weight=100, weigh=len)
    for key in "abc":
        cache.put(key, b"x" * 40)
    assert [k for k in "abc" if cache.get(k)] == ["b", "c"] and cache.weight == 80
    cache.put("b", b"x" * 10)  # replaced: its old size goes
    assert cache.weight == 50
    cache.put("huge", b"x" * 500)  # bigger than the bound: kept alone, as the newest
    assert [k for k in ("b", "c", "huge") if cache.get(k)] == ["huge"] and cache.weight == 500
    cache.drop("huge")
    assert cache.weight == 0 and not cache.entries
    cache.put("d", b"x")
    cache.clear()
    assert cache.weight == 0


def test_the_change_counts_of_a_cache_are_bounded_and_loads_under_way_stay_refused(
    monkeypatch,
):
    from bilten import cache as cache_module
    from bilten.cache import LocalCache

    monkeypatch.setattr(cache_module, "DROPS_MAX", 3)
    cache: LocalCache[str] = LocalCache(max_age=60)
    cache.put("kept", "v")
    token = cache.token("a")  # a load of "a" begins
    for key in ("a", "b", "c"):
        cache.drop(key)
    later = cache.token("d")  # a load of "d" begins after those changes
    cache.drop("e")  # a fourth key: the counts start over, in a new epoch
    assert len(cache.drops) == 1
    cache.put("a", "stale", token)
    cache.put("d", "read before e changed, after the others", later)
    assert cache.get("a") is None and cache.get("d") is None  # both refused: safe side
    assert cache.get("kept") == "v"  # entries stay
    fresh = cache.token("a")
    cache.put("a", "new", fresh)
    assert cache.get("a") == "new"
