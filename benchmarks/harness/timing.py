"""Timing: device sync, timed pipeline runs with a warm-up limit, a sampler of where a long call's
time goes, and GPU time per call with the host out of the loop (graph replay)."""

from __future__ import annotations

import contextlib
import signal
import statistics
import sys
import threading
import time
from pathlib import Path


def sync(device: str) -> None:
    """Wall-clock timings on CUDA need the queued kernels finished."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class WarmupTimeout(BaseException):
    """A BaseException, like KeyboardInterrupt: inductor catches ``Exception`` around its Triton
    compiles and logs it (an H200 run's first limit, an Exception, was swallowed there and the
    row compiled on for 242 s), so an ordinary exception would not stop a compilation."""


def _warmup_alarm(signum, frame):
    raise WarmupTimeout


def time_runs(pipe, kw: dict, repeats: int, device: str, warmup_limit_s: float | None = None,
              warmup_profile: dict | None = None) -> dict:
    """Times ``pipe(generator=..., **kw)`` (the pipeline through ``call_pipeline``, or any callable).
    ``warmup_limit_s``: give up on a row whose warm-up run (graph capture, compilation) takes
    longer, so that one slow compilation does not take the rest of a device call with it. The
    alarm interrupts Python code only: a single long C call ends first. ``warmup_profile``: a dict
    that receives where the warm-up's time went (``StackSampler``), also when it is cut."""
    import torch

    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if warmup_limit_s:
        old = signal.signal(signal.SIGALRM, _warmup_alarm)
        signal.setitimer(signal.ITIMER_REAL, warmup_limit_s)
    sampler = StackSampler() if warmup_profile is not None else contextlib.nullcontext()
    try:
        with sampler:
            pipe(generator=torch.Generator(device).manual_seed(0), **kw)  # warm-up (captures graphs, compiles)
            sync(device)
    except WarmupTimeout:
        raise RuntimeError(f"the warm-up run (compilation, graph capture) did not finish in {warmup_limit_s:.4g} s "
                           "(--warmup-limit-s, or what was left of --time-budget-s)") from None
    finally:
        if warmup_limit_s:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if warmup_profile is not None:
            warmup_profile.update(sampler.summary())
    warm = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pipe(generator=torch.Generator(device).manual_seed(i + 1), **kw)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    if not times:  # --repeats 0: the warm-up only
        return {"warmup_only": True, "warmup_s": warm, "peak_mem_gib": peak}
    return {"median_s": statistics.median(times), "times_s": times, "warmup_s": warm, "peak_mem_gib": peak}


class StackSampler:
    """Where a long call spends its time, at almost no cost to it: a helper thread looks at the
    calling thread's Python stack every ``interval`` seconds and counts each function once per
    sample that has it on the stack (``inclusive``: which stage is slow) and the innermost one
    (``own``: where the thread sat, C calls included, under the Python function that made them).
    cProfile would instead slow the Python-heavy compilation it is asked to explain."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.samples = interval, 0
        self.inclusive: dict[str, int] = {}
        self.own: dict[str, int] = {}
        self._stop = threading.Event()

    def __enter__(self) -> "StackSampler":
        self._tid = threading.get_ident()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._tid)
            if frame is None:
                continue
            self.samples += 1
            names = []
            while frame is not None:
                c = frame.f_code
                names.append(f"{Path(c.co_filename).name}:{c.co_firstlineno}({c.co_name})")
                frame = frame.f_back
            self.own[names[0]] = self.own.get(names[0], 0) + 1
            for n in set(names):
                self.inclusive[n] = self.inclusive.get(n, 0) + 1

    def summary(self, top: int = 40, min_s: float = 0.5) -> dict:
        def pick(counts: dict[str, int]) -> list[dict]:
            best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
            return [{"function": f, "s": round(n * self.interval, 1)} for f, n in best if n * self.interval >= min_s]

        return {"warmup_profile": {"sampled_s": round(self.samples * self.interval, 1), "interval_s": self.interval,
                                   "inclusive": pick(self.inclusive), "own": pick(self.own)}}



def graph_ms(fn, reps: int = 20) -> float:
    """GPU milliseconds per call of ``fn`` with the host out of the loop: ``reps`` calls captured in
    one CUDA graph, replayed. (``do_bench`` times eager calls, so on small shapes it also measures
    the Python launch overhead, which a graph-captured denoiser does not pay.)"""
    import torch
    import triton.testing as tt

    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return tt.do_bench(g.replay) / reps

