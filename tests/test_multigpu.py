"""Multi-GPU through the nodes on CPU processes (gloo, 1 thread each): whole jobs on 2 ranks
equal 1 process bit for bit (tests/multigpu_cases.py, run in a process of its own; see there
why). Rank 0 is that process; the worker a real pool process (scripts/worker.py), or one
started as a separate command. Also: a worker started for other devices is refused at the
join, and the device lists the node accepts or refuses."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).resolve().parent / "multigpu_cases.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    env = dict(os.environ, MKL_CBWR="AVX2,STRICT", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path_factory.mktemp("tmp")))
    out = subprocess.run([sys.executable, str(CASES), str(tmp_path_factory.mktemp("models"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    found = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            found[row["case"]] = row
    print(json.dumps(found, indent=1))
    return found


@pytest.mark.parametrize("case", [
    "two-pass 4-step LoRA job, cfg 1 (Ulysses)", "CFG-parallel, cfg 3.5", "EasyCache, cfg 3.5 (CFG-parallel)",
    "context windows (Ulysses)", "sparse attention (Ulysses)", "worker started as a separate command"])
def test_two_ranks_equal_one_process_bit_for_bit(results, case):
    row = results[case]
    assert row["equal"], row
    assert row["plan_names_rank_1"], row  # the worker planned its own share and the plan says so
    if "sparse_differs" in row:
        assert row["sparse_differs"], row  # the sparse mask was on (on both sides)
    if "stays" in row:
        assert row["stays"] and row["next_pool_equal"], row  # a worker started by hand serves the next pool too
    if "skipped" in row:
        assert row["skipped"][0] == row["skipped"][1] > 0, row  # the same steps skipped, some at all


def test_a_worker_started_for_other_devices_is_refused_at_once(tmp_path):
    """A worker left running from an earlier pool (``--stay``) whose device list is not this
    pool's: rank 0 fails the join naming it and the right command, and the worker hears why,
    both within seconds (not at the join timeout, not in a process group of the wrong size)."""
    import time

    from wanfit.optim.pool import Pool, PoolError, free_port

    port = free_port("127.0.0.1")
    stale = [a for a in Pool(("cpu", "remote", "remote"), tmp_path, port=port, threads=1).command(1) if a != "--stay"]
    worker = subprocess.Popen(stale, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    pool = Pool(("cpu", "remote"), tmp_path, port=port, threads=1, join_timeout=60)
    start = time.monotonic()
    try:
        with pytest.raises(PoolError) as refused:
            pool.start()
        output = worker.communicate(timeout=60)[0]
    finally:
        worker.kill()
        pool.close()
    assert time.monotonic() - start < 30
    message = str(refused.value)
    assert "started for devices cpu,remote,remote, not cpu,remote" in message and "--world 2" in message, message
    assert worker.returncode != 0 and "opened a pool of devices cpu,remote" in output, output[-2000:]


@pytest.mark.parametrize("text, expected", [
    ("cpu*2", ("cpu", "cpu")), (" CPU , cpu ", ("cpu", "cpu")), ("cpu,remote*2", ("cpu", "remote", "remote")),
    ("remote,cpu", "the first device is this machine's"), ("cpu*0", "N from 1 to 64"), ("cpu*65", "N from 1 to 64"),
    ("cuda:1*2", "only cpu*N and remote*N repeat"), ("gpu0", "is not a device"), ("", "list 1 to 64 devices"),
    ("cpu*64,cpu", "list 1 to 64 devices"), ("cuda:99", "does not exist here")])
def test_device_lists(text, expected):
    from wanfit.nodes.multigpu import parse_devices

    if isinstance(expected, tuple):
        assert parse_devices(text) == expected
    else:
        with pytest.raises(ValueError, match=re.escape(expected)):
            parse_devices(text)
