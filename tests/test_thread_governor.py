"""The native layers' thread governor (`runtime/thread_governor.py`): its rule on a fake clock (calm windows keep the
full team; a contended window halves it for a hold; the full team is tried again after the hold, which doubles
while the contention lasts, up to its cap, and starts over once a trial is calm; off, or on one thread, it never
acts), the library's preemption count rising when another process shares a thread's core, and the layers on a
reduced team equal to the full team's bit for bit."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest
import torch

from twigvlm.runtime import native, native_layers, thread_governor
from twigvlm.runtime.native_layers import NativeLayers
from twigvlm.runtime.thread_governor import ThreadGovernor

from .test_native_layers import pruned_caches


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def governor(**kw) -> tuple[ThreadGovernor, Clock]:
    clock = Clock()
    return ThreadGovernor(window_s=0.02, limit=0.25, hold_s=0.5, max_hold_s=2.0, clock=clock, enabled=True, **kw), clock


def window(g: ThreadGovernor, full: int, rate: float) -> int:
    """One window of calls (4 calls of 5 ms) at `rate` preemptions per ms; the team they ran on."""
    team = g.threads(full)
    for _ in range(4):
        assert g.threads(full) == team  # no change within a window
        g.record(0.005, round(rate * 5))
    return team


def test_calm_windows_keep_the_full_team():
    g, _ = governor()
    assert [window(g, 2, 0.2) for _ in range(50)] == [2] * 50


def test_contention_halves_the_team_for_a_hold_that_doubles_while_it_lasts():
    g, clock = governor()
    assert window(g, 16, 1.0) == 16  # contended: 16 → 8
    assert window(g, 16, 1.0) == 8 and g.threads(16) == 4  # still contended on 8 threads: 4, the same hold
    assert g.hold == 0.5
    clock.now = 0.49
    assert g.threads(16) == 4
    for hold in (1.0, 2.0, 2.0):  # each trial of the full team is contended: the hold doubles, up to its cap
        clock.now = g.retry_at
        assert window(g, 16, 1.0) == 16 and g.threads(16) == 8 and g.hold == hold
    clock.now = g.retry_at
    assert window(g, 16, 0.0) == 16  # a calm trial: the full team stays, and the hold starts over
    assert [window(g, 16, 0.0) for _ in range(5)] == [16] * 5 and g.hold == 0.0
    window(g, 16, 1.0)
    assert g.threads(16) == 8 and g.hold == 0.5


def test_it_never_acts_off_or_on_one_thread():
    g, _ = governor()
    g.enabled = False
    assert [window(g, 2, 5.0) for _ in range(5)] == [2] * 5
    g.enabled = True
    assert [window(g, 1, 5.0) for _ in range(5)] == [1] * 5
    window(g, 4, 5.0)
    assert g.threads(4) == 2 and g.threads(8) == 8  # another thread count asked for: it starts over


def test_the_switch_off_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("TWIGVLM_ADAPTIVE_THREADS", "0")
    assert not ThreadGovernor().enabled
    monkeypatch.delenv("TWIGVLM_ADAPTIVE_THREADS")
    assert ThreadGovernor().enabled


@pytest.fixture
def lib():
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the native library cannot be built (apt-get install gcc)")
    built = native_layers._library()
    assert built is not None, native.build_error()
    return built


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux counts preemptions per thread")
def test_a_busy_process_on_a_threads_core_shows_in_the_preemption_count(adapters, lib, monkeypatch):
    """This thread pinned to one core with a spinning process pinned there too: the layers' calls report being
    preempted, and a governor that reads them reduces the team (to one thread here)."""
    layers, rotary, stock, ours, gen = pruned_caches(adapters, (40, 40, 40), seed=5)
    hidden = layers[0].input_layernorm.weight.shape[0]
    g, _ = governor()
    g.limit = 1e-9  # any preemption at all
    seen = []
    record = g.record
    monkeypatch.setattr(g, "record", lambda seconds, preempted: seen.append(preempted) or record(seconds, preempted))
    monkeypatch.setattr(native_layers, "GOVERNOR", g)
    runner = NativeLayers(rotary)
    x = torch.randn(1, 1, hidden, generator=gen)
    rope = rotary(x, torch.tensor([[60]]))
    threads, masks = torch.get_num_threads(), {tid: os.sched_getaffinity(tid) for tid in _threads()}
    torch.set_num_threads(2)

    def call() -> None:
        with torch.inference_mode():
            runner.run(packed, x, rope, ours)
        for kv in ours:
            kv.crop(40)

    with torch.inference_mode():
        packed = runner.runs(layers, x, ours, ())  # (the self-checks, before any pinning)
    call()  # the team's threads exist before this one is pinned: they stay free
    cpu = min(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.2)  # the spinner is running
        seen.clear()
        end = time.monotonic() + 10.0
        while time.monotonic() < end and not (sum(seen) >= 3 and g.threads(2) == 1):
            call()
    finally:
        busy.kill()
        busy.wait()
        for tid, mask in masks.items():  # every thread as it was
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)
        torch.set_num_threads(threads)
    assert sum(seen) >= 3 and g.threads(2) == 1


def _threads() -> list[int]:
    return [int(t) for t in os.listdir("/proc/self/task")]


def test_a_reduced_team_gives_the_full_teams_layers_bit_for_bit(adapters, lib, monkeypatch):
    layers, rotary, _, ours, gen = pruned_caches(adapters, (9, 5, 2), seed=13)
    hidden = layers[0].input_layernorm.weight.shape[0]
    x = torch.randn(1, 3, hidden, generator=gen)
    rope = rotary(x, torch.arange(20, 23).view(1, -1))
    runner, out = NativeLayers(rotary), {}
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for team in (4, 2, 1):
            monkeypatch.setattr(thread_governor.ThreadGovernor, "threads", lambda self, full, n=team: n)
            with torch.inference_mode():
                out[team] = runner.run(runner.runs(layers, x, ours, ()), x, rope, ours)
                for kv, n in zip(ours, (9, 5, 2), strict=True):
                    kv.crop(n)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[4], out[2]) and torch.equal(out[2], out[1])
