"""WanFit Multi-GPU through a real ComfyUI server (CPU processes as the devices: ComfyUI's own
process is rank 0, the pool starts the worker): the chained image-to-video graph runs split over
2 ranks, Cancel stops every rank, a worker killed mid-job fails that job with a message naming
its device and its log and the next job builds a new pool, and the server's memory holds over
repeated multi-GPU jobs."""
from __future__ import annotations

import itertools
import json
import os
import signal
import time

import psutil
import pytest

import factory
from comfy_server import EventStream
from e2e import api_workflow, error_text, node_of, small, upload_image, wan_models  # noqa: F401

pytestmark = pytest.mark.e2e
_SEEDS = itertools.count(7000)


@pytest.fixture(scope="module")
def server(wan_models, comfy_server):
    upload_image(comfy_server)
    return comfy_server


def _graph(steps: int = 2, frames: int = 5, devices: str = "cpu*2") -> dict:
    """The 81-frame chained graph on the two-head tiny experts, each expert through a Multi-GPU node."""
    prompt = small(api_workflow("wan22_i2v_a14b_81f_32gb"), size=48, steps=steps)
    prompt[node_of(prompt, "WanFitImageToVideoEncode")]["inputs"].update(frames=frames, width=80, height=48)
    wide = {"high": (factory.WIDE_HIGH, factory.WIDE_LORA_HIGH), "low": (factory.WIDE_LOW, factory.WIDE_LORA_LOW)}
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "WanFitModelLoader":
            node["inputs"]["file"] = wide["high" if "high" in node["inputs"]["file"] else "low"][0]
        elif node["class_type"] == "WanFitLoRA":
            node["inputs"]["lora_name"] = wide["high" if "high" in node["inputs"]["lora_name"] else "low"][1]
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "WanFitSampler":
            split_id = f"9{node_id}"
            prompt[split_id] = {"class_type": "WanFitMultiGPU", "inputs": {
                "model": node["inputs"]["model"], "devices": devices, "mode": "auto"}}
            node["inputs"]["model"] = [split_id, 0]
            node["inputs"]["seed"] = next(_SEEDS)
    return prompt


def _workers(server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.process.pid).children(recursive=True)
            if "worker.py" in " ".join(p.cmdline())]


def _run(server, prompt: dict, timeout: float = 180) -> dict:
    status, reply = server.client().queue_prompt(prompt)
    assert status == 200, json.dumps(reply)[:3000]
    return server.client().wait(reply["prompt_id"], timeout=timeout)


def test_a_graph_with_the_multi_gpu_node_runs_split_over_two_ranks(server):
    entry = _run(server, _graph())
    assert entry["status"]["status_str"] == "success", error_text(entry)
    log = server.log()
    assert "WanFit multi-GPU: 2 ranks joined" in log
    assert "Rank 1 of 2 (cpu, Ulysses sequence-parallel over 2)" in log  # the worker's own plan, named
    assert len(_workers(server)) == 1


def test_bad_devices_and_head_counts_are_refused_at_prompt(server):
    for devices, needle in (("cuda:7", "does not exist"), ("cpu*3", "3 sequence ranks cannot split")):
        status, reply = server.client().queue_prompt(_graph(devices=devices))
        assert status == 400 and needle in json.dumps(reply), (devices, json.dumps(reply)[:2000])


def _start_long_job(server, steps: int = 400):
    """Queue a long job; return once the first Sampler steps (events from ComfyUI's websocket)."""
    prompt = _graph(steps=steps)
    client = server.client()
    events = EventStream(server.url, client.client_id)
    status, reply = client.queue_prompt(prompt)
    assert status == 200, reply
    target = next(k for k, v in prompt.items() if v["class_type"] == "WanFitSampler" and "latent" not in v["inputs"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        event = events.receive(timeout=1.0)
        if (event and event[0] != "binary" and event[1].get("type") == "progress"
                and event[1].get("data", {}).get("node") == target):  # the encode reports progress too
            return client, events, reply["prompt_id"], target
    raise AssertionError("the sampler never reported progress")


def test_cancel_stops_every_rank(server):
    client, events, prompt_id, target = _start_long_job(server)
    try:
        client.interrupt()
        start = time.monotonic()
        while True:
            assert time.monotonic() - start < 10, "no execution_interrupted"
            event = events.receive(timeout=1.0)
            if event and event[0] != "binary" and event[1].get("type") == "execution_interrupted":
                seconds = time.monotonic() - start
                break
    finally:
        events.close()
    client.wait(prompt_id, timeout=60)
    print(f"multi-GPU cancel: {seconds:.2f} s")
    assert seconds < 2.0
    workers = _workers(server)
    assert len(workers) == 1  # the worker stopped with rank 0 and is still there for the next job
    entry = _run(server, _graph())
    assert entry["status"]["status_str"] == "success", error_text(entry)
    assert _workers(server)[0].pid == workers[0].pid  # the same pool served it


def test_a_killed_worker_fails_the_job_clearly_and_the_next_job_runs(server):
    client, events, prompt_id, _ = _start_long_job(server)
    events.close()
    (worker,) = _workers(server)
    os.kill(worker.pid, signal.SIGKILL)
    entry = client.wait(prompt_id, timeout=120)
    text = error_text(entry)
    assert entry["status"]["status_str"] == "error", text
    assert "multi-GPU worker on cpu (rank 1)" in text and "wanfit_worker_1.log" in text, text
    entry = _run(server, _graph())
    assert entry["status"]["status_str"] == "success", error_text(entry)
    assert "rebuilding the worker pool" in server.log() or len(_workers(server)) == 1


def _rss(server) -> int:
    with open(f"/proc/{server.process.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_server_memory_holds_over_ten_multi_gpu_jobs(server):
    for _ in range(2):
        assert _run(server, _graph(steps=1))["status"]["status_str"] == "success"
    before = _rss(server)
    for _ in range(10):
        assert _run(server, _graph(steps=1))["status"]["status_str"] == "success"
    growth = _rss(server) / before - 1
    print(f"RssAnon over 10 multi-GPU jobs: {before / 2**20:.0f} MiB, {growth:+.1%}")
    assert growth < 0.02
