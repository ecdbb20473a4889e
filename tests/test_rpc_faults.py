"""Remote execution that cannot abort or hang: `edgemoe bench --rpc` against faulty servers and links.

Each case runs the CLI in a subprocess, so an abort at interpreter exit ("terminate called without
an active exception", exit 134) or a hang shows, and checks exit 13 (RemoteError), one line on
stderr, and the time: at most ``--timeout`` + 2 s from the moment the process meets the fault (its
connection accepted by a silent listener or a slow proxy, its SYN sent, the server stopped or
killed) to its exit. The process's start-up before that (Python, TVM, the manifest: about 3 s here,
measured on a refused connection) is not counted. Servers are TVM's stock RPC server on 127.0.0.1
(see test_tvm_hil.py); the faults come from small sockets and proxies written here.
"""

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")
pytest.importorskip("cloudpickle", reason="TVM's RPC server needs cloudpickle")

from test_tvm_hil import START_S, _free_port, _Server  # after the skips: it needs TVM too

pytestmark = [
    pytest.mark.slow,
    pytest.mark.hil,
    pytest.mark.skipif(bool(os.environ.get("EDGEMOE_RPC", "").strip()), reason="kills local RPC servers"),
]

TIMEOUT = 3.0  # --timeout of every bench here
SLACK_S = 2.0  # what the design allows past the deadline (waking the worker, closing, exiting)


@pytest.fixture(scope="module")
def bundle(bundle_factory):
    return bundle_factory("m3vit-micro", target="tvm")


@pytest.fixture(scope="module")
def servers():
    """Servers started together up front (start-up is the slow part): one shared, the rest to stop or kill.

    The stock server stops taking clients once one leaves mid-call (its listen loop raises when the
    serving process fails), so every test that breaks a connection gets a server of its own.
    """
    pool = [_Server() for _ in range(6)]
    yield pool
    for server in pool:
        server.kill()


@pytest.fixture(scope="module")
def shared(servers) -> _Server:
    """A server whose clients all finish cleanly."""
    return servers[0]


@pytest.fixture
def doomed(servers) -> _Server:
    """A server of its own, which the test stops, kills or leaves unable to serve."""
    assert len(servers) > 1, "add a server to the pool"
    return servers.pop()


class _Bench:
    """``edgemoe bench`` in a subprocess (``python -m edgemoe.cli``), timed from its start."""

    def __init__(self, bundle, address: str, *args: str, timeout: float = TIMEOUT):
        env = {k: v for k, v in os.environ.items() if k not in ("EDGEMOE_RPC", "EDGEMOE_DEBUG")}
        cmd = [sys.executable, "-m", "edgemoe.cli", "bench", str(bundle), "--rpc", address, "--timeout", str(timeout)]
        self.start = time.monotonic()
        self.proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def finish(self, limit: float = 120.0) -> tuple[int, str, str, float]:
        """Exit code, stdout, stderr and seconds since the start (killed past ``limit``: a hang)."""
        try:
            out, err = self.proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"edgemoe bench hung (killed after {limit:g} s): {err[-2000:]}")
        return self.proc.returncode, out, err, time.monotonic() - self.start

    def running(self) -> bool:
        return self.proc.poll() is None


def _assert_remote_error(rc: int, err: str, *fragments: str) -> None:
    """Exit 13 with one `error: RPC ...` line: no traceback, no abort, no signal."""
    assert "terminate called" not in err and "Traceback" not in err, err
    assert rc == 13, (rc, err)
    assert err.startswith("error: RPC 127.0.0.1:") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_refused_connection(bundle):
    # Fails at once: what it takes is the process's start-up and exit (Python, TVM, the manifest).
    rc, _, err, elapsed = _Bench(bundle, f"127.0.0.1:{_free_port()}").finish()
    print(f"refused connection (start-up and exit overhead): exit {rc} after {elapsed:.2f} s")
    _assert_remote_error(rc, err, "connect failed")


def _wait_for(what: str, ready, bench: _Bench, limit: float = START_S) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        assert bench.running(), bench.proc.communicate()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class _SilentListener:
    """Accepts TCP connections on 127.0.0.1 and never answers (nor closes them)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.first: float | None = None  # when the first connection was accepted (time.monotonic)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])
                self.first = self.first or time.monotonic()

    def close(self):
        for s in [self.sock, *self.accepted]:
            s.close()


class _Proxy:
    """A TCP proxy from 127.0.0.1 to a server's port: a slow link, and the end of the connection when a side dies.

    Args:
        target: The server's port on 127.0.0.1.
        rate: Bytes per second each way (None: as fast as it goes).
        delay: Seconds added to every chunk each way (latency).
    """

    CHUNK = 4096

    def __init__(self, target: int, rate: float | None = None, delay: float = 0.0):
        self.target, self.rate, self.delay = target, rate, delay
        self.sent_up = 0  # bytes forwarded from the client to the server
        self.first: float | None = None  # when the first connection was accepted (time.monotonic)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                client = self.sock.accept()[0]
                self.first = self.first or time.monotonic()
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self._open += [client, upstream]
                threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool):
        try:
            while data := src.recv(self.CHUNK):
                pause = self.delay + (len(data) / self.rate if self.rate else 0.0)
                if pause:
                    time.sleep(pause)
                dst.sendall(data)
                if up:
                    self.sent_up += len(data)
        except OSError:
            pass
        finally:
            # One side is gone: so is the other, abruptly (a reset, as from a host that died).
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)  # wakes the pump the other way
            for s in (src, dst):
                s.close()

    def close(self):
        for s in [self.sock, *self._open]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_silent_listener(bundle):
    # A TCP listener that accepts and never answers: the connect's handshake waits for the deadline.
    listener = _SilentListener()
    try:
        rc, _, err, _ = _Bench(bundle, f"127.0.0.1:{listener.port}").finish()
        after = time.monotonic() - listener.first
    finally:
        listener.close()
    print(f"silent listener: exit {rc} {after:.2f} s after the accept")
    _assert_remote_error(rc, err, f"no reply to 'connect' within {TIMEOUT:g} s")
    assert after <= TIMEOUT + SLACK_S, after


def _syn_sent(port: int, ours: set[int]) -> bool:
    """Whether a socket of this host is sending SYNs to 127.0.0.1:port from a local port not in ``ours``."""
    with open("/proc/net/tcp") as f:
        rows = [r.split() for r in f.read().splitlines()[1:]]
    return any(
        r[2] == f"0100007F:{port:04X}" and r[3] == "02" and int(r[1].split(":")[1], 16) not in ours for r in rows
    )


def test_unanswered_connect(bundle):
    """A listener whose backlog is full drops the SYN: the TCP connect itself waits (it is aborted)."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    queued = []
    try:
        # Fill the accept queue (never accepted); Linux then drops new SYNs and the connect hangs.
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            queued.append(s)
        time.sleep(0.2)
        ours = {s.getsockname()[1] for s in queued}
        bench = _Bench(bundle, f"127.0.0.1:{port}")
        _wait_for("the bench's SYN", lambda: _syn_sent(port, ours), bench)
        fault = time.monotonic()
        rc, _, err, _ = bench.finish()
        after = time.monotonic() - fault
    finally:
        for s in [full, *queued]:
            s.close()
    print(f"unanswered connect: exit {rc} {after:.2f} s after the SYN")
    _assert_remote_error(rc, err, "'connect'")
    assert after <= TIMEOUT + SLACK_S, after


def _bench_until_running(bundle, server: _Server) -> _Bench:
    """A bench that runs (practically) forever, once the server has loaded a library for it."""
    seen = sum("load_module" in line for line in server.log)
    bench = _Bench(bundle, server.address, "--repeat", "1000000")
    _wait_for("a library to load", lambda: sum("load_module" in line for line in server.log) > seen, bench)
    time.sleep(0.5)  # into the timed runs
    return bench


def test_server_stopped_mid_run(bundle, doomed):
    bench = _bench_until_running(bundle, doomed)
    try:
        fault = time.monotonic()
        doomed.signal(signal.SIGSTOP)
        rc, _, err, _ = bench.finish()
        after = time.monotonic() - fault
    finally:
        doomed.kill()
    print(f"server stopped mid-run: exit {rc} {after:.2f} s after SIGSTOP")
    _assert_remote_error(rc, err, f"within {TIMEOUT:g} s")
    assert after <= TIMEOUT + SLACK_S, after


def test_server_killed_mid_run(bundle, doomed):
    bench = _bench_until_running(bundle, doomed)
    try:
        fault = time.monotonic()
        doomed.kill()
        rc, _, err, _ = bench.finish()
        after = time.monotonic() - fault
    finally:
        doomed.kill()
    print(f"server killed mid-run: exit {rc} {after:.2f} s after SIGKILL")
    _assert_remote_error(rc, err)
    assert after <= SLACK_S, after  # a dead server is noticed at once


def test_server_killed_mid_upload(bundle, doomed):
    # The link carries 64 KB/s: the first library (hundreds of KB) is still on its way when the server dies.
    proxy = _Proxy(int(doomed.address.rsplit(":", 1)[1]), rate=64e3)
    try:
        bench = _Bench(bundle, f"127.0.0.1:{proxy.port}", timeout=30)
        _wait_for("the upload to start", lambda: proxy.sent_up > 64_000, bench)
        fault = time.monotonic()
        doomed.kill()
        rc, _, err, _ = bench.finish()
        after = time.monotonic() - fault
    finally:
        doomed.kill()
        proxy.close()
    print(f"server killed mid-upload: exit {rc} {after:.2f} s after the kill")
    _assert_remote_error(rc, err, "upload and load")
    assert after <= SLACK_S, after  # a dead server is noticed at once, long before the 30 s deadline


def test_slow_link_within_the_deadline_finishes(bundle, shared):
    # 1 MB/s and 0.2 ms more per chunk each way: every call is slower and still well within its deadline.
    proxy = _Proxy(int(shared.address.rsplit(":", 1)[1]), rate=1e6, delay=0.0002)
    try:
        rc, out, err, elapsed = _Bench(
            bundle, f"127.0.0.1:{proxy.port}", "--task", "depth", "--repeat", "1", "--json"
        ).finish()
    finally:
        proxy.close()
    print(f"slow link within the deadline: exit {rc} after {elapsed:.2f} s")
    assert rc == 0, err
    assert list(json.loads(out)["tasks"]) == ["depth"]


def test_slow_link_times_out(bundle, doomed):
    # 16 KB/s each way, bytes arriving all the time: no single recv waits long, the call does.
    proxy = _Proxy(int(doomed.address.rsplit(":", 1)[1]), rate=16e3)
    try:
        rc, _, err, _ = _Bench(bundle, f"127.0.0.1:{proxy.port}").finish()
        after = time.monotonic() - proxy.first
    finally:
        proxy.close()
        doomed.kill()
    print(f"slow link past the deadline: exit {rc} {after:.2f} s after the connection")
    _assert_remote_error(rc, err, "no reply to 'upload and load", f"within {TIMEOUT:g} s")
    # The connect and the session's start over the slow link come before the upload's deadline.
    assert after <= TIMEOUT + SLACK_S + 1.0, after


# A program that uses the library: it catches RemoteError, or never closes its connection.
_PROGRAM = """
import sys
from edgemoe.bundle import sample_input
from edgemoe.errors import RemoteError
from edgemoe.targets.tvm.remote import remote_session

bundle, address, timeout = sys.argv[1:4]
try:
    session = remote_session(bundle, "depth", address, timeout=float(timeout))
    session.run(sample_input(session.input_spec, batch=1, seed=0))
except RemoteError as exc:
    print("caught:", exc, flush=True)
    sys.exit(0)
print("ready", flush=True)
sys.stdin.readline()  # the test stops the server meanwhile
# Exits without closing the connection: remote objects are left for interpreter exit.
"""


def _program(bundle, address: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEMOE_RPC", "EDGEMOE_DEBUG")}
    cmd = [sys.executable, "-c", _PROGRAM, str(bundle), address, str(TIMEOUT)]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_a_program_that_catches_the_error_exits_cleanly(bundle):
    listener = _SilentListener()
    try:
        proc = _program(bundle, f"127.0.0.1:{listener.port}")
        out, err = proc.communicate(timeout=120)
        after = time.monotonic() - listener.first
    finally:
        listener.close()
    print(f"program catching a silent listener's error: exit {proc.returncode} {after:.2f} s after the accept")
    assert "terminate called" not in err and "Traceback" not in err, err
    assert proc.returncode == 0, err
    assert out.startswith("caught: RPC 127.0.0.1:") and "no reply to 'connect'" in out, out
    assert after <= TIMEOUT + SLACK_S, after


def test_a_program_that_never_closes_exits_when_the_server_stops(bundle, doomed):
    """The server stops after the program's last call; at exit its connection is closed within the deadline.

    Freeing a remote object waits on the server with the GIL held: without the watchdog process
    this exit took minutes (every free waiting out the socket's timeout, one after another).
    """
    proc = _program(bundle, doomed.address)
    try:
        first = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_S)
        assert first == ["ready\n"], (first, proc.poll())
        doomed.signal(signal.SIGSTOP)
        fault = time.monotonic()
        _, err = proc.communicate("go\n", timeout=120)
        after = time.monotonic() - fault
    finally:
        if proc.poll() is None:
            proc.kill()
        doomed.kill()
    print(f"program left open, server stopped: exit {proc.returncode} {after:.2f} s after the stop")
    assert "terminate called" not in err and "Traceback" not in err, err
    assert proc.returncode == 0, err
    assert after <= TIMEOUT + SLACK_S, after  # one deadline: closing at exit
