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

Every remote call has a deadline (``timeout`` seconds): a server that is gone, refuses the
connection, dies mid-run or stops answering raises :class:`~edgemoe.errors.RemoteError` naming
the address and the step that failed, instead of hanging. Imports TVM's runtime only (never torch
and never the compiler).
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import threading
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

    TVM's RPC client blocks in C++ on its socket; a daemon thread (unlike a thread pool's) never
    holds up interpreter exit when a stopped server leaves it blocked.
    """

    def __init__(self, name: str):
        self._jobs: queue.Queue = queue.Queue()
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
                box.append((False, exc))
            finally:
                del fn, args, job  # remote objects die on this thread, never under a concurrent call
                done.set()

    def submit(self, fn: Callable, args: tuple, timeout: float):
        """Run ``fn(*args)`` on the worker; ``(finished, ok, value)`` within ``timeout`` seconds."""
        box: list = []
        done = threading.Event()
        self._jobs.put((fn, args, box, done))
        if not done.wait(timeout):
            return False, False, None
        ok, value = box[0]
        return True, ok, value

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


class RemoteDevice:
    """A live TVM RPC connection with a deadline on every call.

    Args:
        address: Where to connect (an :class:`RemoteAddress` or its text form, see the module).
        timeout: Seconds any one remote step (connect, upload, load, run, timing) may take.

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
        self._worker = _Worker(f"edgemoe-rpc {self.address}")
        self._broken: str | None = None
        self._socket: tuple[int, str] | None = None
        self._modules: dict[str, object] = {}
        self._graphs: list[RemoteGraph] = []
        self._owners: list[RemoteExecutor] = []  # their device handles hold the session too
        self._lock = threading.Lock()
        self._before = _socket_fds()
        self.session = self.call("connect", self._connect, check=False)

    def _connect(self):
        from tvm import rpc

        addr = self.address
        if addr.kind == "local":
            import logging

            logging.getLogger("RPCServer").setLevel(logging.WARNING)  # per-load INFO lines of the local server
            return rpc.LocalSession()
        if addr.kind == "tracker":
            tracker = rpc.connect_tracker(addr.host, addr.port)
            try:
                session = tracker.request(addr.key, max_retry=1)
            finally:
                tracker.close()
        else:
            session = rpc.connect(addr.host, addr.port)
        # The connection's socket, to shut it down if the server stops answering (wakes the blocked call).
        new = self._new_sockets()
        self._socket = new[0] if len(new) == 1 else None
        return session

    def _new_sockets(self) -> list[tuple[int, str]]:
        """Sockets opened since the connect began (Linux), that are connected to the address."""
        try:
            peer_ip = socket.gethostbyname(self.address.host)
        except OSError:
            peer_ip = None
        out = []
        for fd, link in _socket_fds().items():
            if self._before.get(fd) == link:
                continue
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None
            finally:
                sock.detach()
            # A tracker hands out a server at another address: any new TCP connection is then ours.
            if isinstance(peer, tuple) and (self.address.kind == "tracker" or peer[:2] == (peer_ip, self.address.port)):
                out.append((fd, link))
        return out

    def _shutdown_socket(self) -> None:
        """Shut the connection's socket down, waking a call blocked on it (the descriptor stays TVM's)."""
        # Before the connect returned, the sockets it opened towards the address.
        targets = [self._socket] if self._socket is not None else self._new_sockets() if self.address.host else []
        self._socket = None
        for fd, link in targets:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != link:
                    continue  # TVM closed it and the number was reused
                sock = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.detach()

    def call(self, what: str, fn: Callable, *args, check: bool = True):
        """Run ``fn(*args)`` against the remote within the deadline.

        Args:
            what: The step, for messages (e.g. ``run segment_0``).
            fn: What to run (on the connection's worker thread).
            *args: Its arguments.
            check: After a failure, ping the server to tell a lost connection (RemoteError) from
                an error the remote answered with (BundleError).

        Raises:
            RemoteError: The connection is lost, or the step took longer than the timeout.
            BundleError: The remote answered with an error (e.g. a graph rejects its inputs).
        """
        with self._lock:
            if self._broken:
                raise RemoteError(f"RPC {self.address}: cannot {what}: {self._broken}")
            finished, ok, value = self._worker.submit(fn, args, self.timeout)
            if not finished:
                self._fail(f"no reply to '{what}' within {self.timeout:g} s (server stopped or too slow)")
            if ok:
                return value
            if isinstance(value, RemoteError | BundleError):
                raise value
            reason = _last_line(value)
            if not check or not self._alive():
                self._fail(f"{what} failed: {reason}")
            raise BundleError(f"RPC {self.address}: {what} failed on the remote: {reason}") from None

    def _fail(self, reason: str):
        self._broken = reason
        self._shutdown_socket()
        raise RemoteError(f"RPC {self.address}: {reason}")

    def _alive(self) -> bool:
        finished, ok, _ = self._worker.submit(
            lambda: self.session.get_function("tvm.rpc.server.workpath"), (), min(self.timeout, 10.0)
        )
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
        """Drop every remote object and the connection (the server then serves its next client)."""
        if self._worker is None:
            return

        def drop():
            for owner in self._owners:
                owner._devices.clear()
            for graph in self._graphs:
                graph._vm = graph._device = None
            self._graphs.clear()
            self._modules.clear()
            self.session = None

        if self._broken:
            self._shutdown_socket()  # frees a worker still blocked on a stopped server
        # Remote objects are freed on the worker (a dead connection only makes their frees fail).
        self._worker.submit(drop, (), min(self.timeout, 10.0))
        self._worker.stop()
        self._worker = None
        # TVM closes the socket only when the last reference to the session dies (a stray remote
        # tensor or a traceback can keep it alive), and the stock server serves one client at a
        # time: end the connection now so the server takes its next client.
        self._shutdown_socket()
        self._broken = self._broken or "connection closed"

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        tensor, placed = self._remote._tvm.runtime.tensor, self._remote._tvm.runtime.Tensor
        # Expert weights the executor placed on the remote already pass as they are; the rest is sent.
        args = (x if isinstance(x, placed) else tensor(np.ascontiguousarray(x), self._device) for x in inputs)
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
        return placed

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
