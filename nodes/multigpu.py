"""The WanFit Multi-GPU node, rank 0's side of a multi-device pass, and the workers' side.

The node puts the devices and the split mode on a model. When a sampler runs that model, rank
0 (ComfyUI's process) starts or reuses the worker pool (``optim/pool.py``), picks the mesh
(``optim/parallel.choose_mesh``), plans its own memory for its share, sends the pass to the
workers (files by identity, conditioning and latents, step cache and context windows) and runs
its share; every worker runs the very same ``sample.run_pass`` on its device (``worker_main``,
ComfyUI not needed there) and answers with its plan and telemetry.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..optim.lora import open_lora
from ..optim.parallel import MODES, DistComm, Mesh, ParallelBlocks, ParallelError, choose_mesh
from ..optim.pool import REMOTE, Cancelled, Member, Pool, PoolError
from ..optim.step_cache import StepCache
from . import comfy, graph
from .load import LoraChoice, ModelHandle

log = logging.getLogger("WanFit")
CATEGORY = "WanFit/memory"
MAX_RANKS = 64


@dataclass(frozen=True)
class MultiGPU:
    """What a WanFit Multi-GPU node set: every rank's device (rank 0's first) and the mode."""

    devices: tuple[str, ...]
    mode: str = "auto"


def parse_devices(text: str) -> tuple[str, ...]:
    """``all`` (every CUDA device), a list such as ``cuda:0,cuda:1`` or ``0,1``, CPU processes
    (``cpu,cpu`` or ``cpu*2``: for tests and machines without a GPU), and ``remote`` ranks (or
    ``remote*N``) whose workers are started by hand, on another machine. Rank 0 (the first) is
    this machine's. ValueError names what is wrong."""
    text = str(text).strip().lower()
    if text == "all":
        count = torch.cuda.device_count()
        if count < 1:
            raise ValueError("devices all: no CUDA device here; list CPU processes as cpu*2 to run on the CPU")
        return tuple(f"cuda:{i}" for i in range(count))
    devices = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition("*")
        if count and (name not in ("cpu", REMOTE) or not count.isdigit() or not 1 <= int(count) <= MAX_RANKS):
            raise ValueError(f"devices: {part!r}: only cpu*N and remote*N repeat (N from 1 to {MAX_RANKS})")
        if name in ("cpu", REMOTE):
            devices += [name] * (int(count) if count else 1)
            continue
        name = f"cuda:{name}" if name.isdigit() else name
        if not name.startswith("cuda:") or not name[5:].isdigit():
            raise ValueError(f"devices: {part!r} is not a device (cuda:N, N, cpu or all)")
        if int(name[5:]) >= torch.cuda.device_count():
            raise ValueError(f"devices: {name} does not exist here ({torch.cuda.device_count()} CUDA devices)")
        devices.append(name)
    if not devices or len(devices) > MAX_RANKS:
        raise ValueError(f"devices {text!r}: list 1 to {MAX_RANKS} devices")
    gpus = [d for d in devices if d.startswith("cuda")]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"devices {text!r}: each GPU once")
    if devices[0] == REMOTE:
        raise ValueError(f"devices {text!r}: the first device is this machine's (rank 0), not remote")
    if gpus and "cpu" in devices:
        raise ValueError(f"devices {text!r}: GPUs or CPU processes, not both")
    return tuple(devices)


class WanFitMultiGPU:
    """Several GPUs on one Wan model: between the model loader (or LoRA / Memory) and the
    sampler. CFG-parallel runs cond and uncond on two halves of the devices (cfg above 1);
    Ulysses sequence-parallel splits the video's tokens over the devices of a half, which must
    divide the model's attention heads (1.3B: 12, TI2V-5B: 24, 14B and A14B: 40). auto uses
    both where it can (with cfg 1 every device splits tokens). devices: all, a list such as
    cuda:0,cuda:1, or cpu*2 for CPU processes. Rank 0 is ComfyUI's own device; the others are
    worker processes that keep their model between jobs."""

    DISPLAY_NAME = "WanFit Multi-GPU"
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("WANFIT_MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WANFIT_MODEL",),
            "devices": ("STRING", {"default": "all", "tooltip": (
                "all (every GPU), a list such as cuda:0,cuda:1 (the first is ComfyUI's own), cpu*2 (CPU "
                "processes), and remote or remote*N for workers started by hand on another machine")}),
            "mode": (list(MODES), {"default": "auto", "tooltip": (
                "cfg: cond and uncond on two devices (cfg above 1); sequence: the video's tokens split over "
                "every device (their count must divide the model's heads); both: two halves, each splitting "
                "the tokens; auto: both where it can")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, devices=None):
        if devices is None:
            return True
        try:
            parse_devices(devices)
        except ValueError as err:
            return str(err)
        return True

    def apply(self, model: ModelHandle, devices: str, mode: str):
        found = parse_devices(devices)
        if len(found) == 1:  # one device: the sampler's own path, on ComfyUI's device
            log.info("WanFit Multi-GPU: one device (%s): %s runs as without the node", found[0], model.name)
            return (dataclasses.replace(model, parallel=None),)
        return (dataclasses.replace(model, parallel=MultiGPU(found, mode)),)


NODES = {"WanFitMultiGPU": WanFitMultiGPU}


def _multigpu_check(prompt: dict, node_id: str):
    """At /prompt: a Multi-GPU node's devices against its model's heads and every sampler's cfg."""
    node = graph.node(prompt, node_id) or {}
    text, mode = graph.literal(node, "devices"), graph.literal(node, "mode")
    if not isinstance(text, str) or mode not in MODES:
        return None
    try:
        devices = parse_devices(text)
    except ValueError:
        return None  # the node's own check says so
    from .pairing import _config, _THROUGH_MODEL

    loader = graph.upstream(prompt, node_id, "model", _THROUGH_MODEL, "WanFitModelLoader")
    config = _config(graph.literal(loader, "file"))
    if config is None:
        return None
    cfgs = {graph.literal(n, name) for i, n in prompt.items() if isinstance(n, dict)
            for name in ("cfg", "cfg_high", "cfg_low")
            if isinstance(graph.literal(n, name), (int, float)) and node_id in graph.ancestors(prompt, i)}
    for cfg in cfgs or {None}:
        try:
            choose_mesh(len(devices), mode, cfg is None or cfg != 1.0, config)
        except ParallelError as err:
            return f"{len(devices)} devices, mode {mode}" + (f", cfg {cfg:g}" if cfg is not None else "") + f": {err}"
    return None


graph.register("WanFitMultiGPU")(_multigpu_check)


# --- rank 0 ---------------------------------------------------------------------------------

_POOL: dict[str, Pool | None] = {"pool": None}


def pool_for(settings: MultiGPU) -> Pool:
    """The running pool for these devices; a new one when there is none, it serves other
    devices, or it broke (a worker died, a job failed between ranks)."""
    pool = _POOL["pool"]
    if pool is not None and (pool.devices != settings.devices or not pool.alive()):
        if pool.broken:
            log.warning("WanFit multi-GPU: rebuilding the worker pool (%s)", pool.broken)
        pool.close()
        pool = _POOL["pool"] = None
    if pool is None:
        log_dir = Path(tempfile.gettempdir()) / "wanfit_workers"
        # CPU ranks share the machine's cores (GPU workers keep torch's default)
        cpu_share = max(1, (os.cpu_count() or 1) // len(settings.devices)) if set(settings.devices) == {"cpu"} else 0
        threads = int(os.environ.get("WANFIT_WORKER_THREADS", cpu_share))
        # remote workers reach rank 0 at an address and port of the user's choosing
        host = os.environ.get("WANFIT_MULTIGPU_HOST", "127.0.0.1")
        port = int(os.environ.get("WANFIT_MULTIGPU_PORT", "0"))
        timeout = float(os.environ.get("WANFIT_MULTIGPU_JOIN_TIMEOUT", "120"))
        pool = Pool(settings.devices, log_dir, host=host, port=port, threads=threads, join_timeout=timeout).start()
        _POOL["pool"] = pool
    return pool


def close_pool() -> None:
    if _POOL["pool"] is not None:
        _POOL["pool"].close()
        _POOL["pool"] = None


@dataclass(frozen=True)
class FileRef:
    """A file by identity: where rank 0 read it, its name and size (a worker elsewhere looks
    it up by name in its own models folder and checks the size)."""

    path: str
    name: str
    size: int
    folders: tuple[str, ...]

    @classmethod
    def of(cls, path: Path, name: str, *folders: str) -> FileRef:
        return cls(str(path), name, path.stat().st_size, folders)

    def resolve(self, models: Path | None) -> Path:
        candidates = [Path(self.path)] + [models / f / self.name for f in self.folders if models is not None]
        for path in candidates:
            if path.is_file() and path.stat().st_size == self.size:
                return path
        where = f" or under {models}" if models is not None else " (start the worker with --models)"
        raise FileNotFoundError(f"{self.name} ({self.size} bytes) is not at {self.path}{where} on this machine")


def _model_spec(handle: ModelHandle) -> dict:
    return {"file": FileRef.of(handle.ckpt.path, handle.name, "diffusion_models", "unet"),
            "weight_format": handle.weight_format, "compute_dtype": handle.compute_dtype,
            "attention": handle.attention, "memory": handle.memory, "sparse": handle.sparse,
            "loras": [(FileRef.of(Path(c.lora.path), c.lora.name, "loras"), c.strength, c.mode) for c in handle.loras]}


@dataclass
class Split:
    """One rank's part of a pass: the mesh, its member of the process group, the block split.

    The ranks stay in step through sync points (``Member.agree``): one before each DiT call and
    one when the pass ends. Rank 0 says go or stop there; when it leaves a pass between DiT calls
    (Cancel, an error of its own) it says stop at the next one, where every worker is waiting,
    so the workers stop too and the pool stays usable. Leaving in the middle of a call (its
    collectives half done) cannot be mended: the pool is closed and rebuilt by the next job."""

    mesh: Mesh
    member: Member | None
    rank: int = 0
    batch_cfg: bool | None = None  # what rank 0 decided (every rank must batch the same way)
    blocks: ParallelBlocks | None = None
    stopped: bool = False  # rank 0 has said stop

    def wrap(self, run_blocks):
        self.blocks = ParallelBlocks(self.mesh, self.rank, DistComm(), self.member.groups(self.mesh.cfg),
                                     self.member.everyone, before_call=self._sync)
        return self.blocks.wrap(run_blocks)

    def _sync(self) -> None:
        if self.rank:
            self.member.agree()
            return
        self.stopped = comfy.interrupted()
        try:
            self.member.agree(self.stopped)
        except Cancelled:
            comfy.throw_if_interrupted()
            raise

    def leave(self, pool: Pool) -> None:
        """Rank 0 leaves the pass early (see the class docstring)."""
        if self.stopped:
            return
        self.stopped = True
        if self.blocks is not None and self.blocks.in_call:
            # the pool closes once it has asked the workers which one failed (Pool.run)
            pool.broken = "rank 0 stopped inside a DiT call, with the ranks' exchanges half done"
            return
        try:
            self.member.agree(stop=True)
        except Cancelled:
            pass
        except Exception as err:  # noqa: BLE001 - the workers are gone already: the pool says which
            pool.broken = pool.broken or f"could not stop the workers ({err})"


@dataclass(frozen=True)
class WorkerRole:
    """``ModelHandle.parallel`` on a worker: the mesh and batching rank 0 chose, its member."""

    mesh: Mesh
    batch_cfg: bool
    member: Member


def plan_split(handle: ModelHandle, cfg: float) -> Split | None:
    """This rank's split of a pass with ``handle`` (None: one device), before planning."""
    role = handle.parallel
    if role is None:
        return None
    if isinstance(role, WorkerRole):
        return Split(role.mesh, role.member, role.member.rank, role.batch_cfg)
    mesh = choose_mesh(len(role.devices), role.mode, cfg != 1.0, handle.config)
    return Split(mesh, None, 0, True if mesh.cfg == 2 else None)


def run_split(split: Split, handle: ModelHandle, spec: dict, execute) -> tuple[Any, list[Any]]:
    """Run ``execute(split)`` as this rank, then the pass's last sync point. On rank 0 the workers
    get ``spec`` first and answer after. Returns (result, the workers' answers)."""
    if split.rank:
        result = execute(split)
        split.member.agree()
        return result, []
    pool = pool_for(handle.parallel)
    split.member = pool.member
    job = {"kind": "pass", "model": _model_spec(handle), "mesh": split.mesh, "batch_cfg": split.batch_cfg, **spec}

    def local(member: Member):
        try:
            result = execute(split)
        except BaseException:
            split.leave(pool)
            raise
        member.agree()
        return result
    try:
        return pool.run(job, local)
    except PoolError:
        close_pool()
        raise


# --- a worker -------------------------------------------------------------------------------

def worker_main(host: str, port: int, rank: int, world: int, device: str, devices: list[str],
                models: Path | None, timeout: float, end: Callable[[int], Any] = os._exit) -> int:
    """A worker process: join rank 0, then run every pass it sends until it says stop; a job
    that fails here ends the process with ``end(1)``."""
    from ..optim import pool

    comfy.run_standalone(device)
    member = pool.join(host, port, rank, world, device, devices, timeout, job_timeout=600.0)
    log.info("joined %s:%d as rank %d of %d on %s", host, port, rank, world, device)
    pool.serve(member, lambda job, m: _serve_pass(job, m, models), end)
    return 0


def _handle_from(spec: dict, models: Path | None, role: WorkerRole) -> ModelHandle:
    from .load import open_verified_path

    ckpt, config = open_verified_path(spec["file"].resolve(models), "dit")
    loras = tuple(LoraChoice(open_lora(ref.resolve(models), ckpt.shapes, ref.name), strength, mode)
                  for ref, strength, mode in spec["loras"])
    return ModelHandle(ckpt, config, spec["weight_format"], spec["compute_dtype"], spec["attention"],
                       spec["memory"], loras, parallel=role, sparse=spec["sparse"])


def _serve_pass(job: dict, member: Member, models: Path | None) -> dict:
    from . import cache as step_caches
    from . import sample
    from ..optim.telemetry import Telemetry

    role = WorkerRole(job["mesh"], job["batch_cfg"], member)
    handle = _handle_from(job["model"], models, role)
    cache = None
    if job["cache"] is not None:
        c = job["cache"]
        step_cache = StepCache(c["policy"], c["steps"], split=c["split"], storage=c["storage"], note=c["note"])
        if c["state"]["calls"]:
            step_cache.load_state_dict(c["state"])
        cache = step_caches.JobCache(step_cache, c["settings"], c["job"])
    with Telemetry(comfy.compute_device()) as tel:
        _, plan = sample.run_pass(handle, job["text"], job["embeds"], job["latent"], job["sigmas"], job["solver"],
                                  job["cfg"], job["start"], job["end"], job["noise"], job["add_noise"],
                                  job["leftover"], job["state"], lambda *a: None, tel, cache, job["windows"])
    return {"plan": plan.text, "telemetry": tel.summary(), "device": member.device}


def cache_spec(cache) -> dict | None:
    """A pass's step cache as a worker rebuilds it (its state as of the start of the pass)."""
    if cache is None:
        return None
    c = cache.cache
    storage = "compute" if c.storage is None else str(c.storage)
    return {"policy": c.policy, "steps": c.steps, "split": c.split, "storage": storage, "note": c.note,
            "state": c.state_dict(), "settings": cache.settings, "job": cache.job}
