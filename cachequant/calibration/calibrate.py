"""``calibrate``: from a pipeline and a config to a :class:`~cachequant.plan.Plan`.

A short driver of named passes (:mod:`cachequant.calibration.passes`): trajectories → schedule
and cache-DEC → activation ranges → quantization-DEC → variance compensation. The sampler is
whatever the pipeline's scheduler does for the given arguments: its timesteps, custom ``sigmas=``
or ``timesteps=`` and image-to-image strength (through ``pipeline_kwargs``) are recorded in the
plan from the calibration runs themselves.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..config import CacheQuantConfig
from ..models.adapters import adapter_for
from ..pipecall import conditioning, denoiser_of
from ..plan import CacheSpec, Fingerprint, Plan, QuantSpec, SamplerSpec
from ..quant.specs import check_layer_patterns
from ..session import check_attachable
from ..version import __version__
from . import passes
from .inputs import batches, calibration_inputs, quiet


def calibrate(pipe: Any, config: CacheQuantConfig, num_inference_steps: int, prompts: Sequence[str] | None = None,
              class_labels: Sequence[int] | None = None, *, num_samples: int | None = None,
              pipeline_kwargs: dict | None = None, progress: bool = True) -> Plan:
    """Calibrates ``config`` on ``pipe`` for runs of ``num_inference_steps`` with its current
    scheduler. ``pipeline_kwargs`` go to every pipeline call (e.g. ``image=`` and ``strength=`` for
    image-to-image, ``sigmas=``, ``guidance_scale=``); the plan then applies to runs with the same
    sampler positions and the same model calls per step (a pipeline that runs guidance as separate
    calls, such as ``WanPipeline`` with ``guidance_scale > 1``, makes two: calibrate with the
    guidance you run)."""
    if not isinstance(config, CacheQuantConfig):
        raise TypeError(f"config must be a cachequant.CacheQuantConfig, got {type(config).__name__}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    attr, model = denoiser_of(pipe)
    adapter = adapter_for(model)
    check_attachable(model)
    if config.quantize:  # a typo in a layer pattern fails before any work
        check_layer_patterns(model, {"w8_layers": config.w8_layers, "float_layers": config.float_layers})
    cached = config.interval > 1
    site = adapter.resolve_site(model, config) if cached else {}
    items = calibration_inputs(pipe, prompts, class_labels, num_samples or config.num_calib_samples)
    fingerprint = Fingerprint.of(model)
    need_features = cached and (config.schedule == "dps" or config.use_cache_dec)
    feature_batches = batches(items, config.calib_batch_size, config.dps_samples) if need_features or config.vc \
        else [items[:1]]  # one trajectory is enough to read the sampler's positions
    n_all = len(batches(items, config.calib_batch_size))
    quant_dps = cached and config.dps_cost == "quant"
    total = len(feature_batches) + (n_all * (2 if config.use_quant_dec and cached else 1) if config.quantize else 0) \
        + (2 * len(feature_batches) if config.use_cache_dec and config.cache_dec_fit == "closed" else 0) \
        + (n_all + len(feature_batches) if quant_dps else 0) \
        + (len(feature_batches) if config.vc and config.vc_fit == "closed" else 0)
    with quiet(pipe), tqdm(total=total, desc="cachequant calibrate", disable=not progress) as bar:
        cal = passes.Calibration(pipe, model, adapter, config, num_inference_steps, items, dict(pipeline_kwargs or {}),
                                 adapter.layout(model, site) if cached else None, site, bar)
        bar.set_description("cachequant calibrate: full-precision trajectories")
        features, logs = passes.trajectories(cal, feature_batches,
                                              log_calls=(config.vc and config.vc_fit == "open") or quant_dps)
        specs, attn, consumers = passes.quant_specs(cal) if config.quantize else ([], [], {})
        source = None
        if quant_dps:
            bar.set_description("cachequant calibrate: quantized features for DPS")
            source = passes.quantized_features(cal, specs, attn, logs)
        bar.set_description("cachequant calibrate: schedule")
        schedule, cache_dec = passes.schedule_and_cache_dec(cal, features, source)
        del features, source
        tensors: dict[str, torch.Tensor] = {}
        if cache_dec is not None:
            tensors["cache_dec"] = cache_dec
        quant = None
        if config.quantize:
            bar.set_description("cachequant calibrate: activation ranges")
            specs = passes.activation_ranges(cal, schedule, cache_dec, specs, attn, tensors)
        if cache_dec is not None and config.cache_dec_fit == "closed":
            bar.set_description("cachequant calibrate: closed-loop cache DEC")
            cache_dec = tensors["cache_dec"] = passes.closed_loop_cache_dec(cal, schedule, cache_dec, specs, attn,
                                                                            tensors, feature_batches)
        if config.quantize:
            consumers = {k: v for k, v in consumers.items() if any(s.name == k for s in specs)}
            if consumers:
                bar.set_description("cachequant calibrate: quantization DEC")
                passes.quant_dec(cal, schedule, cache_dec, specs, attn, consumers, tensors)
            specs = [s if s.name in consumers else type(s)(s.name, s.weight_bits, s.split, False) for s in specs]
            quant = QuantSpec(config.act_bits, config.per_step_act, config.weight_rounding, tuple(specs), tuple(attn))
        if config.vc:
            bar.set_description("cachequant calibrate: variance compensation")
            sess = passes.accelerated_session(cal, schedule, cache_dec, specs, attn, tensors) if config.quantize \
                else cal.session(schedule, cache_dec)
            if config.vc_fit == "closed":
                tensors["vc"] = passes.closed_loop_variance_compensation(cal, sess, feature_batches)
            else:
                try:
                    tensors["vc"] = passes.variance_compensation(cal, sess, logs)
                finally:
                    sess.close()
    sampler = SamplerSpec(type(pipe.scheduler).__name__, num_inference_steps, tuple(cal.timesteps), cal.begin,
                          None if cal.sigmas is None else tuple(cal.sigmas), cal.calls_per_step)
    cache = CacheSpec(adapter.cache_kind if cached else "none", site, tuple(schedule))
    info = {"pipeline": type(pipe).__name__, "denoiser_attr": attr, "adapter": adapter.name,
            "cachequant_version": __version__, "torch_version": torch.__version__,
            "calibration": {"inputs": conditioning(pipe), "trajectories": len(items), "feature_trajectories": sum(len(b) for b in feature_batches),
                            "pipeline_kwargs": {k: repr(v)[:200] for k, v in cal.pipeline_kwargs.items()}}}
    return Plan(config, sampler, cache, quant, config.vc, fingerprint, {k: v.cpu() for k, v in tensors.items()},
                cal.diagnostics, info)
