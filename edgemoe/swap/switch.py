"""A task switch on a live expert cache: what to free and what to load, following the schedule's plan.

The planner stores, per ``"A->B"``, the experts A caches that B never routes to (``drop_cached``),
A's resident experts B does not keep resident (``unload``) and B's resident set (``load`` then
``keep``). :func:`plan_switch` applies such an entry to a :class:`~edgemoe.swap.book.CacheBook`:
the runtime (:meth:`~edgemoe.runtime.Session.switch_task`) and the simulator
(:func:`~edgemoe.schedule.simulate.simulate_switch`) both call it, so for the same cache state they
move the very same experts. Pure Python: runs on devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .book import CacheBook, Key


@dataclass(frozen=True)
class SwitchMoves:
    """Experts a task switch frees and loads.

    Attributes:
        evicted: Experts freed: first those the new task never routes to, then any freed to make
            room for its resident set (the plan's ``unload`` list first).
        loaded: Experts reserved for loading, the new task's resident set in plan order (their
            loads are the caller's to run).
        skipped: Experts the new task never uses that could not be freed (pinned by a running
            kernel, or still loading); the policy evicts them later, as any other entry.
        bytes_unloaded: Bytes of ``evicted``.
        bytes_loaded: Bytes of ``loaded``.
    """

    evicted: tuple[Key, ...]
    loaded: tuple[Key, ...]
    skipped: tuple[Key, ...]
    bytes_unloaded: int
    bytes_loaded: int


def switch_entry(schedule: dict | None, source: str, target: str) -> dict | None:
    """The schedule's plan for switching from ``source`` to ``target`` (None without one)."""
    if not schedule:
        return None
    return schedule.get("task_switch", {}).get(f"{source}->{target}")


def _keys(items) -> list[Key]:
    return [(int(k[0]), int(k[1])) for k in items or ()]


def plan_switch(
    book: CacheBook,
    sizes: dict[Key, int],
    resident: Sequence[Key] = (),
    entry: dict | None = None,
    prob: Sequence[Sequence[float]] | None = None,
) -> SwitchMoves:
    """Apply a task switch to the cache bookkeeping (evicts and reserves in ``book``).

    Args:
        book: The cache as the old task left it.
        sizes: Bytes of each expert the new task keeps; added to what ``book`` may hold (entries
            of the old task stay known until they are evicted).
        resident: The new task's resident set from the schedule.
        entry: The schedule's ``"A->B"`` plan; None: free what the new task never uses, load
            ``resident``.
        prob: The new task's use probabilities, for the policy (the planned policy re-targets).

    Returns:
        What was freed, reserved for loading and left in place.
    """
    book.sizes.update(sizes)
    book.policy.new_task(prob)
    # Free what the new task never routes to: the plan's list, then anything else left from an
    # earlier task. Pinned or in-flight entries stay (a kernel may be reading them).
    drop = [k for k in _keys(entry.get("drop_cached")) if k not in sizes] if entry else []
    drop += sorted(k for k in book.cached if k not in sizes and k not in drop)
    evicted: list[Key] = []
    skipped: list[Key] = []
    for k in drop:
        if k not in book.cached:
            continue
        if not book.cached[k] or book.pins.get(k):
            skipped.append(k)
            continue
        book.evict(k)
        evicted.append(k)
    # Load the new task's resident set (the plan's load list, then its keep list: what an
    # earlier miss evicted). The old task's resident experts the plan unloads make room first.
    want = [*_keys(entry.get("load")), *_keys(entry.get("keep"))] if entry else []
    want += [k for k in _keys(resident) if k not in want]
    want = [k for k in want if k in sizes]
    unload = _keys(entry.get("unload")) if entry else []
    loaded: list[Key] = []
    for k in want:
        if k in book.cached:
            continue
        victims = book.room_for(k, keep=want, prefer=unload)
        if victims is None:
            break  # pinned or in-flight bytes leave no room: the rest loads on demand
        for v in victims:
            book.evict(v)
            evicted.append(v)
        book.reserve(k)
        loaded.append(k)
    return SwitchMoves(
        evicted=tuple(evicted),
        loaded=tuple(loaded),
        skipped=tuple(skipped),
        bytes_unloaded=sum(book.sizes[k] for k in evicted),
        bytes_loaded=sum(book.sizes[k] for k in loaded),
    )
