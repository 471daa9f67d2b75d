"""Installing and removing cachequant on a pipeline's denoiser (the hook core).

A :class:`Session` owns everything that was changed on the pipeline: the denoiser's ``forward``
(dispatching full / cached steps and advancing the step counter), the adapter's cache hooks, the
quantized layers, and the scheduler's ``set_timesteps`` (which resets the counter at the start
of every pipeline run and checks the sampler against the plan). ``restore`` undoes all of it;
no parameter of the original model is ever modified, so the model comes back bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import PlanMismatchError
from .models.adapters import Adapter
from .quant.apply import QuantState
from .runtime import Runtime

_ATTR = "_cachequant_session"


def probe_sampler(scheduler, num_inference_steps: int) -> dict:
    """The timesteps (one per model call) a pipeline run of ``num_inference_steps`` will use."""
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_inference_steps)
    timesteps = [int(t) for t in probe.timesteps]
    return {"scheduler": type(scheduler).__name__, "num_inference_steps": num_inference_steps,
            "num_calls": len(timesteps), "timesteps": timesteps}


def sample_of(out: Any) -> torch.Tensor:
    """The predicted tensor of a denoiser output (a ``*Output`` dataclass or a tuple)."""
    return out[0] if isinstance(out, tuple) else out.sample


def map_sample(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(out, tuple):
        return (fn(out[0]),) + tuple(out[1:])
    out.sample = fn(out.sample)
    return out


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def check_sampler(s: dict, scheduler, timesteps: list[int] | None = None) -> None:
    """Raises :class:`PlanMismatchError` if ``scheduler`` (and its current timesteps) differ from ``s``."""
    cls = type(scheduler).__name__
    if cls != s["scheduler"]:
        raise PlanMismatchError(
            f"this plan was calibrated with {s['scheduler']} ({s['num_inference_steps']} steps), but the "
            f"pipeline uses {cls}; set that scheduler back or calibrate a plan for {cls}")
    if timesteps is None:
        return
    if len(timesteps) != s["num_calls"]:
        raise PlanMismatchError(
            f"this plan was calibrated for num_inference_steps={s['num_inference_steps']} with {cls} "
            f"({s['num_calls']} model calls), but this run has {len(timesteps)} model calls. Call the pipeline "
            f"with num_inference_steps={s['num_inference_steps']}, or calibrate a plan for the step count you want")
    if timesteps != s["timesteps"]:
        raise PlanMismatchError(
            "the scheduler's timesteps differ from the calibrated ones (same count, different values: is the "
            f"scheduler configured differently, e.g. timestep_spacing?); plan {s['timesteps'][:5]}..., "
            f"now {timesteps[:5]}...")


@dataclass
class Session:
    pipe: Any
    model: nn.Module
    adapter: Adapter
    site: dict
    runtime: Runtime
    sampler: dict
    quant: QuantState | None = None
    scheduler: Any = None
    run_step: Callable[[tuple, dict], Any] | None = None
    kernel_report: dict | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)
    restorable: str | None = None
    """None, or why :meth:`restore` would leave a broken model (it then raises instead)."""

    def check_timesteps(self, scheduler) -> None:
        check_sampler(self.sampler, scheduler, [int(t) for t in scheduler.timesteps])

    def wrap_scheduler(self, scheduler) -> None:
        original = scheduler.set_timesteps

        def set_timesteps(*args, **kwargs):
            out = original(*args, **kwargs)
            self.check_timesteps(scheduler)
            self.runtime.reset()
            return out

        scheduler.set_timesteps = set_timesteps
        self.scheduler = scheduler
        self.undo.append(lambda: scheduler.__dict__.pop("set_timesteps", None))

    def restore(self) -> None:
        if self.restorable is not None:
            raise RuntimeError(f"cannot restore this pipeline: {self.restorable}")
        if self.quant is not None:
            self.quant.restore()
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()
        self.model.__dict__.pop(_ATTR, None)


def session_of(model: nn.Module) -> Session | None:
    return model.__dict__.get(_ATTR)


def install_session(pipe: Any, model: nn.Module, adapter: Adapter, site: dict, runtime: Runtime,
                    sampler: dict) -> Session:
    if session_of(model) is not None:
        raise RuntimeError("this pipeline is already accelerated by cachequant; call cq.restore(pipe) first")
    sess = Session(pipe, model, adapter, site, runtime, sampler)
    sess.undo.extend(adapter.install(model, runtime, site))
    sess.wrap_scheduler(pipe.scheduler)
    original_forward = model.forward
    rt = runtime

    def run_step(args, kwargs):
        """One model call as step ``rt.step`` (full or cached), with VC on its output."""
        if rt.is_full:
            out = original_forward(*args, **kwargs)
        else:
            out = adapter.cached_forward(model, rt, site, original_forward, args, kwargs)
        if rt.vc is not None:
            from .correction.vc import apply_vc

            vc = rt.at_step(rt.vc)
            out = map_sample(out, lambda x: apply_vc(x, vc))
        if rt.call_log is not None:
            rt.call_log.append((rt.step, to_cpu(args), to_cpu(kwargs), to_cpu(sample_of(out))))
        return out

    def forward(*args, **kwargs):
        if pipe.scheduler is not sess.scheduler:
            # The scheduler was replaced after accelerate(): adopt it if it matches the plan.
            sess.check_timesteps(pipe.scheduler)
            sess.wrap_scheduler(pipe.scheduler)
            rt.reset()
        if rt.calls >= rt.num_calls:
            raise RuntimeError(
                f"cachequant: the denoiser was called more than the {rt.num_calls} times one calibrated run "
                "has. The step counter resets when the pipeline calls scheduler.set_timesteps(); if you drive "
                "the model yourself, call cq.reset_steps(pipe) before each sampling loop")
        rt.step = rt.calls
        rt.calls += 1
        if rt.step_t is not None:
            rt.step_t.fill_(rt.step)
        return sess.run_step(args, kwargs)

    sess.run_step = run_step
    model.forward = forward
    sess.undo.append(lambda: model.__dict__.pop("forward", None))
    model.__dict__[_ATTR] = sess
    return sess
