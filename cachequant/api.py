"""Applying a plan to a pipeline in place, and undoing it: ``accelerate``, ``restore`` and friends."""

from __future__ import annotations

from typing import Any

from torch import nn

from .backends.options import KernelOptions
from .backends.registry import make_backend, select_backend
from .errors import PlanMismatchError, WorkflowError
from .models.adapters import adapter_for
from .pipecall import denoiser_of
from .plan import Plan
from .quant.specs import attention_support
from .session import Session, check_attachable, session_of


def accelerate(pipe: Any, plan: Plan, options: KernelOptions | None = None, **option_fields) -> Any:
    """Applies ``plan`` to ``pipe`` in place; the pipeline is then called exactly as before.

    ``options`` (:class:`~cachequant.backends.KernelOptions`, or its fields as keywords, e.g.
    ``backend="int8"``) say how the quantized layers execute: ``backend`` ``fake`` (the float
    reference, any device), ``int8`` / ``fp8`` (Triton kernels on a CUDA GPU; attention matmuls then
    run in fused SDPA unless ``attention="8bit"``), or ``auto`` (``fp8`` on a CUDA GPU of compute
    capability ≥ 8.9, ``int8`` from 8.0, with each layer timed against its float op at its first
    eager call and the faster kept; else ``fake``). Layers a kernel cannot run keep the reference
    path; ``kernel_report(pipe)`` lists them, and the layers tuning left in float. ``keep_float_weights=False`` frees the float weights of the
    kernel layers (8-bit weights only in memory); the pipeline then cannot be restored or saved.

    Raises :class:`~cachequant.errors.PlanMismatchError` if the denoiser (class, architecture, dtype,
    weights) or the scheduler class differ from the calibrated ones (a different step count,
    timesteps, strength or number of model calls per step — another guidance_scale — is caught
    when the pipeline runs), and
    :class:`~cachequant.errors.WorkflowError` for model states cachequant cannot run correctly.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a cachequant.Plan (from cq.calibrate or cq.load_plan), got {type(plan).__name__}")
    if options is not None and option_fields:
        raise TypeError("give KernelOptions or its fields as keywords, not both")
    if options is not None and not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a cachequant.KernelOptions, got {type(options).__name__}")
    options = (options or KernelOptions(**option_fields)).resolved()
    _, model = denoiser_of(pipe)
    adapter = adapter_for(model)
    check_attachable(model)
    plan.fingerprint.check(model)
    if type(pipe.scheduler).__name__ != plan.sampler.scheduler:
        raise PlanMismatchError(
            f"this plan was calibrated with {plan.sampler.scheduler} ({plan.sampler.num_inference_steps} steps), but "
            f"the pipeline uses {type(pipe.scheduler).__name__}; set that scheduler back or calibrate a plan for it")
    device = next(model.parameters()).device
    if plan.quant is None:
        if options.backend in ("int8", "fp8"):
            raise ValueError(f"backend={options.backend!r} was asked for, but this plan has no quantization (cache only)")
        if not options.keep_float_weights:
            raise ValueError("keep_float_weights=False was asked for, but this plan has no quantization (cache only): "
                             "there are no 8-bit weights to run on")
    backend = select_backend(options, device) if plan.quant is not None else None
    if backend is not None and backend.name == "fake" and not options.keep_float_weights:
        raise ValueError(f"keep_float_weights=False needs a kernel backend (int8 / fp8), but backend="
                         f"{options.backend!r} runs the float reference here (device {device}), which computes "
                         "from the float weights")
    sess = Session.open(model, list(plan.sampler.timesteps), plan.cache.schedule, plan.sampler.begin,
                        plan.sampler.scheduler, plan.sampler.num_inference_steps, sigmas=plan.sampler.sigmas,
                        calls_per_step=plan.sampler.calls_per_step)
    try:
        if plan.cache.kind != "none":
            sess.add_cache(adapter.layout(model, plan.cache.site), plan.tensors.get("cache_dec"))
        if plan.quant is not None:
            _add_quant(sess, plan, backend, options)
        if plan.vc:
            sess.add_vc(plan.tensors["vc"])
        sess.follow(pipe)
        sess.arm()
    except BaseException:
        sess.close()
        raise
    return pipe


def _add_quant(sess: Session, plan: Plan, backend, options: KernelOptions) -> None:
    q = plan.quant
    model = sess.model
    reference = make_backend("fake", options)
    sess.add_quant(list(q.layers), q.act_bits, plan.tensors, reference)
    report: dict = {"backend": backend.name, "kernel_layers": 0, "fake_layers": {}}
    if backend.name != "fake":
        on = []
        for name, hook in sess.layers.items():
            module = model.get_submodule(name)
            reason = backend.unsupported(module, hook)
            if reason is not None:
                report["fake_layers"][name] = reason
                continue
            backend.prepare(module, hook)
            hook.backend = backend
            on.append((module, hook))

        def unpack(on=on):
            for module, hook in on:
                hook.backend = reference
                backend.release(module)
        sess.undo.append(unpack)
        sess.undo.extend(backend.prepare_model(model, any(isinstance(m, nn.Conv2d) for m, _ in on)))
        if hasattr(backend, "group_layers"):  # optional: backends that share work between layers
            sess.undo.extend(backend.group_layers(model, on))
        report.update(kernel_layers=len(on), attention=options.attention,
                      cublaslt_layers=sum(h.pack.gemm == "cublaslt" for _, h in on),
                      shared_quantize=sorted({g.label for g in getattr(backend, "shared", {}).values()}))
        if not options.keep_float_weights:
            report["float_weight_bytes_dropped"] = _drop_float_weights(sess, [m for m, _ in on])
    sess.report = report
    if q.attention and (backend.name == "fake" or options.attention == "8bit"):
        for name in q.attention:
            module = model.get_submodule(name)
            if attention_support(module) is not None:
                proc = type(module.processor).__name__
                raise WorkflowError(
                    f"the plan quantizes the attention matmuls of {name}, whose processor is now {proc} (attention "
                    "slicing, IP-Adapter, a custom processor?): set the default processor back "
                    "(model.set_default_attn_processor()), or calibrate a plan with this processor")
        sess.add_attention(list(q.attention), plan.tensors, q.act_bits, plan.config.attention_probs)


def _drop_float_weights(sess: Session, modules: list[nn.Module]) -> int:
    """Frees the float weights of the kernel layers (the packed 8-bit copy is all the kernel reads)
    and returns the bytes freed. Without this a W8A8 model holds fp16 *and* 8-bit weights. The
    price: the pipeline can neither be restored nor saved afterwards."""
    freed = 0
    for module in modules:
        w = module.weight
        freed += w.numel() * w.element_size()
        module.weight = nn.Parameter(w.detach().new_empty(0), requires_grad=False)
    why = ("the float weights of the kernel layers were dropped (keep_float_weights=False); reload the "
           "pipeline instead")
    sess.restorable = why

    def refuse(*_args, **_kwargs):
        raise WorkflowError(f"cannot save or read this model's state_dict: {why}")
    sess.model.register_state_dict_pre_hook(refuse)
    return freed


def _session(pipe: Any) -> Session:
    sess = session_of(denoiser_of(pipe)[1])
    if sess is None:
        raise RuntimeError("this pipeline is not accelerated by cachequant (call cq.accelerate(pipe, plan) first)")
    return sess


def restore(pipe: Any) -> Any:
    """Removes cachequant from ``pipe``: the original modules, processors and scheduler come back,
    bit for bit; hooks and processors other code installed since are left in place."""
    _session(pipe).restore()
    return pipe


def attach(pipe: Any) -> Any:
    """Lets another scheduler drive an accelerated model: a scheduler swapped into ``pipe`` after
    ``accelerate``, or the scheduler of a second pipeline sharing the model (``from_pipe``). Its
    class and timesteps must match the plan's."""
    _session(pipe).attach_scheduler(pipe.scheduler)
    return pipe


def set_step(pipe: Any, position: int) -> None:
    """Places the next model call at ``position`` of the plan (code that drives the denoiser itself,
    without the scheduler). With a plan of several calls per step (``plan.sampler.calls_per_step``),
    place each step once and make all its calls after it, in the calibrated order."""
    _session(pipe).clock.set(int(position))


def is_accelerated(pipe: Any) -> bool:
    return session_of(denoiser_of(pipe)[1]) is not None


def kernel_report(pipe: Any) -> dict:
    """Which backend runs the quantized layers, the layers left on the reference path (why), the
    weight bytes held (packed 8-bit copies and float originals), and with per-layer tuning, the
    layers measured so far (``tuned_layers``) and those that run their float op (``float_layers``,
    with both timings: tuning happens on each layer's first eager call at a new input shape; and
    ``float_layers_compiled``, those that run it under torch.compile). Layers that share one
    quantize pass with their siblings (``shared_quantize``) are decided as a group in eager code:
    their ``float_layers`` entries give the group's timings and key."""
    from .backends.pack import PACK

    sess = _session(pipe)
    rep = dict(sess.report or {"backend": "none (no quantization)", "kernel_layers": 0, "fake_layers": {}})
    packed = floats = 0
    for name in sess.layers:
        m = sess.model.get_submodule(name)
        w8 = m._buffers.get(PACK + "w")
        packed += 0 if w8 is None else w8.numel() * w8.element_size()
        floats += m.weight.numel() * m.weight.element_size()
    rep.update(packed_weight_bytes=packed, float_weight_bytes=floats)
    tuners = {name: getattr(hook.backend, "tuner", None) for name, hook in sess.layers.items()}
    if any(t is not None for t in tuners.values()):
        measured = {name: t.layers[name] for name, t in tuners.items() if t is not None and name in t.layers}
        rep["tuned_layers"] = len(measured)
        rep["float_layers"] = {name: f"its float op is faster: {r['float_us']} µs vs {r['kernel_us']} µs 8-bit "
                                     f"({r['key']})" for name, r in measured.items() if r["choice"] == "float"}
        # under torch.compile the quantize fuses into the input's producer and the decision is the
        # 8-bit GEMM alone against the float op (LayerTuner.lookup(compiled=True))
        # (a layer that shares its quantize with its siblings in eager code runs alone there: "alone")
        alone = {name: r.get("alone", r) for name, r in measured.items()}
        rep["float_layers_compiled"] = {
            name: f"its float op is faster: {r['float_us']} µs vs {r.get('gemm_us', r['kernel_us'])} µs 8-bit GEMM "
                  f"({r['key']})" for name, r in alone.items() if r.get("compiled_choice", r["choice"]) == "float"}
    return rep


def enable_cuda_graphs(pipe: Any) -> None:
    """Replays the accelerated denoiser's calls as CUDA graphs, one per (full / cached, input shapes);
    undone by ``cq.restore``."""
    from .backends.graphs import GRAPH_HOOK, CudaGraphHook
    from .runtime.hooks import add_hook, remove_hook

    sess = _session(pipe)
    device = next(sess.model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need the model on a CUDA GPU; it is on {device}")
    if getattr(sess.model, "_hf_hook", None) is not None:
        raise WorkflowError("CUDA graphs replay fixed device memory, and CPU offload moves the model every run: "
                            "disable offloading (pipe.remove_all_hooks(); pipe.to('cuda')) to use them")
    hook = CudaGraphHook(sess.clock, sess.store, device)
    add_hook(sess.model, hook, GRAPH_HOOK)
    sess.undo.append(lambda: remove_hook(sess.model, GRAPH_HOOK))


__all__ = ["accelerate", "attach", "enable_cuda_graphs", "is_accelerated", "kernel_report", "restore", "set_step"]
