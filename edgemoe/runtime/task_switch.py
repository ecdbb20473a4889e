"""Task switching: what a session runs one task with, and the gate between runs and a switch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..swap.policies import count_probabilities
from .dispatch import choose_predictor
from .expert_store import ExpertStore


@dataclass(frozen=True)
class SwitchStats:
    """What one :meth:`Session.switch_task` moved.

    Attributes:
        source: Task switched from.
        target: Task switched to.
        experts_unloaded: Experts freed (the new task never uses them, or the plan unloads them for room).
        experts_loaded: Experts of the new task's resident set loaded.
        experts_skipped: Experts the new task never uses left cached (held by a kernel or loading).
        bytes_unloaded: Bytes freed.
        bytes_loaded: Bytes loaded (queued in the background when the switch did not wait).
        time_ms: Wall time of the switch (graphs and experts), after runs in flight finished.
        experts_ms: The part of it spent on experts (waiting for loads in flight, freeing,
            loading the resident set when waited for): what the simulator predicts as ``load_s``.
        unloaded: The experts freed, as ``(layer, expert)``.
        loaded: The experts loaded, as ``(layer, expert)``.
    """

    source: str
    target: str
    experts_unloaded: int
    experts_loaded: int
    experts_skipped: int
    bytes_unloaded: int
    bytes_loaded: int
    time_ms: float
    experts_ms: float = 0.0
    unloaded: tuple[tuple[int, int], ...] = ()
    loaded: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class TaskSetup:
    """Everything a session runs one task with, computed before the session changes.

    Attributes:
        task: The task.
        kept: The experts it may route to, per layer.
        schedule: The bundle schedule's plan for it (None without a schedule).
        prob: Its per-layer expert probabilities (the schedule's, else calibration counts).
        resident: The plan's resident set, as ``(layer, expert)``.
        prefetch: The prefetch mode (None: loads on demand).
        near: The next-layer predictor, or None.
        far: The calibration order for the steps beyond the next layer, or None.
    """

    task: str
    kept: list[frozenset[int]]
    schedule: dict | None
    prob: list[list[float]]
    resident: tuple[tuple[int, int], ...]
    prefetch: str | None
    near: object
    far: object


def task_setup(manifest: dict, store: ExpertStore, task: str, prefetch: str | None) -> TaskSetup:
    """What a session needs to run ``task`` (a known task of the bundle) with the prefetch asked for.

    Raises:
        ConfigError: The predictor needs a schedule the bundle lacks, or is unknown.
        BundleError: The task keeps experts the bundle does not list.
    """
    record = manifest["tasks"][task]
    schedule = manifest.get("schedule", {}).get("tasks", {}).get(task)
    prob = schedule["probability"] if schedule else count_probabilities(manifest, task)
    mode, near, far = choose_predictor(prefetch, schedule, prob)
    kept = store.kept_sets(task, record)
    resident = tuple(tuple(k) for k in schedule.get("resident", [])) if schedule else ()
    return TaskSetup(task, kept, schedule, prob, resident, mode, near, far)


class RunGate:
    """Runs in flight vs a task switch: a switch waits for the runs to finish, runs wait for a switch."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._active = 0
        self._switching = False

    @contextmanager
    def run(self) -> Iterator[None]:
        """Hold the gate open for one run (waits while a switch is under way)."""
        with self._cv:
            while self._switching:
                self._cv.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()

    @contextmanager
    def switch(self) -> Iterator[None]:
        """Hold the gate shut for one switch (waits for other switches, then for the runs in flight)."""
        with self._cv:
            while self._switching:
                self._cv.wait()
            self._switching = True
            while self._active:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._switching = False
                self._cv.notify_all()
