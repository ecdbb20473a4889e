"""Hardware in the loop over TVM RPC: a TVM bundle's graphs run and are timed on a remote device.

By default the remote is TVM's stock RPC server (``python -m tvm.exec.rpc_server``) on 127.0.0.1,
started here in its own process group; with ``EDGEMOE_RPC=HOST:PORT`` (or ``tracker:HOST:PORT:KEY``)
the same checks run against that board instead, and the ones that kill a server are skipped.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from helpers import read_manifest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")
pytest.importorskip("cloudpickle", reason="TVM's RPC server needs cloudpickle")

from edgemoe.bundle import sample_input
from edgemoe.config import CompileConfig
from edgemoe.errors import BundleError, ConfigError, RemoteError
from edgemoe.passes.capture_model import capture_model
from edgemoe.runtime import Session
from edgemoe.targets.tvm.remote import RemoteDevice, RemoteExecutor, parse_address, remote_session

pytestmark = [pytest.mark.slow, pytest.mark.hil]

EXTERNAL = os.environ.get("EDGEMOE_RPC", "").strip()
needs_local_server = pytest.mark.skipif(bool(EXTERNAL), reason="kills the RPC server: only with a local one")
START_S = 180  # a server comes up in seconds; generous for a loaded CI machine


class _Server:
    """``python -m tvm.exec.rpc_server`` on 127.0.0.1 in its own process group (its workers die with it)."""

    def __init__(self, tracker: str | None = None, key: str | None = None):
        base = _free_port()
        ports = ["--port", str(base), "--port-end", str(base + 100)]
        fleet = ["--tracker", tracker, "--key", key] if tracker else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", *ports, *fleet],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.port = None
        self.log: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)
            if self.port is None and "bind to 127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1])
                # The server logs the bind before it listens: wait for the listening socket.
                deadline = time.monotonic() + 30
                while not _listening(port) and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.port = port
                self._ready.set()
        self._ready.set()

    @property
    def address(self) -> str:
        if not self._ready.wait(START_S) or self.port is None:
            self.kill()
            pytest.fail("TVM RPC server did not start:\n" + "".join(self.log[-20:]))
        return f"127.0.0.1:{self.port}"

    def signal(self, sig):
        os.killpg(self.proc.pid, sig)

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            self.signal(signal.SIGKILL)
        self.proc.wait(30)


def _listening(port: int) -> bool:
    """Whether a socket listens on 127.0.0.1:port (from /proc/net/tcp, without connecting to it)."""
    try:
        with open("/proc/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        time.sleep(1.0)
        return True
    want = f"0100007F:{port:04X}"
    return any(r.split()[1] == want and r.split()[3] == "0A" for r in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers():
    """Servers started together up front (start-up is the slow part): one shared, the rest to kill."""
    pool = [] if EXTERNAL else [_Server() for _ in range(4)]
    yield pool
    for server in pool:
        server.kill()


@pytest.fixture(scope="module")
def address(servers):
    return EXTERNAL or servers[0].address


@pytest.fixture
def doomed(servers):
    """A server of its own, which the test may kill or stop."""
    return servers.pop()


@pytest.fixture(scope="module")
def bundle(bundle_factory):
    return bundle_factory("m3vit-micro", target="tvm")


def _recorded_inputs(bundle, task, x):
    """Every graph's inputs in one local run of ``task`` (first call per graph)."""
    seen = {}
    Session(bundle, task, recorder=lambda name, inputs: seen.setdefault(name, tuple(map(np.copy, inputs)))).run(x)
    return seen


def _dispatch_inputs(tokens_in: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """Inputs for the dispatch graphs (run only when activations stay on a GPU) shaped like a layer's."""
    rng = np.random.default_rng(4)
    dim = tokens_in.shape[-1]
    rows = np.array([0, 3, 5], dtype=np.int64)
    acc = rng.standard_normal((8, dim)).astype(np.float32)
    y = rng.standard_normal((3, dim)).astype(np.float32)
    w = rng.random(3).astype(np.float32)
    return {
        "dispatch_gather": (acc, rows),
        "dispatch_combine": (acc, rows, y, w),
        "dispatch_add": (acc, acc * 0.5, rng.random(8).astype(np.float32)),
    }


def test_every_graph_runs_remotely_as_locally(bundle, address):
    m = read_manifest(bundle)
    local = Session(bundle, next(iter(m["tasks"]))).executor
    executor = RemoteExecutor(address, timeout=60)
    try:
        checked = set()
        for task in m["tasks"]:
            x = sample_input(m["input"], batch=2, seed=3)
            recorded = _recorded_inputs(bundle, task, x)
            kernel_in = next(v for k, v in recorded.items() if k.startswith("expert_kernel"))[0]
            for name, inputs in (recorded | _dispatch_inputs(kernel_in)).items():
                want = local.load(bundle, m["graphs"][name]).run(*inputs)
                got = executor.load(bundle, m["graphs"][name]).run(*inputs)
                assert len(got) == len(want), name
                for g, w in zip(got, want, strict=True):
                    assert g.dtype == w.dtype and g.shape == w.shape, name
                    assert float(np.abs(g.astype(np.float64) - w).max()) <= 1e-4, name
                checked.add(name)
        assert checked == set(m["graphs"])  # segments, gates, heads, the expert kernel, dispatch
        # One upload per distinct library, however often it was loaded.
        assert len(executor.remote._modules) == len({g["sha256"] for g in m["graphs"].values()})
    finally:
        executor.close()


@pytest.mark.parametrize("model", ["m3vit-micro", "deepseek-lm-micro"])
def test_every_task_runs_remotely_like_torch(bundle_factory, address, model):
    bundle = bundle_factory(model, target="tvm")
    m = read_manifest(bundle)
    adapter = capture_model(CompileConfig(model=model)).adapter
    for task in m["tasks"]:
        keep = {li: tuple(s) for li, s in enumerate(m["tasks"][task]["experts"])}
        session = remote_session(bundle, task, address, timeout=60)
        try:
            assert session.executor.name == "tvm-rpc"
            x = sample_input(session.input_spec, batch=2, seed=5)
            got = session.run(x)
            ref = adapter.reference(x, task, keep)
            assert got.shape == ref.shape
            err = float(np.abs(got.astype(np.float64) - ref).max())
            assert err <= 1e-4, f"{model}/{task} over RPC: max abs error {err:.3g}"
            np.testing.assert_array_equal(got, Session(bundle, task).run(x))
        finally:
            session.executor.close()


def test_expert_weights_are_sent_once_per_load(bundle, address):
    # An expert is data: the remote keeps each loaded expert's tensors until the cache evicts it,
    # instead of receiving them with every kernel call.
    m = read_manifest(bundle)
    x = sample_input(m["input"], batch=2, seed=7)
    want = Session(bundle, "semseg").run(x)
    largest = max(int(e["bytes"]) for layer in m["moe_layers"] for e in layer["experts"])
    for budget in (None, 2 * largest):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small budget thrashes, on purpose
            session = remote_session(bundle, "semseg", address, timeout=60, memory_budget=budget, policy="lru")
        try:
            np.testing.assert_array_equal(session.run(x), want)
            sent = session.executor.weight_bytes_sent
            assert sent == session.stats.expert_bytes_loaded > 0
            np.testing.assert_array_equal(session.run(x), want)
            if budget is None:  # every expert stayed loaded: nothing sent again
                assert session.executor.weight_bytes_sent == sent
            else:  # evicted experts are sent again when reloaded, once per load
                assert session.executor.weight_bytes_sent == session.stats.expert_bytes_loaded > sent
        finally:
            session.executor.close()


@contextlib.contextmanager
def _fleet(boards: int, key: str):
    """A TVM RPC tracker on 127.0.0.1 with ``boards`` servers registered under ``key``; yields its address."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")
    port = _free_port()
    tracker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    servers = []
    try:
        deadline = time.monotonic() + START_S
        while not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        servers = [_Server(tracker=f"127.0.0.1:{port}", key=key) for _ in range(boards)]
        for server in servers:
            server.address  # noqa: B018  (waits until the board listens)
        yield f"tracker:127.0.0.1:{port}:{key}"
    finally:
        for server in servers:
            server.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tracker.pid, signal.SIGKILL)
        tracker.wait(30)


@needs_local_server
def test_fleet_through_a_tracker(bundle):
    """Two boards registered under one key: two sessions at once each get a board of their own."""
    m = read_manifest(bundle)
    x = sample_input(m["input"], batch=1, seed=2)
    want = Session(bundle, "semseg").run(x)
    with _fleet(2, "edgemoe-ci") as address:
        sessions = []
        try:
            for _ in range(2):
                deadline = time.monotonic() + START_S  # boards register with the tracker after they listen
                while True:
                    try:
                        sessions.append(remote_session(bundle, "semseg", address, timeout=60))
                        break
                    except RemoteError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
            for session in sessions:
                np.testing.assert_array_equal(session.run(x), want)
        finally:
            for session in sessions:
                session.executor.close()


@needs_local_server
def test_tuning_measures_on_boards_of_a_tracker(tmp_path):
    """`edgemoe tune --rpc tracker:...`: MetaSchedule's candidates are linked and timed on the board."""
    from edgemoe.targets.tvm.tune import tune_model

    with _fleet(1, "edgemoe-tune") as address:
        time.sleep(2)  # the board registers with the tracker after it listens
        out = tune_model("m3vit-micro", tmp_path / "db", 4, kinds=("expert_kernel",), rpc=address)
    assert out["measured_on"] == address
    assert any(t["best_ms"] is not None and t["best_ms"] > 0 for t in out["tasks"]), out["tasks"]


def test_tuning_needs_a_tracker_for_other_boards(tmp_path):
    from edgemoe.targets.tvm.tune import tune_model

    with pytest.raises(ConfigError, match="--rpc tracker"):
        tune_model("m3vit-micro", tmp_path / "db", 4, device="raspberry-pi-5")
    with pytest.raises(ConfigError, match="through a TVM RPC tracker"):
        tune_model("m3vit-micro", tmp_path / "db", 4, rpc="127.0.0.1:9090")


def test_time_evaluator_times_graphs_on_the_remote(bundle, address):
    m = read_manifest(bundle)
    x = sample_input(m["input"], batch=1, seed=0)
    inputs = _recorded_inputs(bundle, "semseg", x)
    with RemoteDevice(address, timeout=60) as remote:
        executor = RemoteExecutor(remote)
        for name in ("segment_0", "expert_kernel_32x48"):
            timing = executor.load(bundle, m["graphs"][name]).time(*inputs[name], repeat=4)
            assert timing.repeat == 4
            assert 0 < timing.min_ms <= timing.median_ms <= timing.max_ms
            assert timing.min_ms <= timing.mean_ms <= timing.max_ms


def test_bench_cli_over_rpc(bundle, address, run_cli, monkeypatch):
    result = run_cli("bench", bundle, "--rpc", address, "--repeat", "3", "--json")
    assert result.exit_code == 0, result.stderr
    res = json.loads(result.stdout)
    m = read_manifest(bundle)
    assert res["remote"] == str(parse_address(address)) and res["device"] == "cpu"
    assert res["graph_timer"] == "time_evaluator" and set(res["tasks"]) == set(m["tasks"])
    for task, t in res["tasks"].items():
        want = {*m["segments"], *m["tasks"][task]["gates"], m["tasks"][task]["head"]}
        assert want <= set(t["graphs"]) and set(t["graphs"]) - want == {m["moe_layers"][0]["kernel"]}
        assert t["task_ms"]["median_ms"] > 0 and t["task_ms"]["repeat"] == 3
        assert all(g["median_ms"] > 0 and g["calls"] >= 1 and g["repeat"] == 3 for g in t["graphs"].values())
    # $EDGEMOE_RPC stands in for --rpc.
    monkeypatch.setenv("EDGEMOE_RPC", address)
    result = run_cli("bench", bundle, "--task", "depth", "--repeat", "2", "--json")
    assert result.exit_code == 0, result.stderr
    res = json.loads(result.stdout)
    assert res["remote"] == str(parse_address(address)) and list(res["tasks"]) == ["depth"]


def test_bench_cli_local_text(bundle, run_cli, monkeypatch):
    monkeypatch.delenv("EDGEMOE_RPC", raising=False)
    result = run_cli("bench", bundle, "--task", "semseg", "--repeat", "2")
    assert result.exit_code == 0, result.stderr
    assert "this host (cpu)" in result.stdout and "segment_0" in result.stdout and "ms per run" in result.stdout


def test_connection_refused(bundle, run_cli):
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RemoteError, match=rf"127\.0\.0\.1:{port}: connect failed"):
        RemoteExecutor(f"127.0.0.1:{port}", timeout=20)
    assert time.monotonic() - start < 10
    result = run_cli("bench", bundle, "--rpc", f"127.0.0.1:{port}")
    assert result.exit_code == RemoteError.exit_code == 13
    assert result.stderr.startswith(f"error: RPC 127.0.0.1:{port}: connect failed") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("text", ["nohost", "host:port", "h:0", "tracker:h:9190", "tracker:h:9190:", "a:1:2"])
def test_bad_addresses(text, bundle, run_cli):
    with pytest.raises(RemoteError, match="bad RPC address"):
        parse_address(text)
    result = run_cli("bench", bundle, "--rpc", text)
    assert result.exit_code == 13 and "bad RPC address" in result.stderr


def test_onnx_bundle_is_refused_for_remote_runs(bundle_factory, address):
    with pytest.raises(BundleError, match="needs a TVM bundle"):
        remote_session(bundle_factory("m3vit-micro"), "semseg", address)


@needs_local_server
def test_server_killed_mid_run(bundle, doomed, run_cli):
    addr = doomed.address
    session = remote_session(bundle, "semseg", addr, timeout=20)
    x = sample_input(session.input_spec, batch=1, seed=0)
    session.run(x)
    errors, runs = [], [0]

    def loop():
        try:
            for _ in range(100_000):
                session.run(x)
                runs[0] += 1
        except Exception as exc:  # the test checks what it was
            errors.append(exc)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    time.sleep(0.3)
    doomed.kill()
    worker.join(30)
    assert not worker.is_alive(), "a run hung after the server died"
    assert runs[0] > 0
    assert len(errors) == 1 and isinstance(errors[0], RemoteError), errors
    assert addr in str(errors[0])
    # The connection is known dead: later calls fail at once, naming what was lost.
    start = time.monotonic()
    with pytest.raises(RemoteError, match=rf"RPC {addr}: cannot run "):
        session.run(x)
    assert time.monotonic() - start < 1
    session.executor.close()
    result = run_cli("bench", bundle, "--rpc", addr)  # nothing listens any more
    assert result.exit_code == 13 and addr in result.stderr


@needs_local_server
def test_stopped_server_times_out(bundle, doomed):
    session = remote_session(bundle, "depth", doomed.address, timeout=3)
    x = sample_input(session.input_spec, batch=1, seed=0)
    session.run(x)
    doomed.signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"no reply to 'run graphs/segment_0\.so' within 3 s"):
            session.run(x)
        assert time.monotonic() - start < 10
        with pytest.raises(RemoteError, match="cannot run"):
            session.run(x)
        session.executor.close()
    finally:
        doomed.kill()


@needs_local_server
def test_cli_exit_code_when_server_dies_mid_bench(bundle, doomed):
    addr = doomed.address
    cmd = [sys.executable, "-m", "edgemoe.cli", "bench", str(bundle), "--rpc", addr, "--repeat", "1000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Kill the server once the bench is connected and running.
        deadline = time.monotonic() + START_S
        while not any("load_module" in line for line in doomed.log) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(0.5)
        doomed.kill()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 13, (out, err)
    assert err.startswith(f"error: RPC {addr}: ") and err.count("\n") == 1, err
