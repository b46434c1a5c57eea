"""Worker processes for several devices, joined over torch.distributed.

The process that owns the job (ComfyUI's, where the graph runs) is rank 0; every other device
gets a persistent worker process (rank 1..N-1) that keeps its model between jobs. Workers are
started as fresh Python processes (``subprocess`` running ``scripts/worker.py``: the "spawn"
start method without its habit of re-importing the parent's ``__main__``, which in ComfyUI is
its whole server; never fork, CUDA is live), or by hand on another machine with the same
command, which joins rank 0's address and port.

Rendezvous: rank 0 opens a TCPStore on a free port (loopback unless a host is given) and waits
``join_timeout`` for the others. The default process group is gloo (CPU tensors: commands,
the per-call agreement); CUDA tensors go over NCCL (``cpu:gloo,cuda:nccl``). Commands are
Python objects broadcast from rank 0 (settings, file identities, conditioning and latents as
CPU tensors; never weights: each worker memory-maps the model files itself).

Every wait has a timeout. A worker that fails writes its error to the store and exits, which
closes its connections, so rank 0's next collective fails at once instead of hanging; rank 0
then names the device and the worker's log, closes the pool, and the next job builds a new one.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("WanFit")

WORKER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "worker.py"
# The package name the pack was imported under here: a worker imports it under the same name,
# so the objects rank 0 sends (settings, embeds) unpickle into the same classes there.
PACKAGE = __name__.rsplit(".", 2)[0]
IDLE_TIMEOUT = datetime.timedelta(days=7)  # workers wait for the next job inside a collective
GO, STOP = 0, 1


class PoolError(RuntimeError):
    """A worker failed, died or never joined; the message names its device and its log."""


class Cancelled(Exception):
    """Rank 0 stopped the pass (ComfyUI's Cancel, or an error of its own between DiT calls)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


REMOTE = "remote"  # a rank whose worker someone starts by hand (another machine): rank 0's kind of device


def backend_for(devices: Sequence[str]) -> str:
    """gloo for CPU ranks; NCCL for CUDA tensors when rank 0 has a GPU (control stays on gloo).
    A remote rank computes on the same kind of device as rank 0."""
    return "cpu:gloo,cuda:nccl" if str(devices[0]).startswith("cuda") else "gloo"


@dataclass
class Member:
    """One rank's view of the process group: who it is and the groups the split uses."""

    rank: int
    world: int
    device: str
    store: Any = None
    seq_groups: dict[int, list[Any]] = field(default_factory=dict)  # CFG halves -> each half's group
    everyone: Any = None  # every rank, with a job's timeout (the final all-gather)

    def groups(self, halves: int) -> list[Any]:
        return self.seq_groups[halves]

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0 sends ``obj`` to every rank; every rank returns it."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, stop: bool = False) -> None:
        """One sync point (before each DiT call): rank 0 says go or stop; on stop every rank
        raises ``Cancelled``."""
        import torch.distributed as dist

        flag = torch.tensor([STOP if stop else GO], dtype=torch.int32)
        dist.broadcast(flag, src=0)
        if int(flag) == STOP:
            raise Cancelled("the pass was stopped by rank 0")


def _make_groups(world: int, timeout: float) -> tuple[Any, dict[int, list[Any]]]:
    """The data groups, with a job's timeout (the default group waits days for the next job):
    every rank's, and the sequence groups of both meshes a job may use (one half of all ranks,
    or two halves). ``new_group`` is collective: every rank builds them in the same order."""
    import torch.distributed as dist

    limit = datetime.timedelta(seconds=timeout)
    everyone = dist.new_group(list(range(world)), timeout=limit)
    groups = {1: [everyone]}
    if world % 2 == 0:
        half = world // 2
        groups[2] = [dist.new_group(list(range(h * half, (h + 1) * half)), timeout=limit) for h in range(2)]
    return everyone, groups


def join(host: str, port: int, rank: int, world: int, device: str, devices: Sequence[str], timeout: float,
         job_timeout: float, wait: Callable[[Any], None] | None = None) -> Member:
    """Join (or, as rank 0, open) the process group at ``host:port``. Each worker announces
    itself in the store first; rank 0 runs ``wait(store)`` until all have (with its own checks),
    so that a worker that never comes fails the join in ``timeout``, not in the group's days."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    mine = ",".join(map(str, devices))
    if rank:  # announce the pool this worker was started for; go on only if rank 0 opened that one
        store.set(f"joined/{rank}", mine)
        theirs = store.get("pool").decode()
        if theirs != mine:
            raise PoolError(f"rank 0 at {host}:{port} opened a pool of devices {theirs}; this worker was started "
                            f"for {mine}: start it with rank 0's logged command")
    elif wait is not None:
        try:
            wait(store)
        finally:
            store.set("pool", mine)  # a worker of another pool hears it at once, not at its timeout
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend_for(devices), store=store, rank=rank, world_size=world, timeout=IDLE_TIMEOUT)
    everyone, groups = _make_groups(world, job_timeout)
    return Member(rank, world, str(device), store, groups, everyone)


@dataclass
class Pool:
    """Rank 0's side: the worker processes (ranks whose device is ``REMOTE``, or every rank with
    ``spawn=False``, are started by someone else with ``command(rank)``), the process group and
    the per-job protocol."""

    devices: tuple[str, ...]
    log_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 0  # torch threads per worker (0: torch's default)
    spawn: bool = True
    join_timeout: float = 120.0
    job_timeout: float = 600.0  # a collective of a job that waits longer than this fails
    result_timeout: float = 120.0
    member: Member | None = None
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    broken: str | None = None

    @property
    def world(self) -> int:
        return len(self.devices)

    def log_path(self, rank: int) -> Path:
        return self.log_dir / f"wanfit_worker_{rank}.log"

    def command(self, rank: int) -> list[str]:
        """The command that starts rank ``rank``'s worker (here, or on another machine with the
        pack and the same model files, when ``host`` is an address reachable from there; a
        remote worker computes on ``cuda:0`` there, or on its CPU when rank 0 does, and stays
        for the next pool)."""
        device = self.devices[rank]
        if device == REMOTE:
            device = "cuda:0" if str(self.devices[0]).startswith("cuda") else "cpu"
        cmd = [sys.executable, str(WORKER_SCRIPT), "--join", f"{self.host}:{self.port}", "--rank", str(rank),
               "--world", str(self.world), "--device", device, "--devices", ",".join(self.devices),
               "--package", PACKAGE]
        # a worker started by hand waits for the next pool when this one closes
        return cmd + (["--threads", str(self.threads)] if self.threads else []) + (
            ["--stay"] if self.devices[rank] == REMOTE else [])

    def _spawned(self, rank: int) -> bool:
        return self.spawn and self.devices[rank] != REMOTE

    def start(self) -> Pool:
        self.port = self.port or free_port(self.host)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for rank in range(1, self.world):
            if not self._spawned(rank):
                log.warning("WanFit multi-GPU: waiting %.0f s for rank %d; start it with: %s", self.join_timeout, rank,
                            " ".join(self.command(rank)))
        if self.spawn:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            for rank in filter(self._spawned, range(1, self.world)):
                with open(self.log_path(rank), "wb") as out:
                    self.procs[rank] = subprocess.Popen(self.command(rank), stdout=out, stderr=subprocess.STDOUT,
                                                        env=env, start_new_session=True)
        try:
            self.member = join(self.host, self.port, 0, self.world, self.devices[0], self.devices,
                               self.join_timeout, self.job_timeout, wait=self._wait_joined)
        except Exception as err:  # noqa: BLE001 - a worker that never came: say which, then clean up
            who = self._who_failed()
            self.close()
            raise PoolError(who or (str(err) if isinstance(err, PoolError) else f"the multi-GPU workers did not join "
                                    f"{self.host}:{self.port} within {self.join_timeout:.0f} s ({err})")) from err
        log.info("WanFit multi-GPU: %d ranks joined on %s:%d (%s)", self.world, self.host, self.port,
                 ", ".join(self.devices))
        return self

    def _wait_joined(self, store) -> None:
        deadline = time.monotonic() + self.join_timeout
        missing = list(range(1, self.world))
        expected = ",".join(self.devices)
        while missing:
            for r in [r for r in missing if store.check([f"joined/{r}"])]:
                missing.remove(r)
                if (theirs := store.get(f"joined/{r}").decode()) != expected:
                    raise PoolError(f"the worker that joined as rank {r} was started for devices {theirs}, not "
                                    f"{expected}; start it with: {' '.join(self.command(r))}")
            dead = [r for r in missing if r in self.procs and self.procs[r].poll() is not None]
            if dead:
                raise PoolError(f"the multi-GPU worker for {self.devices[dead[0]]} (rank {dead[0]}) exited before "
                                f"joining; its log: {self.log_path(dead[0])}")
            if missing and time.monotonic() > deadline:
                raise PoolError(f"ranks {missing} did not join {self.host}:{self.port} within "
                                f"{self.join_timeout:.0f} s" + ("" if self._spawned(missing[0]) else
                                                               f"; start them with: {' '.join(self.command(missing[0]))}"))
            time.sleep(0.05)

    def _who_failed(self) -> str | None:
        """A message naming the first worker that stopped or reported an error, or None."""
        for rank in range(1, self.world):
            error = self._read(f"error/{rank}")
            proc = self.procs.get(rank)
            code = proc.poll() if proc is not None else None
            if error or code is not None:
                what = error or f"exited with code {code}"
                return (f"the multi-GPU worker on {self.devices[rank]} (rank {rank}) failed: {what}; its log: "
                        f"{self.log_path(rank) if proc is not None else 'on the machine that runs it'}")
        return None

    def _read(self, key: str) -> str | None:
        store = self.member.store if self.member is not None else None
        if store is None:
            return None
        try:
            if store.check([key]):
                return store.get(key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store went with a broken group
            return None
        return None

    def alive(self) -> bool:
        return self.member is not None and self.broken is None and all(p.poll() is None for p in self.procs.values())

    def run(self, job: dict, local: Callable[[Member], Any]) -> tuple[Any, list[Any]]:
        """Send ``job`` to every worker, run ``local(member)`` here (rank 0's share, with the
        same sync points the workers have), and collect each worker's answer. A collective
        that fails, or a worker that reports an error, is raised as PoolError naming the
        worker, and the pool closes."""
        member = self.member
        job_id = f"{time.monotonic_ns()}"
        try:
            member.broadcast({**job, "id": job_id})
            with _Watch(self):
                result = local(member)
        except Cancelled:
            if self.broken:
                self.close()
            raise
        except BaseException as err:
            raise self._failure(err) from err
        return result, self._collect(job_id)

    def _failure(self, err: BaseException) -> BaseException:
        """What rank 0 raises when a collective or its own share failed: the worker's error when
        one failed (naming its device and log), else ``err``; the pool is closed either way
        when the ranks can no longer be in step."""
        if isinstance(err, (KeyboardInterrupt,)):
            return err
        who = self._wait_for_culprit(5.0 if _is_comm_error(err) else 0.2)
        if who is not None or _is_comm_error(err):
            self.broken = who or str(err)
            self.close()
            return PoolError(who or f"the multi-GPU ranks lost contact: {err}")
        if self.broken:  # rank 0 failed mid-exchange (Split.leave): the ranks are out of step
            self.close()
        return err

    def _wait_for_culprit(self, patience: float) -> str | None:
        """The failed worker's message, waiting up to ``patience`` s for it: a killed worker's
        sockets close before its process is reaped, and on a busy machine that gap is longer
        than a fixed pause (CI saw "connection reset" with the worker not yet seen to exit)."""
        deadline = time.monotonic() + patience
        while (who := self._who_failed()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return who

    def _collect(self, job_id: str) -> list[Any]:
        out, deadline = [], time.monotonic() + self.result_timeout
        for rank in range(1, self.world):
            key = f"done/{job_id}/{rank}"
            while not self.member.store.check([key]):
                if time.monotonic() > deadline or self._who_failed():
                    self.broken = self._who_failed() or f"rank {rank} did not report"
                    self.close()
                    raise PoolError(self.broken)
                time.sleep(0.01)
            out.append(pickle.loads(self.member.store.get(key)))
        return out

    def close(self) -> None:
        """Stop the workers (politely, then not) and leave the process group."""
        import torch.distributed as dist

        if self.member is not None and self.broken is None:
            try:
                self.member.broadcast({"kind": "stop"})
            except Exception:  # noqa: BLE001
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        self.member = None
        # the store's server socket goes with the last reference to it, which a reference cycle
        # kept alive until the next collection: a pool on the same fixed port failed to listen
        gc.collect()


def _is_comm_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "peer"))


class _Watch:
    """While rank 0 waits in a collective, a side thread watches the spawned workers; when one
    dies it aborts a CUDA (NCCL) group, whose collectives would otherwise wait for their
    timeout (gloo ones fail at once when a peer's connection closes)."""

    def __init__(self, pool: Pool):
        self.pool, self.done = pool, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(timeout=1)
        return False

    def _watch(self) -> None:
        while not self.done.wait(0.2):
            if any(p.poll() is not None for p in self.pool.procs.values()):
                _abort_nccl()
                return


def _abort_nccl() -> None:
    """Abort the NCCL communicators of the default group (untested without GPUs: best effort)."""
    try:
        import torch.distributed as dist

        if dist.is_initialized() and torch.cuda.is_available():
            dist.distributed_c10d._get_default_group()._get_backend(torch.device("cuda")).abort()
    except Exception:  # noqa: BLE001
        pass


def serve(member: Member, handle: Callable[[dict, Member], Any], end: Callable[[int], Any] = os._exit) -> None:
    """A worker's loop: each job from rank 0 goes to ``handle``; its answer (or Cancelled) goes
    back through the store. Any other error is written to the store and ends the process with
    ``end(1)`` (the ranks cannot stay in step after it; rank 0 sees the error and rebuilds the
    pool; a worker that stays starts afresh instead)."""
    while True:
        job = member.broadcast()
        if job.get("kind") == "stop":
            return
        try:
            answer = handle(job, member)
        except Cancelled:
            answer = {"cancelled": True}
        except BaseException as err:  # noqa: BLE001 - reported, then the process ends
            log.exception("WanFit worker rank %d failed", member.rank)
            member.store.set(f"error/{member.rank}", f"{type(err).__name__}: {err}")
            sys.stdout.flush()
            end(1)
        member.store.set(f"done/{job['id']}/{member.rank}", pickle.dumps(answer))
