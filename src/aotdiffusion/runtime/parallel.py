"""Replica processes: one copy of a compiled model per device, each in its own process.

On CPU a "device" is a group of cores: each replica process is pinned to its cores and runs its
compiled kernels with that many OpenMP threads (AOTInductor's kernels take their thread count from
the calling process at run time), so two single-core replicas work side by side without sharing a
core. On CUDA a device is a GPU index. A process per replica keeps the replicas' thread pools and
allocators apart, which threads in one process cannot.

What a replica holds is named by a factory, ``"module:function"``, called in the replica process as
``function(*args, device=...)`` and returning the callable that serves one request,
``serve(request, report)`` (``report(message)`` sends progress back while a request runs). The
factory lives in whichever layer owns the model (a compiled component here, a whole pipeline in
``pipelines/``, a batch of images in ``serve/``), so this module imports none of them.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

Device = Sequence[int] | str
# How long a replica may take to stop when the pool closes before it is killed.
_STOP_TIMEOUT_S = 10
# Sent to a replica whose request is no longer wanted (another replica of the same call failed): it
# stops at its next progress report instead of finishing work nobody will read.
_CANCEL = "cancel"


class _Cancelled(Exception):
    pass


class ReplicaError(RuntimeError):
    """A replica failed to load, raised an error for a request, or died; the message names its device."""


def default_cpu_groups(replicas: int = 2) -> list[list[int]]:
    """This process's cores split into ``replicas`` equal groups (2 cores -> [[0], [1]])."""
    cores = sorted(os.sched_getaffinity(0))
    if replicas < 1:
        raise ValueError(f"The number of replicas must be at least 1, got {replicas}.")
    if len(cores) < replicas:
        raise ValueError(f"{replicas} CPU replicas need at least {replicas} cores; this process may use {len(cores)}.")
    size = len(cores) // replicas
    return [cores[i * size : (i + 1) * size] for i in range(replicas)]


def _send(conn: Connection, value: Any) -> None:
    # Plain pickle, not Connection.send: torch registers multiprocessing reducers that share tensors
    # through file descriptors authenticated with a multiprocessing parent's key, which a replica
    # started as its own process does not have.
    conn.send_bytes(pickle.dumps(value))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def resolve(factory: str) -> Callable[..., Any]:
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)


def compiled_component(folder: str, *, device: str | None = None) -> Callable[[dict, Callable], Any]:
    """Replica factory: one compiled component; a request is its keyword tensors."""
    from .compiled import CompiledComponent

    component = CompiledComponent(folder, device=device)
    return lambda request, report: component(**request)


def _worker(conn: Connection, factory: str, args: list, device: Device) -> None:
    try:
        if isinstance(device, str):
            load_device = device
        else:
            os.sched_setaffinity(0, list(device))
            torch.set_num_threads(len(device))
            load_device = None
        serve = resolve(factory)(*args, device=load_device)
        _send(conn, ("ready", None))
    except Exception as error:  # the parent re-raises it with the replica's device
        _send(conn, ("error", error))
        return

    def report(message: Any) -> None:
        # Mid-request the pool sends nothing but a cancel, so anything waiting is one.
        if conn.poll() and _recv(conn) == _CANCEL:
            raise _Cancelled
        _send(conn, ("progress", message))

    try:
        while True:
            request = _recv(conn)
            if request is None:
                return
            if request == _CANCEL:  # it came after this replica had already answered: nothing to stop
                continue
            try:
                result = ("ok", serve(request, report))
            except _Cancelled:
                result = ("cancelled", None)
            except ConnectionError:  # our own pipe broke while reporting progress
                raise
            except Exception as error:
                result = ("error", error)
            _send(conn, result)
    except (EOFError, ConnectionError):
        return  # the pool went away (closed, or its process ended): nobody is left to answer


class _Replica:
    """One replica process and its end of the socket pair."""

    def __init__(self, factory: str, args: list, device: Device):
        self.device = device
        ours, theirs = socket.socketpair()
        spec = json.dumps([factory, args, device if isinstance(device, str) else list(device)])
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno()), spec], pass_fds=[theirs.fileno()]
        )
        theirs.close()
        self.conn = Connection(ours.detach())

    def wait_ready(self) -> None:
        try:
            status, error = _recv(self.conn)
        except EOFError:
            status, error = "error", RuntimeError(f"the process exited with code {self.process.wait()} while loading")
        if status == "error":
            raise ReplicaError(f"The replica on {self.device} failed to load: {error}") from error

    def send(self, request: Any) -> None:
        try:
            _send(self.conn, request)
        except OSError as error:
            raise ReplicaError(f"The replica on {self.device} died ({self._exit()}).") from error

    def message(self) -> tuple[str, Any]:
        """The replica's next message: ``(status, value)``, status one of progress, ok, error, cancelled."""
        try:
            return _recv(self.conn)
        except (EOFError, OSError) as error:
            raise ReplicaError(f"The replica on {self.device} died ({self._exit()}).") from error

    def receive(self, on_progress: Callable[[Any], None] | None = None) -> Any:
        while True:
            status, value = self.message()
            if status == "progress":
                if on_progress is not None:
                    on_progress(value)
                continue
            if status == "error":
                raise self.failed(value)
            return value

    def failed(self, error: BaseException) -> ReplicaError:
        failure = ReplicaError(f"The replica on {self.device} failed: {error}")
        failure.__cause__ = error
        return failure

    def cancel(self) -> None:
        try:
            _send(self.conn, _CANCEL)
        except OSError:
            pass  # it died too; reading its answer says so

    def alive(self) -> bool:
        return self.process.poll() is None

    def _exit(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def close(self) -> None:
        try:
            _send(self.conn, None)
        except OSError:
            pass
        try:
            self.process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()


class ReplicaPool:
    """Worker processes, each holding what ``factory(*args, device=...)`` loads, one per device.

    A replica that dies is replaced before the next request it gets (the failed request raises
    :class:`ReplicaError` naming the device); each replica runs one request at a time.
    """

    def __init__(self, factory: str, args: Sequence[Any], devices: Sequence[Device]):
        self.factory, self.args, self.devices = factory, list(args), list(devices)
        self._replicas: list[_Replica] = []
        self._locks = [threading.Lock() for _ in self.devices]
        self.restarts = 0
        try:
            self._replicas = [_Replica(factory, self.args, device) for device in self.devices]
            for replica in self._replicas:
                replica.wait_ready()
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.devices)

    def _live(self, index: int) -> _Replica:
        replica = self._replicas[index]
        if not replica.alive():
            replica.conn.close()
            replica = self._replicas[index] = _Replica(self.factory, self.args, self.devices[index])
            self.restarts += 1
            replica.wait_ready()
        return replica

    @property
    def pids(self) -> list[int]:
        return [replica.process.pid for replica in self._replicas]

    def alive(self, index: int) -> bool:
        return self._replicas[index].alive()

    def call(self, index: int, request: Any, on_progress: Callable[[Any], None] | None = None) -> Any:
        """Runs ``request`` on replica ``index`` and returns its result (thread-safe, one at a time per replica)."""
        with self._locks[index]:
            replica = self._live(index)
            replica.send(request)
            return replica.receive(on_progress)

    def map(self, requests: list[Any]) -> list[Any]:
        """Runs request i on replica i % len(self), all replicas at once; results in request order."""
        results: list[Any] = [None] * len(requests)
        for start in range(0, len(requests), len(self)):
            batch = list(enumerate(requests))[start : start + len(self)]
            with_locks = [self._locks[r] for r in range(len(batch))]
            for lock in with_locks:
                lock.acquire()
            try:
                replicas = [self._live(r) for r in range(len(batch))]
                for (_, request), replica in zip(batch, replicas):
                    replica.send(request)
                answers, failure = _gather(dict(zip((i for i, _ in batch), replicas)))
                if failure is not None:
                    raise failure
                for i, answer in answers.items():
                    results[i] = answer
            finally:
                for lock in with_locks:
                    lock.release()
        return results

    def close(self) -> None:
        for replica in self._replicas:
            replica.close()
        self._replicas = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _gather(running: dict[int, _Replica]) -> tuple[dict[int, Any], ReplicaError | None]:
    """Every running replica's answer, read as they come; the first failure cancels the others.

    A replica that died or raised fails the call at once instead of after its siblings finish; each
    sibling is still read to its last message (answer or "cancelled"), so none is left in its pipe
    for the next call.
    """
    answers: dict[int, Any] = {}
    failure: ReplicaError | None = None
    waiting = {replica.conn: (i, replica) for i, replica in running.items()}
    while waiting:
        for conn in wait(list(waiting)):
            i, replica = waiting[conn]
            try:
                status, value = replica.message()
            except ReplicaError as died:
                status, value = "died", died
            if status == "progress":
                continue
            del waiting[conn]
            if status == "ok":
                answers[i] = value
            elif status in ("error", "died") and failure is None:
                failure = value if status == "died" else replica.failed(value)
                for _, other in waiting.values():
                    other.cancel()
    return answers, failure


if __name__ == "__main__":  # a replica process, started by ReplicaPool
    factory, args, device = json.loads(sys.argv[2])
    _worker(Connection(int(sys.argv[1])), factory, args, device)
