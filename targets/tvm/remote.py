"""Hardware in the loop: run a TVM bundle's graphs on a remote device over TVM RPC.

The board runs TVM's stock RPC server (``python -m tvm.exec.rpc_server --host 0.0.0.0 --port
9090``, optionally registered with a tracker); this host keeps the bundle, the session logic and
the expert cache, and ships each verified library to the board once. Every graph call copies its
inputs to the remote device, runs the Relax VM there and copies the outputs back, so a whole task
runs with its compute on the board; ``time_evaluator`` times a graph on the board itself.

Addresses (``--rpc`` or the ``EDGEMOE_RPC`` environment variable):

- ``HOST:PORT``: an RPC server, e.g. ``192.168.1.20:9090``.
- ``tracker:HOST:PORT:KEY``: ask the RPC tracker at ``HOST:PORT`` for a server registered under
  ``KEY``, e.g. ``tracker:10.0.0.5:9190:orin``.
- ``local``: TVM's in-process RPC session (same code path, no network; for reference timings).

Every remote call has a deadline (``timeout`` seconds), the connect, uploads and the close
included: a server that is gone, refuses the connection, dies mid-run, stops answering or sits
behind a link too slow for the deadline raises :class:`~edgemoe.errors.RemoteError` naming the
address and the step that failed, within the deadline (plus a fraction of a second), instead of
hanging. How: TVM's calls run on one worker thread per connection; at the deadline the caller
shuts the connection's socket down, which ends TVM's blocked ``recv`` or ``send``, and waits for
the worker to leave TVM (a thread still inside TVM's C++ code when the interpreter exits aborts
the process). TVM frees remote objects with the GIL held, which no thread of this process can
interrupt, so a small watchdog process holding a copy of the socket shuts it down when a call
overruns (:class:`_Watchdog`). Connections still open at exit are closed, within their deadlines.
Imports TVM's runtime only (never torch and never the compiler).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...bundle.format import read_manifest, read_verified
from ...errors import BundleError, RemoteError
from ...runtime.executor import Executor, Graph, Timing
from .executor import _last_line, import_tvm

DEFAULT_TIMEOUT = 60.0
ADDRESS_HELP = "HOST:PORT (an RPC server), tracker:HOST:PORT:KEY (a server from a tracker) or local"


@dataclass(frozen=True)
class RemoteAddress:
    """Where the remote device is.

    Attributes:
        kind: ``server``, ``tracker`` or ``local``.
        host: Host name or IPv4 address (empty for ``local``).
        port: TCP port of the server or tracker (0 for ``local``).
        key: Device key asked of the tracker (``tracker`` only).
    """

    kind: str
    host: str = ""
    port: int = 0
    key: str = ""

    def __str__(self) -> str:
        if self.kind == "local":
            return "local"
        if self.kind == "tracker":
            return f"tracker:{self.host}:{self.port}:{self.key}"
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> RemoteAddress:
    """Parse ``HOST:PORT``, ``tracker:HOST:PORT:KEY`` or ``local``.

    Raises:
        RemoteError: The text is none of these.
    """
    text = text.strip()
    if text == "local":
        return RemoteAddress("local")
    parts = text.split(":")
    kind = "tracker" if parts[0] == "tracker" else "server"
    if kind == "tracker":
        parts = parts[1:]
    want = 3 if kind == "tracker" else 2
    if len(parts) != want or not parts[0] or not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
        raise RemoteError(f"bad RPC address '{text}': expected {ADDRESS_HELP}")
    if kind == "tracker" and not parts[2]:
        raise RemoteError(f"bad RPC address '{text}': the tracker form needs a device key (tracker:HOST:PORT:KEY)")
    return RemoteAddress(kind, parts[0], int(parts[1]), parts[2] if kind == "tracker" else "")


class _Worker:
    """One daemon thread that makes every call of a connection, so a caller can stop waiting.

    TVM's RPC client blocks in C++ on its socket. A caller that stops waiting wakes the thread by
    shutting the socket down, then waits until the thread has left TVM (:meth:`wait_idle`): a
    daemon thread that returns from TVM's C++ code while the interpreter finalizes is ended with
    ``pthread_exit``, whose unwinding through TVM's frames aborts the process ("terminate called
    without an active exception").
    """

    def __init__(self, name: str):
        self._jobs: queue.Queue = queue.Queue()
        self._current: threading.Event | None = None  # the job in flight (set when it is done)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, box, done = job
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # handed to the caller, which decides what it means
                # Its frames would keep the job's remote objects alive, to be freed on another thread.
                box.append((False, exc.with_traceback(None)))
            finally:
                # Remote objects die on this thread, never under a concurrent call (an abandoned
                # job's result too: its box dies with the next job).
                del fn, args, job
                done.set()

    def submit(self, fn: Callable, args: tuple, timeout: float):
        """Run ``fn(*args)`` on the worker; ``(finished, ok, value)`` within ``timeout`` seconds."""
        box: list = []
        done = threading.Event()
        self._current = done
        self._jobs.put((fn, args, box, done))
        if not done.wait(max(timeout, 0.0)):
            return False, False, None
        ok, value = box.pop()
        return True, ok, value

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the job in flight to end; whether none is left."""
        current = self._current
        return current is None or current.wait(max(timeout, 0.0))

    def stop(self) -> None:
        self._jobs.put(None)


def _socket_fds() -> dict[int, str]:
    """This process's socket descriptors and their ``socket:[inode]`` links (Linux; else empty)."""
    out = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:"):
            out[int(name)] = link
    return out


def _proc_tcp_peer(ip: str, port: int) -> set[str]:
    """How ``/proc/net/tcp`` and ``tcp6`` spell a remote ``ip:port`` (32-bit words in host order)."""

    def words(packed: bytes) -> str:
        return "".join(f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4))

    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        return set()
    forms = [packed]
    if len(packed) == 4:  # also an IPv6 socket connected to an IPv4 address (::ffff:a.b.c.d)
        forms.append(bytes(10) + b"\xff\xff" + packed)
    return {f"{words(form)}:{port:04X}" for form in forms}


def _tcp_inodes_to(ip: str, port: int) -> set[str]:
    """Links (``socket:[inode]``) of this host's TCP sockets towards ``ip:port``, in any state.

    ``getpeername`` fails on a socket whose connect is still under way (SYN sent, no answer), so
    the kernel's table is read instead (Linux; else empty).
    """
    want = _proc_tcp_peer(ip, port)
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[2] in want:
                out.add(f"socket:[{fields[9]}]")
    return out


def _with_fd(fd: int, link: str, action: Callable[[socket.socket], None]) -> None:
    """Apply ``action`` to the socket at ``fd`` if it is still ``link`` (the descriptor stays TVM's)."""
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != link:
            return  # TVM closed it and the number was reused
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        if socket.getdefaulttimeout() is not None:
            sock.setblocking(True)  # the default timeout made the wrapper switch TVM's socket to non-blocking
        action(sock)
    except OSError:
        pass
    finally:
        sock.detach()


def _shutdown(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)


# The watchdog process's program (run with ``python -I -S -c``): standard library only, no edgemoe.
# Messages on a SOCK_SEQPACKET pair, one per packet: "F key" with a socket's descriptor attached
# (SCM_RIGHTS), "A key seconds" (arm), "D key" (disarm), "X key" (forget: close its copy).
_WATCHDOG_PROGRAM = """
import select, signal, socket, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
ctl = socket.socket(fileno=int(sys.argv[1]))
socks, due = {}, {}
while True:
    wait = max(0.0, min(due.values()) - time.monotonic()) if due else None
    if select.select([ctl], [], [], wait)[0]:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 256, 1)
        except OSError:
            break
        if not msg:
            break
        op, key, *rest = msg.decode().split()
        if op == "F" and fds:
            socks[key] = socket.socket(fileno=fds[0])
        elif op == "A":
            due[key] = time.monotonic() + float(rest[0])
        elif op == "D":
            due.pop(key, None)
        elif op == "X":
            due.pop(key, None)
            s = socks.pop(key, None)
            if s is not None:
                s.close()
    now = time.monotonic()
    for key in [k for k, t in due.items() if t <= now]:
        del due[key]
        s = socks.get(key)
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
"""


class _Watchdog:
    """A helper process that shuts a connection's socket down when a call overruns its deadline.

    TVM frees a remote object (a tensor, a module, a function handle) with a remote call made in
    the Python wrapper's deallocation, with the GIL held: blocked on a stopped server, it stops
    every thread of the interpreter, the caller that waits on the deadline included. The helper
    holds its own copy of each connection's socket (passed with ``SCM_RIGHTS``) and no GIL to wait
    for: when a call it was told about is still running past its deadline, it shuts the socket
    down, which ends the blocked ``recv`` or ``send``. One per process, started with the first
    connection (a Python with no site packages: tens of milliseconds); it exits when this process
    closes its end. Without it (no ``send_fds``, or it cannot start) a free blocked with the GIL
    held waits for the socket's own timeout instead (see :meth:`RemoteDevice._connect`).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._ctl: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._failed = False

    def _start(self) -> bool:
        if self._ctl is not None:
            return True
        if self._failed or not hasattr(socket, "send_fds") or not sys.executable:
            return False
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with theirs:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _WATCHDOG_PROGRAM, str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
        except (OSError, ValueError, subprocess.SubprocessError):
            self._failed = True
            return False
        ours.settimeout(1.0)  # a helper that stopped reading must not hold a call up
        self._ctl = ours
        return True

    def _send(self, text: str, fds: tuple[int, ...] = ()) -> bool:
        with self._lock:
            if not self._start():
                return False
            try:
                socket.send_fds(self._ctl, [text.encode()], list(fds))
                return True
            except OSError:  # the helper is gone: carry on without it
                self._failed = True
                self._close_locked()
                return False

    def watch(self, key: str, fd: int) -> bool:
        """Hand the helper a copy of the socket at ``fd``; whether it has one."""
        return self._send(f"F {key}", (fd,))

    def arm(self, key: str, seconds: float) -> None:
        """Shut the socket down in ``seconds`` unless :meth:`disarm` comes first."""
        self._send(f"A {key} {seconds:.3f}")

    def disarm(self, key: str) -> None:
        self._send(f"D {key}")

    def forget(self, key: str) -> None:
        """Close the helper's copy (the connection then ends when TVM closes its own)."""
        self._send(f"X {key}")

    def _close_locked(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(1.0)  # it exits on the end of its control socket
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """End the helper (at exit)."""
        with self._lock:
            self._close_locked()
            self._failed = True


_WATCHDOG = _Watchdog()
# How long after a call's deadline the watchdog shuts its socket down: the caller, when it can
# run, does so at the deadline itself; the watchdog is for when it cannot (a free holding the GIL).
_WATCHDOG_MARGIN_S = 0.5


# How long a caller that stopped waiting gives the worker to leave TVM once its socket is shut
# down (it takes milliseconds; the rest is margin for a loaded machine).
_GRACE_S = 1.5
_KEYS = itertools.count()
# Open connections, closed at interpreter exit (see _at_exit).
_OPEN: weakref.WeakSet = weakref.WeakSet()
# Sockets of live connections: a connect that failed never shuts one of these down.
_CLAIMED: set[str] = set()
# Workers that shutting their socket down did not bring back out of TVM (see _at_exit).
_STUCK: list[_Worker] = []


@atexit.register
def _at_exit() -> None:
    """Close every connection still open, and make sure no worker is inside TVM at finalization.

    Runs before the interpreter finalizes (daemon threads still run then). Closing tears the
    connections down within their deadlines, so remote objects freed during finalization fail
    at once on a shut-down socket instead of waiting on a stopped server. Last resort, for a
    worker that shutting its socket down did not wake (e.g. TVM stuck outside the socket): the
    process ends with ``os._exit`` and RemoteError's exit code (a remote call failed: that is
    why the worker is stuck), after flushing, rather than abort when the worker returns.
    """
    for device in list(_OPEN):
        with contextlib.suppress(Exception):
            device.close()
    for worker in list(_STUCK):
        if not worker.wait_idle(_GRACE_S):
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(RemoteError.exit_code)
    _WATCHDOG.stop()


class RemoteDevice:
    """A live TVM RPC connection with a deadline on every call.

    Every call runs on the connection's worker thread while the caller waits at most ``timeout``
    seconds. A caller that stops waiting (a stopped server, a silent listener, a link too slow)
    shuts the connection's socket down, which wakes the worker out of TVM's blocking ``recv`` or
    ``send``, and waits until the worker has left TVM before it raises; the connection is then
    broken for good. Remote objects are freed on the worker only (within a call's deadline),
    never on a thread that cannot stop waiting. Open connections are closed at interpreter exit.

    Args:
        address: Where to connect (an :class:`RemoteAddress` or its text form, see the module).
        timeout: Seconds any one remote step (connect, upload, load, run, timing, close) may take.

    Raises:
        RemoteError: The connection cannot be made (refused, unknown host, no reply, no server
            under the tracker key).
    """

    def __init__(self, address: RemoteAddress | str, timeout: float = DEFAULT_TIMEOUT):
        self.address = parse_address(address) if isinstance(address, str) else address
        if not timeout > 0:
            raise RemoteError(f"RPC timeout must be positive, got {timeout}")
        self.timeout = float(timeout)
        self._tvm = import_tvm()
        self._broken: str | None = None
        self._socket: tuple[int, str] | None = None  # TVM's socket of the connection (fd, link)
        self._peer: tuple[str, int] | None = None  # the address TVM connects to (numeric)
        self._tracker: socket.socket | None = None  # the tracker query in flight
        self._key = f"{os.getpid()}-{next(_KEYS)}"  # the connection's name for the watchdog
        self._watched = False  # whether the watchdog has a copy of the socket
        self._modules: dict[str, object] = {}
        self._graphs: list[RemoteGraph] = []
        self._owners: list[RemoteExecutor] = []  # their device handles hold the session too
        self._release: list = []  # remote objects dropped on other threads: the next job frees them
        self._lock = threading.Lock()
        self._before = _socket_fds()
        self.session = None
        self._worker: _Worker | None = _Worker(f"edgemoe-rpc {self.address}")
        try:
            self.session = self.call("connect", self._connect, check=False)
        except BaseException:
            self._worker.stop()
            self._worker = None
            raise
        _OPEN.add(self)

    def _connect(self):
        from tvm import rpc

        addr = self.address
        if addr.kind == "local":
            import logging

            logging.getLogger("RPCServer").setLevel(logging.WARNING)  # per-load INFO lines of the local server
            return rpc.LocalSession()
        try:
            host, port, key = self._ask_tracker() if addr.kind == "tracker" else (addr.host, addr.port, "")
            # Resolved here: TVM would resolve it in C++, where a slow resolver cannot be woken.
            ip = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
            self._peer = (ip, port)
            if self._broken:
                raise RemoteError("the caller stopped waiting")  # never enter TVM after the caller gave up
            session = rpc.connect(ip, port, key)
        finally:
            if self._tracker is not None:
                self._tracker.close()  # the tracker has handed the server out: the query is done
                self._tracker = None
        found = self._connection_sockets()
        if len(found) == 1:
            self._socket = found[0]
            _CLAIMED.add(found[0][1])
            # Backstop for a remote object freed outside a call (e.g. during finalization): no
            # single recv or send waits past the deadline. Calls hit their own deadline first.
            wait = self.timeout + _GRACE_S
            limit = struct.pack("ll", int(wait), int((wait % 1) * 1e6))

            def bound(sock: socket.socket) -> None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
                self._watched = _WATCHDOG.watch(self._key, sock.fileno())

            _with_fd(*found[0], bound)
        return session

    def _ask_tracker(self) -> tuple[str, int, str]:
        """Ask the tracker for a server under the key: its ``(host, port, match key)``.

        The tracker protocol is spoken here over a Python socket with the deadline as its
        timeout (TVM's client retries for a minute and waits without one).
        """
        from tvm.rpc import base

        addr = self.address
        ip = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)[0][4][0]
        self._tracker = sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect((ip, addr.port))
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise RemoteError(f"RPC {addr}: {addr.host}:{addr.port} is not a TVM RPC tracker")
        base.sendjson(sock, [base.TrackerCode.REQUEST, addr.key, "", 1])
        value = base.recvjson(sock)
        if value[0] != base.TrackerCode.SUCCESS:
            raise RemoteError(f"RPC {addr}: the tracker refused the request: {value}")
        host, port, key = value[1]
        return str(host), int(port), str(key)

    def _connection_sockets(self) -> list[tuple[int, str]]:
        """Sockets towards the server opened since the connect began (Linux), whatever their state."""
        if self._peer is None:
            return []
        towards = _tcp_inodes_to(*self._peer)
        return [
            (fd, link)
            for fd, link in _socket_fds().items()
            if link in towards and self._before.get(fd) != link and link not in _CLAIMED
        ]

    def _shutdown_socket(self) -> None:
        """Shut the connection's socket down, waking a call blocked on it (the descriptor stays TVM's)."""
        tracker = self._tracker
        if tracker is not None:
            with contextlib.suppress(OSError):
                tracker.shutdown(socket.SHUT_RDWR)
        # Before the connect returned: the sockets it opened towards the server (a connect still
        # under way too: shutting it down aborts it).
        for fd, link in [self._socket] if self._socket is not None else self._connection_sockets():
            _with_fd(fd, link, _shutdown)

    def _abandon(self, reason: str) -> None:
        """Give up on the connection: wake the worker out of TVM and wait until it has left.

        Shut-down sockets make TVM's blocked calls return at once; the wait is for the worker to
        take the GIL back. The socket is shut down again while waiting, in case the worker was
        opening it (a connect) when the caller gave up.
        """
        self._broken = self._broken or reason
        worker = self._worker
        end = time.monotonic() + _GRACE_S
        while True:
            self._shutdown_socket()
            if worker is None or worker.wait_idle(0.05):
                return
            if time.monotonic() >= end:
                _STUCK.append(worker)  # _at_exit keeps it from returning into a finalizing interpreter
                return

    def _run(self, fn: Callable, args: tuple, seconds: float):
        """Run ``fn(*args)`` on the worker, the watchdog armed; ``(finished, ok, value)`` within ``seconds``."""
        if self._watched:
            _WATCHDOG.arm(self._key, seconds + _WATCHDOG_MARGIN_S)
        try:
            return self._worker.submit(self._job, (fn, args), seconds)
        finally:
            if self._watched:
                _WATCHDOG.disarm(self._key)

    def _job(self, fn: Callable, args: tuple):
        """What the worker runs for a call: frees the remote objects dropped elsewhere, then ``fn``."""
        self._free_released()
        return fn(*args)

    def _free_released(self) -> None:
        while self._release:
            self._release.pop()  # the last reference: the remote free happens here, on the worker

    def call(self, what: str, fn: Callable, *args, check: bool = True):
        """Run ``fn(*args)`` against the remote within the deadline.

        Args:
            what: The step, for messages (e.g. ``run segment_0``).
            fn: What to run (on the connection's worker thread).
            *args: Its arguments.
            check: After a failure, ping the server (within what is left of the deadline) to tell
                a lost connection (RemoteError) from an error the remote answered with (BundleError).

        Raises:
            RemoteError: The connection is lost, or the step took longer than the timeout.
            BundleError: The remote answered with an error (e.g. a graph rejects its inputs).
        """
        with self._lock:
            if self._broken or self._worker is None:
                raise RemoteError(f"RPC {self.address}: cannot {what}: {self._broken or 'connection closed'}")
            deadline = time.monotonic() + self.timeout
            finished, ok, value = self._run(fn, args, self.timeout)
            if not finished:
                self._fail(f"no reply to '{what}' within {self.timeout:g} s (server stopped or too slow)")
            if ok:
                return value
            if isinstance(value, RemoteError | BundleError):
                raise value
            reason = _last_line(value)
            if not check or not self._alive(deadline):
                self._fail(f"{what} failed: {reason}")
            raise BundleError(f"RPC {self.address}: {what} failed on the remote: {reason}") from None

    def _fail(self, reason: str):
        self._abandon(reason)
        raise RemoteError(f"RPC {self.address}: {reason}")

    def _alive(self, deadline: float) -> bool:
        # What is left of the call's deadline (at least a second, for a round trip on a busy host).
        ping = lambda: self.session.get_function("tvm.rpc.server.workpath")  # noqa: E731
        finished, ok, _ = self._run(ping, (), max(deadline - time.monotonic(), 1.0))
        return finished and ok

    def device(self, kind: str):
        """The remote ``cpu`` or ``cuda`` device 0.

        Raises:
            RemoteError: The remote has no such device (or the query fails).
        """

        def get():
            dev = self.session.cuda(0) if kind == "cuda" else self.session.cpu(0)
            return dev, bool(dev.exist)

        dev, exists = self.call(f"query device {kind}", get)
        if not exists:
            raise RemoteError(f"RPC {self.address}: the remote has no {kind} device")
        return dev

    def load_library(self, name: str, data: bytes):
        """Upload a library's bytes (once per content) and load it on the remote.

        Returns:
            The remote module.
        """
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._modules:
            return self._modules[digest]
        # The remote folder is flat: one file per content, named after the graph and its digest.
        target = f"{Path(name).stem}-{digest[:16]}.so"

        def upload_and_load():
            self.session.upload(bytearray(data), target)
            return self.session.load_module(target)

        module = self.call(f"upload and load {name} ({len(data)} bytes)", upload_and_load)
        self._modules[digest] = module
        return module

    def close(self) -> None:
        """Drop every remote object and the connection (the server then serves its next client).

        Bounded like a call: remote objects are freed on the worker within the deadline (at once
        on a broken connection), then the socket is shut down. Safe to call twice.
        """
        # A call in flight on another thread (a prefetch) ends within its own bound.
        locked = self._lock.acquire(timeout=self.timeout + 2 * _GRACE_S + 1.0)
        try:
            worker = self._worker
            if worker is None:
                return
            _OPEN.discard(self)

            def drop():
                self._free_released()
                for owner in self._owners:
                    owner._devices.clear()
                for graph in self._graphs:
                    graph._vm = graph._device = None
                self._graphs.clear()
                self._modules.clear()
                self.session = None

            if self._broken:
                self._shutdown_socket()  # the frees then fail at once instead of waiting on a stopped server
            finished, _, _ = self._run(drop, (), min(self.timeout, 10.0))
            if not finished:
                self._abandon("no reply while closing the connection")
            worker.stop()
            self._worker = None
            # TVM closes the socket only when the last reference to the session dies (a stray remote
            # tensor or a traceback can keep it alive), and the stock server serves one client at a
            # time: end the connection now so the server takes its next client.
            self._shutdown_socket()
            self._broken = self._broken or "connection closed"
            if self._socket is not None:
                _CLAIMED.discard(self._socket[1])
            if self._watched:
                _WATCHDOG.forget(self._key)
                self._watched = False
        finally:
            if locked:
                self._lock.release()

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Placed:
    """An expert's tensor on the remote; dropping it leaves the remote free to the connection's worker.

    The expert cache drops placed experts on whatever thread evicts them (or ends a session);
    freeing a remote tensor is a remote call, which there would wait on a stopped server with no
    deadline. The tensor goes to the connection's release list instead: the next call frees it
    on the worker, within that call's deadline.
    """

    __slots__ = ("_release", "tensor")

    def __init__(self, tensor, release: list):
        self.tensor = tensor
        self._release = release

    def __del__(self):
        self._release.append(self.tensor)


class RemoteGraph(Graph):
    """One graph in a Relax VM on the remote device; numpy in, numpy out (copied both ways)."""

    def __init__(self, remote: RemoteDevice, vm, device, name: str, input_names, output_names):
        self._remote = remote
        self._vm = vm
        self._device = device
        self.name = name
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)

    def _set_inputs(self, inputs) -> None:
        tensor = self._remote._tvm.runtime.tensor
        # Expert weights the executor placed on the remote already pass as they are; the rest is sent.
        args = (x.tensor if isinstance(x, _Placed) else tensor(np.ascontiguousarray(x), self._device) for x in inputs)
        # The stateful API: a VM function returning a tuple cannot be called directly over RPC.
        self._vm.set_input("main", *args)

    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        def go():
            self._set_inputs(inputs)
            self._vm.invoke_stateful("main")
            out = self._vm.get_outputs("main")
            outs = out if isinstance(out, tuple) else (out,)
            return tuple(o.numpy() for o in outs)

        return self._remote.call(f"run {self.name}", go)

    def time(self, *inputs: np.ndarray, repeat: int = 10, number: int = 0) -> Timing:
        """Time the graph on the remote device with TVM's ``time_evaluator`` (no transfers counted).

        Args:
            inputs: The graph's inputs (copied to the device once).
            repeat: Repeats to measure.
            number: Calls per repeat (0: as many as fill 1 ms, at least 1).
        """

        def go():
            self._set_inputs(inputs)
            evaluator = self._vm.time_evaluator(
                "invoke_stateful", self._device, number=max(number, 1), repeat=repeat, min_repeat_ms=0 if number else 1
            )
            res = evaluator("main")
            return [float(r) for r in res.results]

        if repeat < 1:
            raise RemoteError(f"repeat must be at least 1, got {repeat}")
        times = np.asarray(self._remote.call(f"time {self.name}", go)) * 1e3
        return Timing(
            float(np.median(times)),
            float(times.mean()),
            float(times.min()),
            float(times.max()),
            repeat,
            number or 0,
        )


class RemoteExecutor(Executor):
    """Loads a TVM bundle's verified libraries onto a remote device; plugs into :class:`Session`.

    ``Session(bundle, task, executor=RemoteExecutor("HOST:PORT"))`` runs the task with every
    graph on the remote device (the expert cache and routing stay on this host).

    Args:
        remote: A :class:`RemoteDevice`, or an address to connect to (see the module).
        device: ``cpu`` or ``cuda`` on the remote (default: ``cuda`` for a bundle compiled for a
            CUDA target, else ``cpu``).
        timeout: Per-call deadline in seconds when ``remote`` is an address.
    """

    name = "tvm-rpc"

    def __init__(self, remote: RemoteDevice | RemoteAddress | str, device: str | None = None, timeout=DEFAULT_TIMEOUT):
        if device not in (None, "cpu", "cuda"):
            raise RemoteError(f"remote device must be cpu or cuda, got '{device}'")
        self.remote = remote if isinstance(remote, RemoteDevice) else RemoteDevice(remote, timeout)
        self._device_kind = device
        self._devices: dict[str, object] = {}
        self.remote._owners.append(self)
        self._targets: dict[Path, str] = {}
        self.weight_bytes_sent = 0  # expert bytes uploaded by place(): once per load

    @property
    def address(self) -> RemoteAddress:
        """Where the remote device is."""
        return self.remote.address

    def _bundle_device(self, root: Path) -> str:
        """``cuda`` or ``cpu``: what the bundle's libraries hold code for (from its manifest)."""
        key = Path(root).resolve()
        if key not in self._targets:
            target = read_manifest(root)["target"]
            if target.get("executor") != "tvm":
                raise BundleError(
                    f"remote execution needs a TVM bundle (--target tvm); this one is for {target.get('executor')}"
                )
            kind = str((target.get("tvm_target") or {}).get("kind", "llvm"))
            self._targets[key] = "cuda" if kind == "cuda" else "cpu"
        return self._targets[key]

    def place(self, weights: dict[str, np.ndarray]) -> dict[str, object]:
        """Upload an expert to the remote device once per load (it is sent again only after an eviction).

        Raises:
            RemoteError: The upload fails or times out.
        """
        if len(self._devices) != 1:
            return weights  # no graph loaded yet, or graphs on two devices: send with each call
        device = next(iter(self._devices.values()))
        tensor = self.remote._tvm.runtime.tensor
        nbytes = sum(int(w.nbytes) for w in weights.values())

        def upload():
            return {name: tensor(np.ascontiguousarray(w), device) for name, w in weights.items()}

        placed = self.remote.call(f"upload expert weights ({nbytes} bytes)", upload)
        self.weight_bytes_sent += nbytes
        return {name: _Placed(t, self.remote._release) for name, t in placed.items()}

    def load(self, root: Path, record: dict) -> Graph:
        inputs, outputs = record.get("inputs"), record.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise BundleError(f"garbled manifest entry for {record.get('file')}: no input / output names")
        kind = self._device_kind or self._bundle_device(root)
        data = read_verified(root, record)  # size and sha256 checked on the very bytes sent
        module = self.remote.load_library(record["file"], data)
        if kind not in self._devices:
            self._devices[kind] = self.remote.device(kind)
        device = self._devices[kind]
        tvm = self.remote._tvm
        vm = self.remote.call(f"start a VM for {record['file']}", lambda: tvm.relax.VirtualMachine(module, device))
        graph = RemoteGraph(self.remote, vm, device, record["file"], inputs, outputs)
        self.remote._graphs.append(graph)
        return graph

    def close(self) -> None:
        """Close the connection (graphs loaded through it stop working)."""
        self.remote.close()


def remote_session(bundle: str | Path, task: str | None, address: RemoteAddress | str, timeout=DEFAULT_TIMEOUT, **kw):
    """A :class:`Session` of ``bundle`` whose graphs run on the remote device at ``address``.

    Close it with ``session.executor.close()`` to free the server for its next client.

    Args:
        bundle: A TVM bundle folder.
        task: Task to run (optional for single-task bundles).
        address: See the module (``HOST:PORT``, ``tracker:HOST:PORT:KEY``, ``local``).
        timeout: Per-call deadline in seconds.
        **kw: Further :class:`Session` options (memory budget, policy, prefetch, ...).

    Raises:
        RemoteError: The remote cannot be reached or fails.
        BundleError: Not a TVM bundle, or the remote cannot load a library.
    """
    from ...runtime.session import Session

    executor = RemoteExecutor(address, timeout=timeout)
    try:
        return Session(bundle, task, executor=executor, **kw)
    except BaseException:
        executor.close()
        raise
