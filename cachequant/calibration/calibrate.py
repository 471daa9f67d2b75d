"""``calibrate``: from a pipeline and a config to a :class:`~cachequant.plan.Plan`.

Order of work (each pass is a set of ordinary pipeline runs with hooks installed):

1. *Features* — full precision, no cache, ``dps_samples`` trajectories: the cached feature at every
   model call. They give the DPS costs and the open-loop cache-DEC fit.
2. *Schedule* — uniform / quadratic / DPS over those features.
3. *Ranges* (if quantizing) — the cached model (schedule + cache-DEC, full precision) runs every
   calibration trajectory while each quantizer records a per-step activation range: the ranges
   see exactly what the accelerated model sees, stale cache included.
4. *Quantization DEC* — the cached, quantized model runs the trajectories again while the layers
   that first consume the cached feature accumulate the least-squares statistics of Eq. 9.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..cache.schedules import make_schedule
from ..config import CacheQuantConfig
from ..correction import QuantDecStats, fit_cache_dec, relative_reuse_error
from ..models.adapters import adapter_for, denoiser_of
from ..plan import FORMAT, FORMAT_VERSION, Plan, fingerprint
from ..quant.apply import attention_names, install_quant, layer_specs
from ..runtime import Runtime
from ..session import install_session, probe_sampler, session_of
from ..distributed import broadcast, gather, merge_by_index, mine, rank_world
from .inputs import make_inputs, quiet, run_batch


def _runs(pipe, inputs, batches, num_inference_steps, seed, pipeline_kwargs, bar, on_end=None, rt=None):
    """Runs this rank's share of ``batches`` (global batch b is seeded ``seed + b``)."""
    for i, batch in mine(batches):
        if rt is not None:
            rt.batch = i
        run_batch(pipe, inputs.kind, batch, num_inference_steps, seed + i, pipeline_kwargs)
        if on_end is not None:
            on_end(i)
        bar.update(1)


def calibrate(pipe: Any, config: CacheQuantConfig, num_inference_steps: int, prompts: Sequence[str] | None = None,
              class_labels: Sequence[int] | None = None, *, num_samples: int | None = None,
              pipeline_kwargs: dict | None = None, progress: bool = True) -> Plan:
    """Calibrates ``config`` on ``pipe`` for runs of ``num_inference_steps`` with its current scheduler."""
    if not isinstance(config, CacheQuantConfig):
        raise TypeError(f"config must be a cachequant.CacheQuantConfig, got {type(config).__name__}")
    attr, model = denoiser_of(pipe)
    adapter = adapter_for(model)
    if session_of(model) is not None:
        raise RuntimeError("this pipeline is already accelerated; call cq.restore(pipe) before calibrating")
    site = adapter.resolve_site(model, config)
    sampler = probe_sampler(pipe.scheduler, num_inference_steps)
    T = sampler["num_calls"]
    inputs = make_inputs(pipe, prompts, class_labels, num_samples or config.num_calib_samples)
    pipeline_kwargs = dict(pipeline_kwargs or {})
    fp = fingerprint(model)
    rank, world = rank_world()
    bs = config.calib_batch_size
    cached = config.interval > 1
    need_features = (cached and (config.schedule == "dps" or config.use_cache_dec)) or config.vc
    feature_batches = inputs.batches(bs, limit=config.dps_samples) if need_features else []
    all_batches = inputs.batches(bs) if config.quantize else []
    n_passes = len(feature_batches) + len(all_batches) * (2 if config.use_quant_dec else 1) + (1 if config.vc else 0)
    meta_diag: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    features = None
    device = next(model.parameters()).device

    with quiet(pipe), tqdm(total=n_passes, desc="cachequant calibrate", disable=not progress or n_passes == 0) as bar:
        # 1. features of the uncached full-precision trajectory
        if need_features:
            rt = Runtime(T, frozenset(range(T)), recorder=[], call_log=[] if config.vc else None)
            runs: dict[int, list[torch.Tensor]] = {}
            fp_log: dict[int, list] = {}
            sess = install_session(pipe, model, adapter, site, rt, sampler)
            try:
                def take(i):
                    if len(rt.recorder) != T:
                        raise RuntimeError(f"expected {T} model calls in one run, saw {len(rt.recorder)}")
                    runs[i] = list(rt.recorder)
                    rt.recorder.clear()
                    if rt.call_log is not None:
                        fp_log[i] = list(rt.call_log)
                        rt.call_log.clear()
                _runs(pipe, inputs, feature_batches, num_inference_steps, config.seed, pipeline_kwargs, bar, take)
            finally:
                sess.restore()
            parts = gather(runs)
            if rank == 0:
                ordered = merge_by_index(parts)
                features = [torch.cat([r[t] for r in ordered], dim=0) for t in range(T)]

        # 2. schedule
        schedule, cache_dec = None, None
        if rank == 0:
            kind = config.schedule if cached else "uniform"
            schedule = make_schedule(kind, T, config.interval, features if kind == "dps" else None)
            if cached and features is not None:
                # in-sample, on the calibration trajectories: how stale the reused feature is (a large
                # value that DEC does not shrink, e.g. DDPM's fresh noise per step, predicts a quality loss)
                before = relative_reuse_error(features, schedule)
                meta_diag["cache_reuse"] = {"relative_l1": before["relative_l1"]}
                if config.use_cache_dec:
                    cache_dec = fit_cache_dec(features, schedule, adapter.channel_dim, slope=config.cache_dec_slope)
                    after = relative_reuse_error(features, schedule, cache_dec, adapter.channel_dim)
                    meta_diag["cache_reuse"]["relative_l1_after_cache_dec"] = after["relative_l1"]
                    meta_diag["cache_dec_fit"] = {"l1_before": before["mean_l1"], "l1_after": after["mean_l1"],
                                                  "cached_steps": before["cached_steps"]}
        del features
        schedule, cache_dec = broadcast((schedule, cache_dec))
        tensors["schedule"] = torch.tensor(schedule, dtype=torch.int64)
        if cache_dec is not None:
            tensors["cache_dec.a"], tensors["cache_dec.b"] = cache_dec

        # 3./4. quantization
        quant_meta = None
        if config.quantize:
            specs = layer_specs(model, config.weight_bits, adapter.keep_8bit(model), adapter.concat_splits(model, site),
                                config.w8_layers)
            attn = attention_names(model) if config.quant_attention else []
            dec_dev = None if cache_dec is None else tuple(x.to(device) for x in cache_dec)
            rt = Runtime(T, frozenset(schedule), cache_dec=dec_dev, quant_mode="observe")
            sess = install_session(pipe, model, adapter, site, rt, sampler)
            try:
                qs = install_quant(model, rt, specs, attn, config.act_bits, config.per_step_act, search_weights=True)
                sess.quant = qs
                hessians = _attach_hessians(qs, config) if config.weight_rounding == "gptq" else None
                try:
                    if config.calibration == "trajectory":
                        _runs(pipe, inputs, all_batches, num_inference_steps, config.seed + 10_000, pipeline_kwargs,
                              bar, rt=rt)
                    else:
                        meta_diag["calibration_selection"] = _select_and_observe(
                            pipe, inputs, all_batches, num_inference_steps, config, pipeline_kwargs, bar, sess, device)
                finally:
                    for h in (hessians or {}).get("hooks", []):
                        h.remove()
                if hessians is not None:
                    meta_diag["gptq"] = _apply_gptq(qs, hessians["acc"])
                _finalize_ranges(qs, fill_nearest=config.calibration != "trajectory")
                consumers = adapter.cache_consumers(model, site) if config.use_quant_dec else {}
                if consumers:
                    rt.quant_mode = "quant"
                    stats, hooks = _attach_quant_dec(qs, consumers, rt)
                    try:
                        _runs(pipe, inputs, all_batches, num_inference_steps, config.seed + 10_000,
                              pipeline_kwargs, bar, rt=rt)
                    finally:
                        for h in hooks:
                            h.remove()
                    parts = gather(stats)
                    fits, coeffs = {}, {}
                    if rank == 0:
                        for name in consumers:
                            st = _sum_in_order([p[name] for p in parts])
                            a, b = st.solve()
                            coeffs[name] = (a, b)
                            before, after = st.residual(a, b)
                            fits[name] = {"mse_before": before, "mse_after": after}
                        meta_diag["quant_dec_fit"] = fits
                    for name, (a, b) in broadcast(coeffs).items():
                        qs.layers[name].dec_a, qs.layers[name].dec_b = a.to(device), b.to(device)
                tensors.update(qs.export())
                if config.vc:
                    rt.quant_mode = "quant"
                    tensors["vc.scale"] = _fit_vc(sess, model, fp_log, T, config, device, meta_diag)
                    bar.update(1)
            finally:
                sess.restore()
            quant_meta = {"layers": specs, "attention": attn, "act_bits": config.act_bits,
                          "per_step_act": config.per_step_act, "dec_layers": sorted(consumers)}

    if config.vc and not config.quantize:
        rt = Runtime(T, frozenset(schedule), cache_dec=None if cache_dec is None else tuple(x.to(device) for x in cache_dec))
        sess = install_session(pipe, model, adapter, site, rt, sampler)
        try:
            tensors["vc.scale"] = _fit_vc(sess, model, fp_log, T, config, device, meta_diag)
        finally:
            sess.restore()

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "cachequant_version": __version__,
        "pipeline": type(pipe).__name__, "denoiser_attr": attr, "adapter": adapter.name,
        "config": config.to_dict(), "schedule": schedule, "sampler": sampler, "model": fp, "site": site,
        "quant": quant_meta, "calibration": {"inputs": inputs.kind, "num_trajectories": len(inputs.items),
                                             "feature_trajectories": sum(len(b) for b in feature_batches),
                                             "pipeline_kwargs": {k: repr(v) for k, v in pipeline_kwargs.items()}},
        "diagnostics": meta_diag, "torch_version": torch.__version__,
    }
    meta, tensors = broadcast((meta, {k: v.cpu() for k, v in tensors.items()}) if rank == 0 else None)
    return Plan(meta, tensors)


_GPTQ_MAX_BYTES = 8 << 30


def _attach_hessians(qs, config) -> dict:
    """Accumulates every quantized layer's input Hessian (X Xᵀ) during the observe runs, for GPTQ.
    H is K × K per layer (K = input channels × kernel taps), kept in float64 on the layer's device;
    a model whose Hessians together exceed 8 GiB is refused rather than run out of memory."""
    from ..quant.gptq import HessianAccumulator

    need = sum(layer.inner.weight[0].numel() ** 2 * 8 for layer in qs.layers.values())
    if need > _GPTQ_MAX_BYTES:
        raise ValueError(f"weight_rounding='gptq' would hold {need / 2**30:.1f} GiB of input Hessians for this model "
                         f"(limit {_GPTQ_MAX_BYTES / 2**30:.0f} GiB); use weight_rounding='nearest'")
    acc, hooks = {}, []
    for i, (name, layer) in enumerate(qs.layers.items()):
        acc[name] = HessianAccumulator(layer.inner, seed=config.seed * 7919 + i)
        hooks.append(layer.inner.register_forward_pre_hook(lambda mod, a, a_=acc[name]: a_.add(a[0])))
    return {"acc": acc, "hooks": hooks}


def _apply_gptq(qs, acc: dict) -> dict:
    """GPTQ codes for every quantized layer, on the grid its range search chose (rank 0 sums the
    ranks' Hessians, then shares the codes). Returns a diagnostic: the mean relative output error
    ‖(W − Ŵ)X‖ / ‖WX‖ estimated through H, nearest vs GPTQ, over the layers."""
    from ..quant.gptq import gptq_codes, hessian_from
    from ..quant.quantizer import fake_quant

    parts = gather({name: (a.h.cpu(), a.n) for name, a in acc.items()})
    codes, diag = None, None
    if rank_world()[0] == 0:
        codes, before, after = {}, [], []
        for name, layer in qs.layers.items():
            h = sum(p[name][0] for p in parts)
            n = sum(p[name][1] for p in parts)
            if n == 0:
                continue  # never ran (e.g. a deep layer on cached steps only): keeps nearest rounding
            h = hessian_from(h, n).to(layer.w_scale.device)
            w = layer.inner.weight.detach()
            codes[name] = gptq_codes(w, h, layer.w_scale, layer.w_zero_point, layer.weight_bits)
            q = (codes[name].double() - layer.w_zero_point.double()) * layer.w_scale.double()
            w2 = w.reshape(w.shape[0], -1).double()
            ref = torch.einsum("ok,kl,ol->", w2, h.double(), w2).clamp_min(1e-30)
            for d, out in ((fake_quant(w.float(), layer.w_scale, layer.w_zero_point, layer.weight_bits), before),
                           (q, after)):
                e = (w.double() - d.double()).reshape(w.shape[0], -1)
                out.append(float(torch.sqrt(torch.einsum("ok,kl,ol->", e, h.double(), e) / ref)))
        diag = {"layers": len(codes), "rel_output_error_nearest": sum(before) / max(len(before), 1),
                "rel_output_error_gptq": sum(after) / max(len(after), 1)}
    codes, diag = broadcast((codes, diag))
    for name, c in codes.items():
        qs.layers[name].set_weight_codes(c.to(torch.uint8))
    return diag


def _finalize_ranges(qs, fill_nearest: bool) -> None:
    """Rank 0 combines every rank's per-batch ranges (in batch order) and shares the result."""
    hist = {key: q.history for key, q in qs.act_quantizers()}
    parts = gather(hist)
    exported = None
    if rank_world()[0] == 0:
        for key, q in qs.act_quantizers():
            q.history = [h for p in parts for h in p[key]]
        qs.finalize(fill_nearest)
        exported = {k: v for k, v in qs.export().items() if k.startswith(("act.", "attn."))}
    exported = broadcast(exported)
    if rank_world()[0] != 0:
        for key, q in qs.act_quantizers():
            q.history = []
            q.scale.copy_(exported[f"{key}.scale"].to(q.scale))
            q.zero_point.copy_(exported[f"{key}.zero_point"].to(q.zero_point))
            q.seen.copy_(exported[f"{key}.seen"].to(q.seen))


def _sum_in_order(per_rank: list[dict]):
    """Per-batch statistics objects from all ranks, accumulated in global batch order."""
    items = sorted(((i, st) for d in per_rank for i, st in d.items()), key=lambda x: x[0])
    total = items[0][1]
    for _, st in items[1:]:
        total.add(st)
    return total


def _select_and_observe(pipe, inputs, batches, num_inference_steps, config, pipeline_kwargs, bar, sess, device):
    """Logs the cached trajectories (full precision), selects `calib_select` entries by the
    configured method, and replays only those with the quantizers observing."""
    import time

    from .pool import build_pool, replay_observe
    from .select import select

    if rank_world()[1] > 1:
        raise ValueError(f"calibration={config.calibration!r} selects from a pool on one process; run it without "
                         "torchrun (the 'trajectory' calibration is the one that spreads over processes)")
    rt = sess.runtime
    rt.quant_mode, rt.call_log = "off", []
    try:
        _runs(pipe, inputs, batches, num_inference_steps, config.seed + 10_000, pipeline_kwargs, bar)
        log = rt.call_log
    finally:
        rt.call_log = None
    pool = build_pool(log, [len(b) for b in batches], rt.num_calls)
    t = time.time()
    info: dict = {}
    chosen = select(config.calibration, pool.features, pool.steps, config.calib_select, lam=config.tap_lambda,
                    seed=config.seed, clusters=config.tap_clusters, info=info)
    t_sel = time.time() - t
    per_step = replay_observe(sess, pool, chosen, device)
    rt.quant_mode = "observe"
    return {"method": config.calibration, "pool": len(pool.entries), "selected": int(len(chosen)),
            "selection_seconds": t_sel, **info, "per_step": {str(k): v for k, v in sorted(per_step.items())},
            "selected_entries": [int(i) for i in chosen]}


def _fit_vc(sess, model, fp_log: dict, T, config, device, meta_diag) -> torch.Tensor:
    """Variance compensation from the logged full-precision runs (teacher-forced replay), one
    statistics object per batch, combined on rank 0 in batch order."""
    from ..correction.vc import VCStats
    from .pool import replay_vc_stats

    channels = int(model.config.in_channels)
    stats = {}
    for i, log in fp_log.items():
        stats[i] = VCStats(T, channels, gamma=config.vc_gamma)
        replay_vc_stats(sess, log, T, device, stats[i])
    parts = gather(stats)
    scale = None
    if rank_world()[0] == 0:
        scale = _sum_in_order(parts).solve()
        meta_diag["vc"] = {"min": float(scale.min()), "max": float(scale.max()),
                           "batches": sum(len(p) for p in parts)}
    return broadcast(scale)


def _attach_quant_dec(qs, consumers: dict[str, int], rt: Runtime):
    """Forward pre-hooks accumulating the DEC statistics per consumer layer and per batch."""
    stats: dict[str, dict[int, QuantDecStats]] = {}
    hooks = []
    for name, c in consumers.items():
        layer = qs.layers[name]
        per_batch = stats[name] = {}

        def pre(mod, inp, per_batch=per_batch, c=c):
            x = inp[0]
            xq = mod.quantize_input(x, rt.step)
            target = mod.linear_op(x[:, :c], mod.inner.weight[:, :c], None)
            pred = mod.linear_op(xq[:, :c], mod.dequantized_weight()[:, :c], None)
            if rt.batch not in per_batch:
                per_batch[rt.batch] = QuantDecStats(rt.num_calls, mod.inner.weight.shape[0])
            per_batch[rt.batch].update(rt.step, pred, target)

        hooks.append(layer.register_forward_pre_hook(pre))
    return stats, hooks
