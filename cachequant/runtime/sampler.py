"""The sampler side: what a scheduler will do (probing), and the scheduler attachment that moves
the step clock from the scheduler's own calls.

A diffusers pipeline tells its scheduler everything the clock needs: ``set_timesteps`` starts a
run (its timesteps are checked against the plan's, custom ``sigmas=`` / ``timesteps=`` included),
``set_begin_index`` places an image-to-image run, ``scale_model_input(sample, t)`` names the
timestep of the coming call, and ``step`` ends each call. Schedulers with a ``step_index``
(Euler, Heun, DPM-Solver, UniPC, LCM, flow matching...) are followed by it; the others (DDIM,
DDPM, PNDM) by matching the timesteps they are given. The attachment wraps those four methods on
the scheduler instance; each wrapper keeps the wrapped method's signature (diffusers inspects
``set_timesteps`` for ``sigmas`` / ``timesteps``), and detaching removes only what is still ours.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch

from ..errors import PlanMismatchError
from .clock import StepClock

_WRAPPED = ("set_timesteps", "set_begin_index", "scale_model_input", "step")


def probe_timesteps(scheduler: Any, num_inference_steps: int, **set_timesteps_kwargs) -> list[float]:
    """The timesteps (one per model call) a run of ``num_inference_steps`` will use."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    probe = copy.deepcopy(scheduler)
    _unwrapped(probe, "set_timesteps")(num_inference_steps, **set_timesteps_kwargs)
    return as_floats(probe.timesteps)


def has_step_index(scheduler: Any) -> bool:
    return hasattr(type(scheduler), "step_index")


def _unwrapped(scheduler: Any, name: str) -> Callable:
    fn = getattr(scheduler, name)
    return getattr(fn, "__cachequant_original__", fn)


def _timestep_arg(args: tuple, kwargs: dict, index: int) -> Any:
    return kwargs["timestep"] if "timestep" in kwargs else (args[index] if len(args) > index else None)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a))


def as_floats(timesteps: Any) -> list[float]:
    """A scheduler's timesteps as host floats (one transfer for a device tensor)."""
    if isinstance(timesteps, torch.Tensor):
        return [float(t) for t in timesteps.detach().float().cpu().tolist()]
    return [float(t) for t in timesteps]


def _difference(planned: list[float], actual: list[float]) -> tuple[int, int] | None:
    """(first differing position, how many differ) of two equally long value lists, or None."""
    bad = [i for i, (a, b) in enumerate(zip(planned, actual)) if not _close(a, b)]
    return (bad[0], len(bad)) if bad else None


def check_timesteps(planned: list[float], scheduler_name: str, actual: list[float], plan_steps: int) -> None:
    """Raises :class:`PlanMismatchError` if a run's timesteps differ from the calibrated ones."""
    if len(actual) != len(planned):
        raise PlanMismatchError(
            f"this plan was calibrated for {plan_steps} inference steps with {scheduler_name} ({len(planned)} model "
            f"calls), but the scheduler was set up for {len(actual)} model calls. Call the pipeline with "
            f"num_inference_steps={plan_steps}, or calibrate a plan for the steps you use")
    diff = _difference(planned, actual)
    if diff:
        i, bad = diff
        raise PlanMismatchError(
            f"the scheduler's timesteps differ from the calibrated ones at position {i} (plan {planned[i]:g}, now "
            f"{actual[i]:g}; {bad} of {len(planned)} differ): custom sigmas/timesteps, or a scheduler configured "
            "differently (timestep_spacing, shift...)? Calibrate a plan with these timesteps (cq.calibrate takes "
            "the same sigmas=/timesteps= through pipeline_kwargs)")


def sigmas_of(scheduler: Any) -> list[float] | None:
    """The noise levels a sampler set up (``scheduler.sigmas``: Euler, Heun, DPM-Solver, UniPC, flow
    matching, one more than the timesteps), or None for a sampler without them (DDIM, DDPM, PNDM)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or isinstance(sigmas, (int, float)):
        return None
    return as_floats(sigmas)


def check_sigmas(planned: list[float] | None, scheduler_name: str, actual: list[float] | None) -> None:
    """Raises :class:`PlanMismatchError` if a run's sigmas differ from the calibrated ones. Timesteps
    alone do not pin a sampler: the same timesteps can come with another noise level (another
    flow-matching shift or ``mu`` under custom timesteps, a final sigma of zero or sigma_min), and
    every per-step range and correction of the plan was measured at the calibrated ones."""
    if planned is None or actual is None:
        return
    if len(actual) != len(planned):
        raise PlanMismatchError(
            f"{scheduler_name} set up {len(actual)} sigmas, the plan was calibrated with {len(planned)}: another "
            "sampler configuration; calibrate a plan for it")
    diff = _difference(planned, actual)
    if diff:
        i, bad = diff
        raise PlanMismatchError(
            f"the sampler's sigmas differ from the calibrated ones at position {i} (plan {planned[i]:g}, now "
            f"{actual[i]:g}; {bad} of {len(planned)} differ): another sigma schedule (flow-matching shift, "
            "dynamic shifting at another resolution, custom sigmas=, final_sigmas_type?). Calibrate a plan with "
            "this sampler configuration")


class SchedulerAttachment:
    """Wraps one scheduler's methods so that they move ``clock``; ``on_run_start`` runs (host side)
    at every ``set_timesteps``, before any model call of the run. ``planned=None`` (calibration's
    first pass) adopts the timesteps of the first run as the plan's and checks later runs."""

    def __init__(self, scheduler: Any, clock: StepClock, planned: list[float] | None, scheduler_name: str,
                 plan_steps: int,
                 on_run_start: Callable[[], None] | None = None, planned_sigmas: list[float] | None = None):
        self.scheduler = scheduler
        self.clock = clock
        self.planned = planned
        self.planned_sigmas = planned_sigmas
        """The calibrated sigmas (None: not checked; adopted from the first run when ``planned`` is)."""
        self.scheduler_name = scheduler_name
        self.plan_steps = plan_steps
        self.on_run_start = on_run_start
        self.indexed = has_step_index(scheduler)
        self.wrappers: dict[str, Callable] = {}
        for name in _WRAPPED:
            if hasattr(scheduler, name):
                self._wrap(name)

    def _wrap(self, name: str) -> None:
        original = getattr(self.scheduler, name)
        handler = getattr(self, f"_{name}")

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            return handler(original, args, kwargs)

        wrapper.__cachequant_original__ = original
        setattr(self.scheduler, name, wrapper)
        self.wrappers[name] = wrapper

    def detach(self) -> None:
        """Removes the wrappers that are still in place (one replaced since is left alone)."""
        for name, wrapper in self.wrappers.items():
            if self.scheduler.__dict__.get(name) is wrapper:
                del self.scheduler.__dict__[name]
        self.wrappers.clear()

    def join_run(self, timestep: Any) -> None:
        """Takes over a run this scheduler started before it was attached (a scheduler swapped into
        the pipeline after ``accelerate``): checks its timesteps and places the clock."""
        actual = as_floats(self.scheduler.timesteps)
        check_timesteps(self.planned, self.scheduler_name, actual, self.plan_steps)
        check_sigmas(self.planned_sigmas, self.scheduler_name, sigmas_of(self.scheduler))
        if self.on_run_start is not None:
            self.on_run_start()
        self.clock.start_run()
        index = getattr(self.scheduler, "step_index", None) if self.indexed else None
        if index is None and self.indexed:
            index = getattr(self.scheduler, "begin_index", None)
        if index is None and timestep is not None:
            index = self.clock.find(timestep)
        if index is not None:
            self.clock.set(int(index))

    # -- the four wrapped methods --------------------------------------------------------------
    def _set_timesteps(self, original, args, kwargs):
        out = original(*args, **kwargs)
        actual = as_floats(self.scheduler.timesteps)
        if self.planned is None:
            self.planned = actual
            self.planned_sigmas = sigmas_of(self.scheduler)
            self.clock.adopt(actual)
        check_timesteps(self.planned, self.scheduler_name, actual, self.plan_steps)
        check_sigmas(self.planned_sigmas, self.scheduler_name, sigmas_of(self.scheduler))
        if self.on_run_start is not None:
            self.on_run_start()
        self.clock.start_run()
        return out

    def _set_begin_index(self, original, args, kwargs):
        out = original(*args, **kwargs)
        begin = getattr(self.scheduler, "begin_index", None)
        if begin is not None:
            self.clock.set(int(begin))
        return out

    def _scale_model_input(self, original, args, kwargs):
        out = original(*args, **kwargs)
        if self.clock.tentative:  # the first call of a run: where does the sampler start?
            if self.indexed and getattr(self.scheduler, "step_index", None) is not None:
                self.clock.set(int(self.scheduler.step_index))
            else:
                t = _timestep_arg(args, kwargs, 1)
                found = None if t is None else self.clock.find(t)
                if found is None:
                    raise PlanMismatchError(f"the sampler's timestep {float(torch.as_tensor(t).reshape(-1)[0]):g} is "
                                            "not one of the plan's timesteps")
                self.clock.set(found)
        return out

    def _step(self, original, args, kwargs):
        out = original(*args, **kwargs)
        if not self.clock.running:
            return out
        if self.indexed and getattr(self.scheduler, "step_index", None) is not None:
            self.clock.advance(int(self.scheduler.step_index))
            return out
        t = _timestep_arg(args, kwargs, 1)
        pos = self.clock.position
        if t is not None and pos is not None and pos < self.clock.num_positions:
            value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
            if not _close(self.planned[pos], value):
                raise PlanMismatchError(
                    f"the model call used the plan's position {pos} (timestep {self.planned[pos]:g}) but the sampler "
                    f"stepped at timestep {value:g}: the pipeline started the run later without telling the "
                    "scheduler (set_begin_index / scale_model_input). Drive the model with cq.set_step, or use a "
                    "pipeline that calls scale_model_input")
        self.clock.advance()
        return out
