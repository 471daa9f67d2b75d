"""``accelerate`` / ``restore``: applying a plan to a pipeline in place, and undoing it."""

from __future__ import annotations

from typing import Any


from .errors import PlanError
from .models.adapters import adapter_for, denoiser_of
from .plan import Plan
from .quant.apply import install_quant
from .runtime import Runtime
from .session import check_sampler, install_session, session_of


def accelerate(pipe: Any, plan: Plan, backend: str = "auto", keep_float_weights: bool = True,
               kernel_attention: str = "sdpa") -> Any:
    """Applies ``plan`` to ``pipe`` in place; the pipeline is then called exactly as before.

    ``backend`` executes the quantized layers: ``fake`` (float reference, any device), ``int8`` /
    ``fp8`` (fused Triton kernels on a CUDA GPU; attention matmuls then run in fused fp16/bf16
    SDPA), or ``auto`` (``int8`` on a CUDA GPU of compute capability ≥ 8.0, else ``fake``). Layers a
    kernel cannot run keep the reference path; ``kernel_report(pipe)`` lists them.

    ``kernel_attention`` (kernel backends): ``sdpa`` (default) runs attention in fused float SDPA;
    ``8bit`` keeps the plan's 8-bit attention matmuls, so that the kernel path computes what the
    fake-quant reference computes (quality tables at kernel speed).

    ``keep_float_weights=False`` (kernel backends only) frees the float weights of the layers that
    run on a kernel, so that the accelerated model holds 8-bit weights instead of both; the
    pipeline then cannot be restored (``restore`` raises), reload it instead.

    Raises :class:`~cachequant.errors.PlanMismatchError` if the denoiser (class, architecture,
    weights) or the scheduler class differ from the calibrated ones; a different step count is
    caught when the pipeline is called.
    """
    from .kernels.backend import ATTENTION  # no Triton import: the kernels load lazily

    if kernel_attention not in ATTENTION:
        raise ValueError(f"kernel_attention must be one of {', '.join(ATTENTION)}; got {kernel_attention!r}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a cachequant.Plan (from cq.calibrate or cq.load_plan), got {type(plan).__name__}")
    attr, model = denoiser_of(pipe)
    if session_of(model) is not None:
        raise RuntimeError("this pipeline is already accelerated; call cq.restore(pipe) first")
    adapter = adapter_for(model)
    plan.check_model(model)
    check_sampler(plan.meta["sampler"], pipe.scheduler)
    device = next(model.parameters()).device
    cache_dec = None
    if "cache_dec.a" in plan.tensors:
        cache_dec = (plan.tensors["cache_dec.a"].to(device), plan.tensors["cache_dec.b"].to(device))
    schedule = plan.schedule
    T = plan.num_calls
    if not schedule or schedule[0] != 0 or any(s < 0 or s >= T for s in schedule):
        raise PlanError(f"the plan's schedule {schedule[:8]}... is invalid for {T} model calls (damaged plan?)")
    vc = plan.tensors["vc.scale"].to(device) if "vc.scale" in plan.tensors else None
    rt = Runtime(T, frozenset(schedule), cache_dec=cache_dec, vc=vc)
    sess = install_session(pipe, model, adapter, plan.meta["site"], rt, plan.meta["sampler"])
    try:
        q = plan.meta.get("quant")
        if q:
            sess.quant = install_quant(model, rt, q["layers"], q["attention"], q["act_bits"], q["per_step_act"],
                                       search_weights=False)
            sess.quant.load(plan.tensors)
            rt.quant_mode = "quant"
            _enable_backend(sess, model, rt, backend, device, keep_float_weights, kernel_attention)
        elif backend in ("int8", "fp8"):
            raise ValueError(f"backend={backend!r} was asked for, but this plan has no quantization (cache only)")
        elif not keep_float_weights:
            raise ValueError("keep_float_weights=False was asked for, but this plan has no quantization (cache "
                             "only): there are no 8-bit weights to run on")
    except Exception:
        sess.restore()
        raise
    return pipe


def _enable_backend(sess, model, rt, backend: str, device, keep_float_weights: bool = True,
                    kernel_attention: str = "sdpa") -> None:
    from .kernels.backend import disable_kernels, drop_float_weights, enable_kernels, select_backend

    kind = select_backend(backend, device)
    sess.kernel_report = {"backend": "fake", "kernel_layers": 0, "fake_layers": {}}
    if kind == "fake":
        if not keep_float_weights:
            raise ValueError(f"keep_float_weights=False needs a kernel backend (int8 / fp8), but backend={backend!r} "
                             f"runs the fake-quant reference here (device {device}), which computes from the float "
                             "weights")
        return
    report = enable_kernels(model, sess.quant.layers, rt, kind, attention=kernel_attention)
    sess.undo.append(lambda: disable_kernels(sess.quant.layers, rt))
    sess.undo.extend(report.pop("undo"))
    if not keep_float_weights:
        report["float_weight_bytes_dropped"] = drop_float_weights(sess.quant.layers)
        sess.restorable = ("the float weights of the kernel layers were dropped (accelerate(..., "
                           "keep_float_weights=False)); reload the pipeline instead of restoring it")
    sess.kernel_report = report


def kernel_report(pipe: Any) -> dict:
    """Which backend runs the quantized layers, and the layers left on the reference path (why)."""
    _, model = denoiser_of(pipe)
    sess = session_of(model)
    if sess is None:
        raise RuntimeError("this pipeline is not accelerated by cachequant")
    rep = dict(sess.kernel_report or {"backend": "none (no quantization)", "kernel_layers": 0, "fake_layers": {}})
    if sess.quant is not None:
        from .kernels.backend import weight_bytes

        rep.update(weight_bytes(sess.quant.layers))
    return rep


def restore(pipe: Any) -> Any:
    """Removes cachequant from ``pipe``: the original modules, forward and scheduler come back."""
    _, model = denoiser_of(pipe)
    sess = session_of(model)
    if sess is None:
        raise RuntimeError("this pipeline is not accelerated by cachequant (nothing to restore)")
    sess.restore()
    return pipe


def reset_steps(pipe: Any) -> None:
    """Resets the step counter, for code that drives the denoiser without ``scheduler.set_timesteps``."""
    _, model = denoiser_of(pipe)
    sess = session_of(model)
    if sess is None:
        raise RuntimeError("this pipeline is not accelerated by cachequant")
    sess.runtime.reset()


def is_accelerated(pipe: Any) -> bool:
    return session_of(denoiser_of(pipe)[1]) is not None


__all__ = ["accelerate", "restore", "reset_steps", "is_accelerated", "kernel_report"]
