"""Telemetry: step and stage timing, host RAM peaks from the sampler thread, swap counters,
JSON output, and the sampler thread stopped whatever happens to the job."""
import json
import sys
import time

import pytest
import torch

from wanfit.optim import hostmem
from wanfit.optim.offload import BlockSwapper, RecordingBackend
from wanfit.optim.telemetry import Telemetry
from wanfit.wan.sampling import sample

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is Linux only")


def test_steps_and_stages_are_timed():
    with Telemetry("cpu") as tel:
        with tel.stage("load"):
            time.sleep(0.05)
        with tel.stage("sample"):
            for pause in (0.02, 0.15, 0.02):
                time.sleep(pause)
                tel.mark_step()
        tel.skip_step()
        time.sleep(0.2)  # between passes: not part of the next step
        with tel.stage("sample"):  # a second pass adds to the same stage
            time.sleep(0.02)
            tel.mark_step()
    s = tel.summary()
    assert s["steps"] == 4 and s["steps_skipped"] == 1
    step = s["step_s"]
    assert [t >= p for t, p in zip(step, (0.02, 0.15, 0.02, 0.02))] == [True] * 4
    assert step[2] < step[1]  # from the previous step's end, not from the stage's start
    assert step[3] < 0.2  # from the second stage's start, not from the last step
    assert abs(s["mean_step_s"] - sum(step) / 4) < 1e-12
    assert s["stages_s"]["load"] >= 0.05
    assert sum(step) <= s["stages_s"]["sample"] < s["wall_s"] - 0.2 - 0.05
    assert s["vram_peak_allocated"] is None and s["vram_peak_reserved"] is None  # CPU job


def test_sampling_callback_marks_each_step():
    sigmas = torch.linspace(1, 0, 5)
    with Telemetry("cpu") as tel, tel.stage("sample"):
        sample(lambda x, s, i: torch.zeros_like(x), torch.zeros(1, 2), sigmas, "euler",
               noise=torch.ones(1, 2), callback=tel.on_step)
    assert tel.summary()["steps"] == 4


def test_stage_time_is_kept_when_the_stage_raises():
    with pytest.raises(ValueError), Telemetry("cpu") as tel, tel.stage("decode"):
        time.sleep(0.02)
        raise ValueError("boom")
    assert tel.summary()["stages_s"]["decode"] >= 0.02


@linux
def test_sampler_sees_a_200_mb_allocation_as_a_peak_rise():
    with Telemetry("cpu", interval_s=0.01) as tel:
        before = hostmem.rss_anon_bytes()
        block = torch.ones(200 * 2**20, dtype=torch.uint8)  # written, so resident
        time.sleep(0.3)  # many polling periods: the thread alone must see it, even on a loaded machine
        del block
        after = hostmem.rss_anon_bytes()
    s = tel.summary()
    assert after < before + 50 * 2**20  # freed again: only a peak can show it
    assert s["host_rss_anon_peak"] - s["host_rss_anon_start"] >= 190 * 2**20
    assert s["host_rss_peak"] >= s["host_rss_anon_peak"]


@linux
def test_peak_rss_anon_growth_of_a_call():
    def hold_100_mib() -> int:
        t = torch.full((100 * 2**20,), 7, dtype=torch.uint8)
        time.sleep(0.3)  # held long enough for the poller to see all of it on a loaded machine
        return int(t[-1])

    result, growth = hostmem.peak_rss_anon_growth(hold_100_mib)
    assert result == 7
    assert 95 * 2**20 <= growth < 150 * 2**20


def test_summary_is_json_and_format_reads():
    blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))
    with Telemetry("cpu") as tel:
        with BlockSwapper(blocks, RecordingBackend(), resident=1, prefetch=1) as swapper:
            swapper.forward(torch.zeros(2, 16))  # before watch(): not this job's traffic
            tel.watch(swapper)
            with tel.stage("sample"):
                for _ in range(2):
                    swapper.forward(torch.zeros(2, 16))
                    tel.mark_step()
        tel.skip_step(3)
    s = json.loads(json.dumps(tel.summary()))
    assert s["h2d_bytes"] == 2 * 3 * swapper.stats.block_bytes  # 3 swapped blocks per forward
    assert s["transfer_wait_s"] == 0.0
    text = tel.format()
    assert "2 steps at" in text and "(3 skipped)" in text and "sample" in text
    assert "block swap moved" in text and "VRAM" not in text
    assert "\n" not in text


def test_sampler_thread_stops_when_the_job_raises():
    with pytest.raises(RuntimeError, match="job failed"):
        with Telemetry("cpu") as tel:
            assert tel.sampling
            raise RuntimeError("job failed")
    assert not tel.sampling
    assert tel.summary()["wall_s"] is not None  # figures stay readable after the failure


def test_a_dropped_recorder_stops_its_thread():
    import gc
    import threading

    tel = Telemetry("cpu").start()
    thread = tel._sampler._thread
    del tel
    gc.collect()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert "wanfit-rss-sampler" not in {t.name for t in threading.enumerate()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vram_peaks_are_reset_at_job_start():
    dev = torch.device("cuda")
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    del big  # a peak from before the job
    with Telemetry(dev) as tel:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
        tel.mark_step()
        del x
    s = tel.summary()
    assert 64 * 2**20 <= s["vram_peak_allocated"] < 256 * 2**20
    assert s["vram_peak_reserved"] >= s["vram_peak_allocated"]
    assert "VRAM peak" in tel.format()
