"""A session: everything cachequant attached to one denoiser, and how to take it off again.

Calibration passes and ``cq.accelerate`` build sessions from the same pieces — a step clock, a
feature cache, the denoiser hook, cache hooks, quantized layers, 8-bit attention, variance
compensation — each attached as named hooks and held buffers and each recorded with its undo.
``restore`` runs the undos in reverse; no parameter of the model is ever modified, so the model
comes back bit for bit.

A session also guards the state it depends on. At ``accelerate`` and at the start of every run
(host side, before any model call) it refuses, with what was found and what to do: hooks of other
libraries (diffusers' caches, group offloading, layerwise casting), sequential CPU offload, peft
LoRA layers, a quantized layer replaced or its weights changed since, an attention processor
replaced since. Model CPU offload and device or dtype moves of the whole pipeline are followed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .cache.hooks import CacheLayout, attach_cache
from .cache.store import FeatureCache
from .correction.vc import VC_TABLE, vc_output
from .errors import PlanMismatchError, WorkflowError
from .plan import LayerSpec
from .quant.attention import attach_quant_attention
from .quant.layer import QuantHook, attach_quant_layers
from .runtime.clock import StepClock
from .runtime.denoiser import DenoiserHooks
from .runtime.hooks import PREFIX, foreign_hooks, hold, hooks_in, release, removal_problem
from .runtime.sampler import SchedulerAttachment

SESSION_ATTR = "_cachequant_session"


def session_of(model: nn.Module) -> "Session | None":
    return model.__dict__.get(SESSION_ATTR)


def check_attachable(model: nn.Module) -> None:
    """Refuses model states cachequant cannot run correctly (see the module docstring)."""
    if session_of(model) is not None:
        raise RuntimeError("this pipeline is already accelerated (or being calibrated) by cachequant; "
                           "call cq.restore(pipe) first")
    foreign = foreign_hooks(model)
    if foreign:
        raise WorkflowError(
            f"the model carries hooks of diffusers' own features ({', '.join(foreign[:4])}): a diffusers cache, "
            "group offloading or layerwise casting would act on the same modules as cachequant's cache and "
            "quantization. Remove them first (e.g. model.disable_cache(), or reload the model)")
    _check_offload_and_lora(model)


def _check_offload_and_lora(model: nn.Module, accelerated: bool = False) -> None:
    for name, m in model.named_modules():
        if type(m).__module__.split(".")[0] == "peft":
            raise WorkflowError(
                f"{name} is a peft LoRA layer" + (" loaded after cq.accelerate" if accelerated else "") +
                ": cachequant calibrates and quantizes plain weights. " +
                ("cq.restore(pipe) first, then f" if accelerated else "F") +
                "use the LoRA (pipe.fuse_lora(lora_scale=...); pipe.unload_lora_weights()) and calibrate a plan for "
                "the fused model; a plan detects a different LoRA or scale by its weights fingerprint")
        if name and getattr(m, "_hf_hook", None) is not None:
            raise WorkflowError(
                f"{name} carries an accelerate hook: sequential CPU offload (or a device map) moves each layer's "
                "weights at call time, which cachequant's quantized layers do not follow. Use "
                "pipe.enable_model_cpu_offload() (supported) or keep the model on one device")
    for p in model.parameters():
        if p.device.type == "meta":
            raise WorkflowError("the model has parameters on the 'meta' device (sequential offload or a lazy "
                                "load): cachequant needs materialized weights on one device")


def _weight_probe(modules: list[nn.Module]) -> tuple[list[tuple], torch.Tensor | None]:
    """A few values of every weight, to notice weights changed in place since attaching (a fused
    LoRA, load_state_dict) at the cost of one small transfer per run."""
    ident = [(id(m.weight), m.weight.dtype, m.weight.device) for m in modules]
    vals = [m.weight.detach().reshape(-1)[:: max(1, m.weight.numel() // 8)][:8].float() for m in modules
            if m.weight.numel() and m.weight.device == modules[0].weight.device]
    return ident, torch.cat(vals).cpu() if vals else None


@dataclass
class Session:
    model: nn.Module
    clock: StepClock
    store: FeatureCache
    denoiser_hooks: DenoiserHooks
    planned: list[float] | None
    scheduler_name: str
    num_inference_steps: int
    layers: dict[str, QuantHook] = field(default_factory=dict)
    processors: dict[str, Any] = field(default_factory=dict)
    attachments: list[SchedulerAttachment] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    restorable: str | None = None
    """None, or why :meth:`restore` would leave a broken model (it then raises instead)."""
    guard: bool = True
    """Check the model's state at every run start (off during calibration's own passes)."""
    pipe: Any = None
    """A weak reference to the accelerated pipeline (its scheduler may be swapped later)."""
    planned_sigmas: list[float] | None = None
    """The plan's sigmas, checked at every run start (None: not checked)."""
    _probe: tuple | None = None

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def open(cls, model: nn.Module, timesteps: list[float] | None, full_steps, begin: int, scheduler_name: str,
             num_inference_steps: int, guard: bool = True, sigmas: list[float] | None = None,
             calls_per_step: int | None = 1) -> "Session":
        """A session with a clock and the denoiser hook; ``timesteps=None`` adopts the first run's
        (and its sigmas); ``calls_per_step=None`` accepts and counts any number of model calls per
        position (calibration's first pass learns it)."""
        check_attachable(model)
        clock = StepClock(model, timesteps or [], full_steps, begin, calls_per_step)
        hooks = DenoiserHooks(model, clock)
        sess = cls(model, clock, FeatureCache(), hooks, timesteps, scheduler_name, num_inference_steps, guard=guard,
                   planned_sigmas=None if sigmas is None else list(sigmas))
        hooks.on_call = sess._on_call
        sess.undo += [clock.detach, hooks.remove]
        model.__dict__[SESSION_ATTR] = sess
        return sess

    def add_cache(self, layout: CacheLayout, cache_dec: torch.Tensor | None = None) -> None:
        self.undo.extend(attach_cache(self.model, layout, self.clock, self.store, cache_dec))

    def add_quant(self, specs: list[LayerSpec], act_bits: int, tensors: dict[str, torch.Tensor], backend: Any) -> None:
        hooks, undo = attach_quant_layers(self.model, specs, act_bits, tensors, self.clock, backend)
        self.layers.update(hooks)
        self.undo.extend(undo)

    def add_attention(self, names: list[str], tensors: dict[str, torch.Tensor], bits: int,
                      probs: str = "uniform") -> None:
        procs, undo = attach_quant_attention(self.model, names, tensors, self.clock, bits, probs)
        self.processors.update(procs)
        self.undo.extend(undo)

    def add_vc(self, table: torch.Tensor) -> None:
        device = next(self.model.parameters()).device
        hold(self.model, VC_TABLE, table.to(device))
        self.denoiser_hooks.outputs.append(vc_output(self.clock))
        self.undo.append(lambda: release(self.model, VC_TABLE))

    def attach_scheduler(self, scheduler: Any) -> SchedulerAttachment:
        """Lets ``scheduler`` move this session's clock (a pipeline's own, or another pipeline's
        sharing the model)."""
        if any(a.scheduler is scheduler for a in self.attachments):
            return next(a for a in self.attachments if a.scheduler is scheduler)
        name = type(scheduler).__name__
        if name != self.scheduler_name:
            raise PlanMismatchError(
                f"this plan was calibrated with {self.scheduler_name} ({self.num_inference_steps} steps), but the "
                f"pipeline uses {name}; set that scheduler back or calibrate a plan for {name}")
        att = SchedulerAttachment(scheduler, self.clock, self.planned, self.scheduler_name, self.num_inference_steps,
                                  on_run_start=self.check_state if self.guard else None,
                                  planned_sigmas=self.planned_sigmas)
        self.attachments.append(att)
        return att

    def follow(self, pipe: Any) -> None:
        """Attaches ``pipe``'s scheduler, and any scheduler swapped into ``pipe`` later (at its first
        eager call: same class as the plan's, timesteps checked)."""
        self.pipe = weakref.ref(pipe)
        self.attach_scheduler(pipe.scheduler)

    def _on_call(self, timestep) -> None:
        pipe = self.pipe() if self.pipe is not None else None
        if pipe is None or any(a.scheduler is pipe.scheduler for a in self.attachments):
            return
        self.attach_scheduler(pipe.scheduler).join_run(timestep)

    def arm(self) -> None:
        """Records what the state guard compares against (after everything is attached)."""
        self._probe = _weight_probe([self.model.get_submodule(n) for n in self.layers])

    # -- the state guard -----------------------------------------------------------------------
    def check_state(self) -> None:
        """Host-side checks at the start of a run (see the module docstring)."""
        model = self.model
        foreign = foreign_hooks(model)
        if foreign:
            raise WorkflowError(
                f"hooks of other features were added to the accelerated model ({', '.join(foreign[:4])}): they "
                "would act on the modules cachequant caches or quantizes. Remove them, or cq.restore(pipe) first")
        _check_offload_and_lora(model, accelerated=True)
        mods = []
        for name, hook in self.layers.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                mod = None
            r = getattr(mod, "_diffusers_hook", None)
            if mod is None or r is None or r.hooks.get("cachequant.quant") is not hook:
                raise WorkflowError(
                    f"the quantized layer {name} was replaced after cq.accelerate (a LoRA loaded, "
                    "fuse_qkv_projections, or a module swapped): the plan no longer describes this model. "
                    "cq.restore(pipe), change the model, and calibrate a plan for it")
            mods.append(mod)
        for name, proc in self.processors.items():
            mod = model.get_submodule(name)
            if mod.processor is not proc:
                raise WorkflowError(
                    f"the attention processor of {name} was replaced after cq.accelerate (by "
                    f"{type(mod.processor).__name__}: attention slicing, fused projections, IP-Adapter?), which "
                    "drops the plan's 8-bit attention. cq.restore(pipe), set the processor, then accelerate again "
                    "(with a plan calibrated for it)")
        if self._probe is not None and mods:
            ident, vals = _weight_probe(mods)
            old_ident, old_vals = self._probe
            moved = [a[1:] != b[1:] for a, b in zip(ident, old_ident)]
            same_obj = all(a[0] == b[0] for a, b in zip(ident, old_ident))
            if not same_obj:
                raise WorkflowError("a quantized layer's weight tensor was replaced after cq.accelerate; "
                                    "cq.restore(pipe) and calibrate a plan for the new weights")
            if not any(moved) and vals is not None and not torch.equal(vals, old_vals):
                raise WorkflowError(
                    "the weights of quantized layers changed after cq.accelerate (a fused LoRA, load_state_dict?): "
                    "the plan's ranges no longer fit them. cq.restore(pipe), change the weights, and calibrate a "
                    "plan for them")
            self._probe = (ident, vals)

    # -- taking it off ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Takes everything off, or nothing: what cannot be removed cleanly is found first."""
        if self.restorable is not None:
            raise RuntimeError(f"cannot restore this pipeline: {self.restorable}")
        for mname, hname in hooks_in(self.model):
            if hname.startswith(PREFIX):
                why = removal_problem(self.model.get_submodule(mname), hname)
                if why is not None:
                    raise WorkflowError(f"cannot restore: {why}")
        self.close()

    def close(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()
        for att in self.attachments:
            att.detach()
        self.attachments.clear()
        self.model.__dict__.pop(SESSION_ATTR, None)
        reg = getattr(self.model, "_diffusers_hook", None)
        if reg is not None and hasattr(reg, "invalidate_child_registries_cache"):  # diffusers >= 0.37
            reg.invalidate_child_registries_cache()
