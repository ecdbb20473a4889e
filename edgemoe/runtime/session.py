"""Host runtime session: runs one task of a bundle, loading only the experts it activates."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.format import check_blob_sizes, decode_expert, read_manifest, read_verified
from ..errors import BundleError, ConfigError, InputError, TaskError, did_you_mean
from ..swap.budget import check_budget, expert_sizes, parse_budget
from ..swap.policies import count_probabilities, make_policy
from ..swap.predict import PREDICTORS, PreGate, Static, lookahead, predictor_from_json
from ..swap.step import begin_run, run_step
from ..swap.switch import switch_entry
from .executor import Executor, get_executor
from .expert_cache import ExpertCache
from .program import TaskProgram


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


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a checked file's bytes without reading them: size, inode, mtime and ctime."""
    return (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


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
        prefetch: Prefetch predictor: ``pregate`` (next layer's gate on this layer's MoE input),
            ``affinity`` or ``static`` (tables from the bundle's schedule), ``plan`` (the
            schedule's choice) or None. Default (``"bundle"``): ``plan`` when the bundle has a
            schedule that chose a predictor, else None.
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
        self.task = task
        self._task = tasks[task]
        self.input_spec = m["input"]
        # An executor passed in (e.g. a remote one over TVM RPC) replaces the one the bundle names.
        self.executor = executor or get_executor(m["target"]["executor"], threads=threads, providers=providers)
        self.layers = m["moe_layers"]
        # The task's compute on the executor: graphs, or the whole model as one design.
        self.program: TaskProgram = self.executor.program(self.root, m, task, recorder)
        self._records = [{e["index"]: e for e in layer["experts"]} for layer in self.layers]
        self.kept = self._kept_sets(task, self._task)
        # The cache allocates each expert's buffer from its record's size before the blob's sha256
        # check: a record must not make it allocate more than the file holds.
        check_blob_sizes(self.root, (self._records[li][e] for li, keep in enumerate(self.kept) for e in keep))
        self._runs = 0
        self.last_generation: GenerationStats | None = None
        self.last_logits: np.ndarray | None = None
        self.last_routing: list[np.ndarray] = []
        # With ``record_pregate``, each run also keeps what the gate of layer l picked on layer l-1's
        # MoE input (None for layer 0): pre-gating predictions for traces (not part of the run).
        self.record_pregate = False
        self.last_pregate: list[np.ndarray | None] = []
        self._verified: dict[tuple[int, int], tuple[Path, tuple[int, int, int]]] = {}
        # Runs in flight vs a task switch: a switch waits for them, runs wait for a switch.
        self._switch_cv = threading.Condition()
        self._active = 0
        self._switching = False
        self.last_switch: SwitchStats | None = None
        self._switch_totals = [0, 0, 0, 0.0]  # switches, bytes unloaded, bytes loaded, ms
        if int(prefetch_depth) < 1:
            raise ConfigError(f"prefetch_depth must be at least 1, got {prefetch_depth}")
        self.prefetch_depth = int(prefetch_depth)
        self._setup_cache(*self._settings(memory_budget, policy, prefetch), storage_gbs, log_events)

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

    def _kept_sets(self, task: str, record: dict) -> list[frozenset[int]]:
        kept = [frozenset(s) for s in record["experts"]]
        for li, keep in enumerate(kept):
            missing = keep - set(self._records[li])
            if missing:
                raise BundleError(
                    f"garbled manifest: task '{task}' keeps experts {sorted(missing)} of layer {li}, "
                    "which the bundle does not list"
                )
        return kept

    def _task_schedule(self, task: str) -> dict | None:
        """The bundle schedule's plan for ``task`` (None without a schedule)."""
        return self.manifest.get("schedule", {}).get("tasks", {}).get(task)

    def _check_budget(self, budget: int, task: str, schedule: dict | None) -> int:
        """The shared budget check (as ``edgemoe compile --memory-budget``), with the plan's resident set."""
        return check_budget(self.manifest, budget, task, int(schedule["resident_bytes"]) if schedule else 0)

    def _setup_cache(
        self, budget: int | None, policy: str, prefetch: str | None, storage_gbs: float, log: bool = False
    ) -> None:
        sizes = expert_sizes(self.manifest, self.task)
        schedule = self._task_schedule(self.task)
        prob = schedule["probability"] if schedule else count_probabilities(self.manifest, self.task)
        capacity = sum(sizes.values()) if budget is None else self._check_budget(int(budget), self.task, schedule)
        self.memory_budget = int(budget or 0)
        recency = schedule.get("recency") if schedule else None  # the planned policy's, on token-routed plans
        self.program.reserve(capacity)
        self._cache = ExpertCache(
            capacity,
            sizes,
            make_policy(policy, prob, recency),
            self._read_expert,
            storage_gbs,
            self.executor.unplace,
            log=log,
        )
        self._prefetch_request = prefetch
        self.prefetch, self._predictor, self._far = self._make_predictor(prefetch, schedule, prob)
        # The plan's resident set: prefetches never evict it, so they do not trade hot experts for streamed ones.
        self._resident = tuple(tuple(k) for k in schedule.get("resident", [])) if schedule else ()

    def _make_predictor(self, prefetch: str | None, schedule: dict | None, prob: list[list[float]]):
        """(prefetch mode, next-layer predictor or None, calibration order for the steps beyond) for a task."""
        if prefetch is None:
            return None, None, None
        static = (schedule or {}).get("predictors", {}).get("static")
        far = predictor_from_json(static) if static else Static.from_probabilities(prob)
        if prefetch == "pregate":
            return prefetch, None, far
        if prefetch == "plan":
            if not schedule:
                raise ConfigError("prefetch='plan' needs a schedule in the bundle: run `edgemoe plan` first")
            if schedule.get("prefetch") is None:  # the plan found that no predictor pays on its device
                return None, None, None
            predictor = predictor_from_json(schedule["prefetch"])
        elif prefetch == "static" and not schedule:
            predictor = far
        elif prefetch in PREDICTORS:
            if not schedule:
                raise ConfigError(f"prefetch='{prefetch}' needs a schedule in the bundle: run `edgemoe plan` first")
            predictor = predictor_from_json(schedule.get("predictors", {}).get(prefetch, {"name": prefetch}))
        else:
            raise ConfigError(f"unknown prefetch predictor '{prefetch}' (known: {', '.join(PREDICTORS)}, plan)")
        if predictor.name == "pregate":
            return "pregate", None, far
        return prefetch, predictor, far

    def _read_expert(self, key: tuple[int, int], into: bytearray) -> dict[str, object]:
        """Read an expert blob into ``into`` (its size), sha256-checked on its first load, and place it.

        A reload after eviction skips the hash when the file's size, inode, mtime and ctime are
        still those it had when it was checked (hashing on every swap would cost more than the
        read). The ctime is the kernel's: a rewrite in place changes it even when the writer puts
        the size and mtime back.

        Returns:
            The expert's tensors: views on ``into``, or the executor's copies on its device
            (:meth:`~edgemoe.runtime.executor.Executor.place`).
        """
        record = self._records[key[0]][key[1]]
        known = self._verified.get(key)
        if known is not None:
            path, signature = known
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    st = os.fstat(fd)
                    # One read straight into the buffer the tensors will view.
                    if _signature(st) == signature and os.readv(fd, [into]) == len(into):
                        return self.executor.place(decode_expert(into, record["tensors"]))
                finally:
                    os.close(fd)
            except OSError:
                pass  # fall through to the full check, which reports it
        path = (self.root / record["file"]).resolve()
        st = path.stat() if path.is_file() else None  # before the check: a later change alters the signature
        memoryview(into)[:] = read_verified(self.root, record)  # checked to be the record's size, as ``into``
        weights = decode_expert(into, record["tensors"])
        if st is not None:
            self._verified[key] = (path, _signature(st))
        return self.executor.place(weights)

    def _check_kept(self, layer: int, expert: int) -> None:
        if expert not in self.kept[layer]:
            # The gate is masked to the kept set, so this means the bundle is inconsistent.
            raise BundleError(f"task '{self.task}' routed to expert {expert} of layer {layer}, outside its kept set")

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

    def _moe(self, run: object, layer: int) -> None:
        program, cache = self.program, self._cache
        idx, _ = program.route(run, layer)
        self.last_routing.append(idx)
        experts = [int(e) for e in np.unique(idx)]
        for e in experts:
            self._check_kept(layer, e)
        nxt = None
        if layer + 1 < len(self.layers) and (self.prefetch == "pregate" or self.record_pregate):
            nxt = program.pregate(run, layer + 1)
            if self.record_pregate:
                self.last_pregate.append(nxt)

        def run_expert(_j: int, key: tuple[int, int]) -> None:
            tok, slot = np.nonzero(idx == key[1])
            # Pinned while the kernel runs: eviction cannot free the weights under it.
            w = cache.acquire(key)
            try:
                program.expert(run, layer, key[1], tok, slot, w)
            finally:
                cache.release(key)

        keys = [(layer, e) for e in experts]
        run_step(cache, layer, keys, self._lookahead(layer, experts, nxt), self._resident, run_expert)
        program.finish_layer(run, layer)

    def _lookahead(self, layer: int, experts: list[int], nxt: np.ndarray | None) -> list[tuple[int, int]]:
        """The experts to prefetch at ``layer`` (-1: a run's start), in the order they will be needed.

        ``nxt``: the next layer's gate on this layer's MoE input (pre-gating), where computed.
        """
        if self.prefetch is None:
            return []
        near, pregate = self._predictor, None
        if self.prefetch == "pregate" and nxt is not None:
            # Pre-gating: the next layer's gate on this layer's MoE input names its experts one layer ahead.
            near, pregate = PreGate(), [int(e) for e in np.unique(nxt)]
        if layer < 0:
            near = None  # nothing routed yet: the calibration order names the first layers
        return lookahead(near, self._far, layer, experts, pregate, len(self.layers), self.prefetch_depth)

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
        with self._switch_cv:
            while self._switching:
                self._switch_cv.wait()
            self._active += 1
        try:
            self.last_routing = []
            self.last_pregate = [None] if self.record_pregate and self.layers else []
            if self.prefetch is not None:
                # The first layers' experts load while the trunk runs (the previous run's last layer
                # usually queued them already).
                begin_run(self._cache, self._lookahead(-1, [], None), self._resident)
            run = self.program.start(x) if decoder is None else self.program.start_step(x, decoder)
            for layer in range(len(self.layers)):
                self._moe(run, layer)
            y = self.program.output(run)
            self._runs += 1
            return y
        finally:
            with self._switch_cv:
                self._active -= 1
                self._switch_cv.notify_all()

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
        with self._switch_cv:
            while self._switching:
                self._switch_cv.wait()
            self._switching = True
            while self._active:
                self._switch_cv.wait()
        try:
            return self._switch(task, wait)
        finally:
            with self._switch_cv:
                self._switching = False
                self._switch_cv.notify_all()

    def _switch(self, task: str, wait: bool) -> SwitchStats:
        start = time.perf_counter()
        source = self.task
        if task == source:
            return SwitchStats(source, task, 0, 0, 0, 0, 0, 0.0)
        # Everything that can fail before the session changes: budget, prefetch plan, graphs.
        record = self.manifest["tasks"][task]
        schedule = self._task_schedule(task)
        prob = schedule["probability"] if schedule else count_probabilities(self.manifest, task)
        if self.memory_budget:
            self._check_budget(self.memory_budget, task, schedule)
        prefetch, predictor, far = self._make_predictor(self._prefetch_request, schedule, prob)
        kept = self._kept_sets(task, record)
        program = self.program.switch(task)
        self.task, self._task, self.kept, self.program = task, record, kept, program
        self.prefetch, self._predictor, self._far = prefetch, predictor, far
        self._resident = tuple(tuple(k) for k in schedule.get("resident", [])) if schedule else ()
        sizes = expert_sizes(self.manifest, task)
        capacity = self._cache.book.capacity
        program.reserve(capacity if self.memory_budget else max(capacity, sum(sizes.values())))
        experts_start = time.perf_counter()
        moves = self._cache.switch(
            sizes,
            self._resident,
            switch_entry(self.manifest.get("schedule"), source, task),
            prob,
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
        task_bytes = sum(int(self._records[li][e]["bytes"]) for li, kept in enumerate(self.kept) for e in kept)
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
