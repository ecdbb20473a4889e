"""Host runtime session: runs one task of a bundle, loading only the experts it activates.

A :class:`Session` composes three parts: :mod:`.expert_store` (reading and checking expert blobs),
:mod:`.dispatch` (routing each MoE layer's tokens to experts on the cache, prefetching ahead) and
:mod:`.task_switch` (what a task runs with, and the gate between runs and a switch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.format import read_manifest
from ..errors import ConfigError, InputError, TaskError, did_you_mean
from ..swap.budget import check_budget, expert_sizes, parse_budget
from ..swap.policies import make_policy
from ..swap.switch import switch_entry
from .dispatch import MoeDispatch
from .executor import Executor, get_executor
from .expert_cache import ExpertCache
from .expert_store import ExpertStore
from .program import TaskProgram
from .task_switch import RunGate, SwitchStats, TaskSetup, task_setup


@dataclass(frozen=True)
class SessionStats:
    """What a session has loaded so far.

    Attributes:
        experts_loaded: Distinct experts loaded since the session started.
        experts_task: Experts the task may use (its kept sets, all layers).
        experts_bundle: Experts shipped in the bundle.
        experts_total: Experts of the source model.
        expert_bytes_loaded: Bytes of expert weights read from the bundle.
        expert_bytes_task: Bytes of the task's kept experts.
        expert_bytes_total: Bytes of every expert of the source model (fp32).
        resident_expert_bytes: Expert bytes held in memory now (routed and shared experts).
        shared_expert_bytes: Bytes of always-resident shared experts.
        graph_bytes: Bytes of the graphs the task loaded (trunk, gates, head, kernels).
        runs: Calls to :meth:`Session.run`.
        memory_budget: Byte budget for expert weights (0: unbounded).
        cache_hits: Expert accesses that found the expert cached or loading.
        cache_misses: Expert accesses that loaded it on demand.
        evictions: Experts evicted to stay within the budget.
        prefetch_issued: Background prefetch loads started.
        prefetch_used: Prefetched experts accessed before eviction.
        prefetch_accuracy: Fraction of accesses whose expert was loaded or loading when needed.
        stall_ms: Time spent waiting for expert loads (all threads).
        peak_expert_bytes: Most routed-expert bytes cached or in flight at once.
        task_switches: Calls to :meth:`Session.switch_task` that changed the task.
        switch_bytes_unloaded: Expert bytes those switches freed.
        switch_bytes_loaded: Expert bytes those switches loaded (also in ``expert_bytes_loaded``).
        switch_ms: Wall time of those switches.
    """

    experts_loaded: int
    experts_task: int
    experts_bundle: int
    experts_total: int
    expert_bytes_loaded: int
    expert_bytes_task: int
    expert_bytes_total: int
    resident_expert_bytes: int
    shared_expert_bytes: int
    graph_bytes: int
    runs: int
    memory_budget: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_accuracy: float = 0.0
    stall_ms: float = 0.0
    peak_expert_bytes: int = 0
    task_switches: int = 0
    switch_bytes_unloaded: int = 0
    switch_bytes_loaded: int = 0
    switch_ms: float = 0.0


@dataclass(frozen=True)
class GenerationStats:
    """Timing of one :meth:`Session.generate` (wall clock, expert loads and stalls included).

    Attributes:
        prompt_tokens: Tokens of the prompt (one prefill step).
        tokens: Tokens generated.
        ttft_ms: Time to the first generated token (the prefill step and the first sampling).
        prefill_tok_s: Prompt tokens per second of the prefill step.
        decode_tok_s: Generated tokens per second after the first (one decode step each).
        cache_bytes: Bytes of the key/value cache (every position of every layer).
    """

    prompt_tokens: int
    tokens: int
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    cache_bytes: int


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token from one row of logits: greedy (temperature 0), else nucleus sampling.

    Args:
        logits: (vocab,) scores.
        temperature: Softmax temperature; 0 picks the highest score (the first of ties, as argmax).
        top_p: Sample from the smallest set of tokens whose probability reaches this (1: all).
        rng: Random generator of the sampling.
    """
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    prob = np.exp(z - z.max())
    prob /= prob.sum()
    order = np.argsort(-prob, kind="stable")
    keep = int(np.searchsorted(np.cumsum(prob[order]), top_p) + 1)
    top = order[:keep]
    return int(rng.choice(top, p=prob[top] / prob[top].sum()))


# Session's default for budget, policy and prefetch: what the bundle's swap schedule says.
BUNDLE = "bundle"


class Session:
    """Run one task of a bundle.

    Loads the shared trunk, the task's gates and head and one expert kernel per expert
    shape up front; expert weights are read lazily, on the first token routed to them,
    after checking their size and sha256.

    Args:
        bundle: Bundle folder.
        task: Task to run (may be omitted when the bundle has a single task).
        threads: Intra-op threads for the executor (0: its default).
        providers: Executor-specific accelerator preference (e.g. onnxruntime providers).
        recorder: Called with (graph name, inputs) on every graph call; the compiler uses it to
            collect calibration data for quantization.
        memory_budget: Memory for expert weights, shared experts included: bytes, or text as
            ``edgemoe run --memory-budget`` takes it (``25%`` of the routed expert bytes, ``6MB``);
            None: unbounded (every expert stays once loaded). Routed experts beyond it are evicted
            per ``policy``. Default (``"bundle"``): the bundle's schedule's budget when it has one
            (``compile --memory-budget`` / ``edgemoe plan``), else unbounded.
        policy: Eviction policy: ``lru``, ``lfu`` or ``planned`` (the bundle's schedule, or its
            calibration counts). Default (``"bundle"``): the schedule's policy, else ``lru``.
        prefetch: ``routed`` (a layer's misses start loading as soon as it is routed, while its
            cached experts run; every mode but None does this), or that plus a predictor of the
            next layers: ``pregate`` (next layer's gate on this layer's MoE input), ``affinity``
            or ``static`` (tables from the bundle's schedule), ``plan`` (the schedule's choice);
            None: load each expert on demand, when its turn comes. Default (``"bundle"``):
            ``plan`` when the bundle has a schedule that chose a predictor, else None.
        storage_gbs: Throttle expert loads to this bandwidth in GB/s (e.g. a device profile's
            ``load_gbs()``), to measure device-like load costs here; 0: unthrottled.
        prefetch_depth: MoE steps a prefetch looks ahead: the next layer from the predictor, the
            ones after it (wrapping to the next run's first layers) from the calibration order.
        executor: Executor to load the graphs with instead of the one the bundle names (e.g.
            :class:`~edgemoe.targets.tvm.remote.RemoteExecutor`, graphs on a device over TVM RPC).
        log_events: Keep the expert cache's decisions as :attr:`events` (``(step, layer, expert,
            kind)``; the log the simulator and the native runtime produce for the same trace).

    Raises:
        BundleError: Not a bundle, or a garbled manifest.
        IntegrityError: A file is missing or fails its size / sha256 check.
        TaskError: The task is not in the bundle.
        ConfigError: The budget cannot hold the shared experts, the schedule's resident set and
            the largest expert, or an unknown policy / predictor (a budget below a layer's top-k
            working set warns).
    """

    def __init__(
        self,
        bundle: str | Path,
        task: str | None = None,
        threads: int = 0,
        providers: tuple[str, ...] = (),
        recorder: Callable[[str, tuple[np.ndarray, ...]], None] | None = None,
        memory_budget: int | str | None = BUNDLE,
        policy: str = BUNDLE,
        prefetch: str | None = BUNDLE,
        storage_gbs: float = 0.0,
        prefetch_depth: int = 2,
        executor: Executor | None = None,
        log_events: bool = False,
    ):
        self.root = Path(bundle)
        self.manifest = m = read_manifest(self.root)
        tasks = m["tasks"]
        if task is None:
            if len(tasks) != 1:
                raise TaskError(f"bundle has tasks {', '.join(tasks)}: choose one")
            task = next(iter(tasks))
        if task not in tasks:
            raise TaskError(f"unknown task '{task}'{did_you_mean(task, tasks)} (bundle has: {', '.join(tasks)})")
        self.input_spec = m["input"]
        # An executor passed in (e.g. a remote one over TVM RPC) replaces the one the bundle names.
        self.executor = executor or get_executor(m["target"]["executor"], threads=threads, providers=providers)
        self.layers = m["moe_layers"]
        # The task's compute on the executor: graphs, or the whole model as one design.
        self.program: TaskProgram = self.executor.program(self.root, m, task, recorder)
        self._store = ExpertStore(self.root, m, self.executor)
        self._runs = 0
        self.last_generation: GenerationStats | None = None
        self.last_logits: np.ndarray | None = None
        self.last_routing: list[np.ndarray] = []
        # With ``record_pregate``, each run also keeps what the gate of layer l picked on layer l-1's
        # MoE input (None for layer 0): pre-gating predictions for traces (not part of the run).
        self.record_pregate = False
        self.last_pregate: list[np.ndarray | None] = []
        self._run_gate = RunGate()
        self.last_switch: SwitchStats | None = None
        self._switch_totals = [0, 0, 0, 0.0]  # switches, bytes unloaded, bytes loaded, ms
        if int(prefetch_depth) < 1:
            raise ConfigError(f"prefetch_depth must be at least 1, got {prefetch_depth}")
        self.prefetch_depth = int(prefetch_depth)
        budget, policy, self._prefetch_request = self._settings(memory_budget, policy, prefetch)
        setup = task_setup(m, self._store, task, self._prefetch_request)
        self._store.check_sizes(setup.kept)
        self.task, self.kept = task, setup.kept
        sizes = expert_sizes(m, task)
        capacity = sum(sizes.values()) if budget is None else self._check_budget(int(budget), setup)
        self.memory_budget = int(budget or 0)
        recency = setup.schedule.get("recency") if setup.schedule else None  # the planned policy's, on token plans
        self.program.reserve(capacity)
        self._cache = ExpertCache(
            capacity,
            sizes,
            make_policy(policy, setup.prob, recency),
            self._store.read,
            storage_gbs,
            self.executor.unplace,
            log=log_events,
        )
        self._dispatch = MoeDispatch(self._cache, len(self.layers), self.prefetch_depth)
        self._dispatch.set_plan(setup.prefetch, setup.near, setup.far, setup.resident)

    def _settings(self, budget, policy: str, prefetch: str | None) -> tuple[int | None, str, str | None]:
        """The budget (bytes or None), policy and predictor asked for, with ``"bundle"`` taken from the schedule.

        Raises:
            ConfigError: A budget text that is neither a percentage nor a size.
        """
        schedule = self.manifest.get("schedule") or {}
        if budget == BUNDLE:
            budget = schedule.get("budget_bytes")
        if isinstance(budget, str):
            budget = None if budget.strip().lower() in ("none", "unbounded") else parse_budget(budget, self.manifest)
        if policy == BUNDLE:
            policy = schedule.get("policy") or "lru"
        if prefetch == BUNDLE:
            prefetch = "plan" if schedule.get("predictor") else None
        self.settings = {
            "memory_budget": None if budget is None else int(budget),
            "policy": policy,
            "prefetch": prefetch,
            "schedule": bool(schedule),
        }
        return budget, policy, prefetch

    def _check_budget(self, budget: int, setup: TaskSetup) -> int:
        """The shared budget check (as ``edgemoe compile --memory-budget``), with the plan's resident set."""
        resident = int(setup.schedule["resident_bytes"]) if setup.schedule else 0
        return check_budget(self.manifest, budget, setup.task, resident)

    @property
    def prefetch(self) -> str | None:
        """The prefetch mode in use (None: experts load on demand only)."""
        return self._dispatch.prefetch

    # -- execution -------------------------------------------------------------------------
    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Validate an input batch against the bundle's input spec (adds a batch axis if missing)."""
        spec = self.input_spec
        x = np.asarray(x)
        if x.ndim == len(spec["shape"]) - 1:
            x = x[None]
        want = list(spec["shape"])
        if x.ndim != len(want) or any(w is not None and w != s for w, s in zip(want, x.shape, strict=True)):
            shown = ["*" if d is None else d for d in want]
            raise InputError(f"input has shape {list(x.shape)}, bundle expects {shown} (* = any size)")
        kind = np.dtype(spec["dtype"]).kind
        if kind == "f":
            if x.dtype.kind not in "fiu":
                raise InputError(f"input has dtype {x.dtype}, bundle expects {spec['dtype']}")
            x = x.astype(spec["dtype"], copy=False)
            if not np.isfinite(x).all():
                raise InputError("input contains NaN or Inf")
        elif kind in "iu":
            if x.dtype.kind not in "iu":
                raise InputError(f"input has dtype {x.dtype}, bundle expects integer ids ({spec['dtype']})")
            high = spec.get("high")
            if x.size and (x.min() < 0 or (high is not None and x.max() >= high)):
                raise InputError(f"input ids must lie in [0, {high}), got [{x.min()}, {x.max()}]")
            x = x.astype(spec["dtype"], copy=False)
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run the task on an input batch and return the head's output (waits while a task switch runs)."""
        return self._forward(self.check_input(x))

    def generate(
        self,
        prompt,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: int | None = None,
    ) -> Iterator[int]:
        """Generate tokens after ``prompt``, one per step, on the bundle's key/value cache.

        The prompt runs as one prefill step, then each new token as one decode step through the
        generation graphs (``compile --max-seq``); every step routes its tokens through the MoE
        layers like :meth:`run` (expert cache, budget, prefetch per step). Timing of the last
        finished generation is :attr:`last_generation`; the logits each token was chosen from are
        :attr:`last_logits` when it is yielded.

        Args:
            prompt: Token ids (1-D).
            max_new_tokens: Tokens to generate (fewer when ``stop`` comes first).
            temperature: 0: greedy; else sampling at this temperature.
            top_p: Nucleus sampling threshold (with ``temperature`` > 0).
            seed: Seed of the sampling.
            stop: A token id that ends the generation (it is yielded).

        Yields:
            Each generated token id as soon as it is chosen.

        Raises:
            BundleError: The bundle has no generation graphs.
            InputError: Bad prompt ids, or prompt + new tokens beyond the cache's positions.
            ConfigError: Bad sampling settings.
        """
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise InputError(f"a prompt is a non-empty 1-D list of token ids, got shape {list(ids.shape)}")
        ids = self.check_input(ids[None])
        if int(max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        decoder = self.program.decoder()
        if ids.shape[1] + int(max_new_tokens) - 1 > decoder.max_seq:
            raise InputError(
                f"prompt ({ids.shape[1]} tokens) + {max_new_tokens} new tokens need "
                f"{ids.shape[1] + int(max_new_tokens) - 1} cache positions; the bundle has {decoder.max_seq} "
                "(compile with a larger --max-seq)"
            )
        return self._generate(ids, int(max_new_tokens), temperature, top_p, np.random.default_rng(seed), stop, decoder)

    def _generate(self, ids, max_new, temperature, top_p, rng, stop, decoder) -> Iterator[int]:
        self.last_generation = None
        t0 = time.perf_counter()
        x, produced, first_s, decode_s = ids, 0, 0.0, 0.0
        while produced < max_new:
            t = time.perf_counter()
            logits = self._forward(x, decoder)
            decoder.advance(x.shape[1])
            self.last_logits = logits[0, -1]
            token = sample_token(self.last_logits, temperature, top_p, rng)
            produced += 1
            if produced == 1:
                first_s = time.perf_counter() - t0
            else:
                decode_s += time.perf_counter() - t
            yield token
            if token == stop:
                break
            x = np.array([[token]], dtype=ids.dtype)
        self.last_generation = GenerationStats(
            prompt_tokens=int(ids.shape[1]),
            tokens=produced,
            ttft_ms=first_s * 1e3,
            prefill_tok_s=ids.shape[1] / first_s if first_s else 0.0,
            decode_tok_s=(produced - 1) / decode_s if decode_s else 0.0,
            cache_bytes=decoder.cache_bytes,
        )

    def _forward(self, x: np.ndarray, decoder=None) -> np.ndarray:
        """One pass through the task: a plain run, or a generation step on ``decoder``'s cache."""
        with self._run_gate.run():
            self.last_routing = []
            self.last_pregate = [None] if self.record_pregate and self.layers else []
            pregate = self.last_pregate if self.record_pregate else None
            # The first layers' experts load while the trunk runs (the previous run's last layer
            # usually queued them already).
            self._dispatch.begin()
            run = self.program.start(x) if decoder is None else self.program.start_step(x, decoder)
            for layer in range(len(self.layers)):
                self._dispatch.layer(self.program, run, layer, self.task, self.kept[layer], self.last_routing, pregate)
            y = self.program.output(run)
            self._runs += 1
            return y

    def switch_task(self, task: str, wait: bool = True) -> SwitchStats:
        """Switch this live session to another task of the bundle, keeping its expert cache.

        Follows the bundle schedule's ``"A->B"`` plan (``edgemoe plan`` or ``compile
        --memory-budget``; without one, the same steps with no resident set): frees the cached
        experts the new task never routes to (never one a kernel holds), then loads the new
        task's resident set, freeing the old task's resident experts first when it needs room.
        Experts both tasks use stay cached. The new task's gates and head replace the old ones.
        Runs in flight finish on the old task first; runs called meanwhile wait for the switch.
        Outputs afterwards are those of a fresh ``Session(bundle, task)``.

        Args:
            task: Task to switch to (the current one: nothing happens).
            wait: Load the resident set before returning; else in the background (a run waits
                only for the experts it needs).

        Returns:
            What the switch moved; also kept as :attr:`last_switch` and summed in :attr:`stats`.

        Raises:
            TaskError: The task is not in the bundle.
            ConfigError: The memory budget cannot hold the new task's resident set plus its
                largest expert, or its schedule lacks the prefetch plan asked for (the session
                stays on its task).
            IntegrityError: A graph of the new task fails its check (the session stays on its
                task), or, with ``wait``, an expert of its resident set does.
        """
        tasks = self.manifest["tasks"]
        if task not in tasks:
            raise TaskError(f"unknown task '{task}'{did_you_mean(task, tasks)} (bundle has: {', '.join(tasks)})")
        with self._run_gate.switch():
            return self._switch(task, wait)

    def _switch(self, task: str, wait: bool) -> SwitchStats:
        start = time.perf_counter()
        source = self.task
        if task == source:
            return SwitchStats(source, task, 0, 0, 0, 0, 0, 0.0)
        # Everything that can fail before the session changes: prefetch plan, budget, graphs.
        setup = task_setup(self.manifest, self._store, task, self._prefetch_request)
        if self.memory_budget:
            self._check_budget(self.memory_budget, setup)
        program = self.program.switch(task)
        self.task, self.kept, self.program = task, setup.kept, program
        self._dispatch.set_plan(setup.prefetch, setup.near, setup.far, setup.resident)
        sizes = expert_sizes(self.manifest, task)
        capacity = self._cache.book.capacity
        program.reserve(capacity if self.memory_budget else max(capacity, sum(sizes.values())))
        experts_start = time.perf_counter()
        moves = self._cache.switch(
            sizes,
            setup.resident,
            switch_entry(self.manifest.get("schedule"), source, task),
            setup.prob,
            capacity=None if self.memory_budget else sum(sizes.values()),  # unbounded: the new task's experts all fit
            wait=wait,
        )
        out = SwitchStats(
            source=source,
            target=task,
            experts_unloaded=len(moves.evicted),
            experts_loaded=len(moves.loaded),
            experts_skipped=len(moves.skipped),
            bytes_unloaded=moves.bytes_unloaded,
            bytes_loaded=moves.bytes_loaded,
            time_ms=(time.perf_counter() - start) * 1e3,
            experts_ms=(time.perf_counter() - experts_start) * 1e3,
            unloaded=moves.evicted,
            loaded=moves.loaded,
        )
        self.last_switch = out
        totals = self._switch_totals
        totals[0] += 1
        totals[1] += out.bytes_unloaded
        totals[2] += out.bytes_loaded
        totals[3] += out.time_ms
        return out

    def timed_run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """:meth:`run`, also returning the wall time in milliseconds."""
        start = time.perf_counter()
        y = self.run(x)
        return y, (time.perf_counter() - start) * 1e3

    @property
    def loaded_experts(self) -> dict[int, tuple[int, ...]]:
        """Experts loaded so far, per layer."""
        out: dict[int, list[int]] = {i: [] for i in range(len(self.layers))}
        for layer, expert in sorted(self._cache.data):
            out[layer].append(expert)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def stats(self) -> SessionStats:
        """Counters of what was loaded (see :class:`SessionStats`)."""
        totals = self.manifest["totals"]
        task_bytes = self._store.task_bytes(self.kept)
        cache, book = self._cache, self._cache.book
        with cache._cond:
            resident = sum(book.sizes[k] for k in cache.data)  # blob bytes (weights may sit on a device)
            accesses = book.hits + book.misses
            counters = {
                "memory_budget": self.memory_budget,
                "cache_hits": book.hits,
                "cache_misses": book.misses,
                "evictions": book.evictions,
                "prefetch_issued": cache.prefetch_issued,
                "prefetch_used": cache.prefetch_used,
                "prefetch_accuracy": book.hits / accesses if accesses else 0.0,
                "stall_ms": cache.stall_s * 1e3,
                "peak_expert_bytes": book.peak,
            }
        switches, unloaded, loaded, switch_ms = self._switch_totals
        counters.update(
            task_switches=switches,
            switch_bytes_unloaded=unloaded,
            switch_bytes_loaded=loaded,
            switch_ms=switch_ms,
        )
        return SessionStats(
            experts_loaded=len(cache.ever),
            experts_task=sum(len(k) for k in self.kept),
            experts_bundle=int(totals["experts_bundle"]),
            experts_total=int(totals["experts_model"]),
            expert_bytes_loaded=book.bytes_loaded,
            expert_bytes_task=task_bytes,
            expert_bytes_total=int(totals["expert_bytes_model"]),
            resident_expert_bytes=resident + self.program.shared_bytes,
            shared_expert_bytes=self.program.shared_bytes,
            graph_bytes=self.program.graph_bytes,
            runs=self._runs,
            **counters,
        )

    @property
    def cache_capacity(self) -> int:
        """Bytes the expert cache may hold (routed experts: the budget less the shared experts)."""
        return self._cache.book.capacity

    @property
    def events(self) -> list[tuple[int, int, int, str]]:
        """The expert cache's decisions so far (with ``log_events``): ``(step, layer, expert, kind)``."""
        events = self._cache.book.events
        if events is None:
            raise ConfigError("the session was opened without log_events=True")
        return list(events)

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Wait until the background loads issued so far have landed (e.g. between timed runs).

        Returns:
            False if ``timeout`` seconds passed first.
        """
        return self._cache.wait_idle(timeout)

    def close(self) -> None:
        """Stop the background prefetch loader (the session stays usable; prefetch restarts it)."""
        self._cache.close()
