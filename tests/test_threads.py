"""The thread policy's logic, with the load and affinity inputs mocked (no timing)."""

from __future__ import annotations

import pytest
import torch

from cdeq.engine import threads
from cdeq.engine.config import ConfigError
from cdeq.engine.threads import apply_thread_policy, busy_cores, choose_threads, cpu_times


@pytest.mark.parametrize(("cores", "busy", "expected"), [
    (2, 0.0, 2),    # idle: every core
    (2, 0.1, 2),    # sampling noise does not cost a core
    (2, 1.0, 1),    # one busy process on two cores: one thread
    (2, 0.8, 1),    # most of a core taken counts as taken
    (2, 3.0, 1),    # oversubscribed: still one thread, never zero
    (16, 3.0, 13),  # the free cores of a larger machine
    (4, None, 4),   # load unknown: all cores
    (1, 0.0, 1),
])
def test_automatic_uses_the_free_cores(cores, busy, expected):
    assert choose_threads(0, cores, busy) == expected


def test_explicit_request_wins_over_load_and_environment():
    assert choose_threads(3, cores=2, busy=2.0, env_threads="1") == 3


def test_omp_num_threads_wins_over_the_automatic_choice():
    assert choose_threads(0, cores=8, busy=0.0, env_threads="2") == 2
    assert choose_threads(0, cores=8, busy=0.0, env_threads="junk") == 8  # ignored, with a warning


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_request_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="threads="):
        choose_threads(bad, cores=2, busy=0.0)


def test_cpu_times_counts_only_the_allowed_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  300 0 100 500 100 0 0 0 0 0\n"
        "cpu0 100 0 50 200 50 0 0 0 0 0\n"   # busy 150 of 400
        "cpu1 200 0 50 300 50 0 0 0 0 0\n"   # busy 250 of 600
        "intr 12345\n"
    )
    assert cpu_times({0}, str(stat)) == (150.0, 400.0)
    assert cpu_times(None, str(stat)) == (400.0, 1000.0)


def test_busy_cores_scales_the_busy_fraction_by_the_cores(monkeypatch):
    samples = iter([(100.0, 1000.0), (175.0, 1100.0)])  # 75 of 100 new jiffies busy
    monkeypatch.setattr(threads, "cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert busy_cores() == pytest.approx(1.5)


def test_busy_cores_falls_back_to_the_load_average(monkeypatch):
    def no_proc(cpus):
        raise OSError("no /proc")

    monkeypatch.setattr(threads, "cpu_times", no_proc)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.25, 0.0, 0.0), raising=False)
    assert busy_cores() == 1.25


def test_apply_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)
    try:
        assert apply_thread_policy(0) == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
        assert apply_thread_policy(0) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_explicit_request_or_environment_does_not_sample_the_load(monkeypatch):
    def fail():
        raise AssertionError("a thread count given by the user must not wait for a load sample")

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "busy_cores", fail)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert apply_thread_policy(1) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert apply_thread_policy(0) == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_run_samples_the_load_when_a_stage_starts_not_when_it_is_built(monkeypatch, tmp_path):
    from cdeq.run.stages import Run, build_config

    samples = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda: samples.append(1) or 1.0)
    before = torch.get_num_threads()
    try:
        with Run(tmp_path, build_config("digits", {"threads": 0}, quick=True)):
            pass  # a new run: config.json written, nothing computed
        run = Run(tmp_path)  # an existing run, read only (describe, summarize, loading)
        run.config.to_dict()
        assert samples == []
        with run.locked():  # what every stage (@writes) runs under
            assert samples == [1] and torch.get_num_threads() == 1
        with run.locked():
            pass
        assert samples == [1] and run.threads == 1  # applied once per run
    finally:
        torch.set_num_threads(before)
