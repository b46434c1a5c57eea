"""A WanFit multi-GPU worker: one rank of the process group that a WanFit Multi-GPU node's
job opens (the pool starts one per extra device; start one by hand on another machine).

    python scripts/worker.py --join HOST:PORT --rank 1 --world 2 --device cuda:0 \\
        --devices cuda:0,cuda:0 --package NAME [--models /path/to/ComfyUI/models] [--threads N] [--stay]

It needs this pack, torch and the model files (the same bytes; ``--models``: a ComfyUI
``models`` folder to find them by name when they lie elsewhere than on rank 0's machine).
ComfyUI itself is not needed here. Without ``--stay`` it exits when rank 0's pool closes;
with it, the process starts afresh (same command, same PID) and waits for rank 0's next pool,
so a worker on another machine outlives a failed job or a restart of ComfyUI (rank 0 must
then listen on a fixed port: WANFIT_MULTIGPU_PORT). A pool of other devices refuses it.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pack(name: str):
    """The pack as a package named as on rank 0 (where ComfyUI named it after its folder), so
    what rank 0 sends unpickles into the same classes; relative imports inside it work."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--join", required=True, help="rank 0's HOST:PORT")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--device", required=True, help="this worker's device: cuda:N or cpu")
    parser.add_argument("--devices", required=True, help="every rank's device, comma-separated")
    parser.add_argument("--models", type=Path, default=None, help="a ComfyUI models folder to find files by name")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for rank 0")
    parser.add_argument("--package", default="wanfit", help="the package name the pack has on rank 0")
    parser.add_argument("--stay", action="store_true",
                        help="when rank 0's pool closes (or never comes), start afresh and wait for the next one")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {args.rank}] %(message)s", stream=sys.stdout)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    host, port = args.join.rsplit(":", 1)
    _pack(args.package)
    worker = importlib.import_module(f"{args.package}.nodes.multigpu")
    if not args.stay:
        return worker.worker_main(host, int(port), args.rank, args.world, args.device, args.devices.split(","),
                                  args.models, args.timeout)

    def again(code: int = 0) -> None:
        """This same command in a fresh process (no process group, no device state left)."""
        logging.info("rank 0's pool closed (exit %d); starting afresh to wait for the next one", code)
        sys.stdout.flush()
        time.sleep(1.0)  # no hot loop while rank 0 is away
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv])

    try:
        worker.worker_main(host, int(port), args.rank, args.world, args.device, args.devices.split(","),
                           args.models, args.timeout, end=again)
    except Exception as err:  # noqa: BLE001 - rank 0 never came, or went: wait for it again
        logging.info("%s: %s", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        again(1)
    again(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
