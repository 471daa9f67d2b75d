"""The passes of a calibration. Each is a set of ordinary pipeline runs with a session attached
(clock, cache, quantized layers as needed) and calibration's observers installed for the pass.

1. :func:`trajectories` — full precision, no cache: the sampler's timesteps and first position,
   the cached feature at every position (DPS costs, cache-DEC fit) and, for VC, every call.
2. :func:`schedule_and_cache_dec` — the schedule over the visited positions, and cache-DEC.
3. :func:`activation_ranges` — the cached model (schedule + cache-DEC) in float while observers
   record per-position activation ranges: the ranges see what the accelerated model sees, stale
   cache included. Weight ranges (and GPTQ codes) are found here too.
4. :func:`quant_dec` — the cached, quantized model; the first consumers of the cached feature
   accumulate the least-squares statistics of Eq. 9.
5. :func:`variance_compensation` — the accelerated model replays the full-precision calls.

A pipeline that calls the model more than once per scheduler step (guidance as separate
conditional / unconditional calls: ``WanPipeline`` with ``guidance_scale > 1``) is calibrated as it
runs, with the guidance of ``pipeline_kwargs``: the first pass learns the calls per step (the
*branches*), and every per-position quantity is fitted on both branches pooled, because the
accelerated model shares it between them. DPS costs and cache-DEC see a position's feature as the
branches' features stacked along the batch (each branch compared with its own earlier feature,
as each branch reuses its own cache); activation ranges take, per position and batch, the union
of the branches' ranges (:class:`~cachequant.quant.observers.RangeObserver`); quantization-DEC
and VC accumulate both branches' calls in the same per-position sums. Pooling keeps the plan's
tables as they are (one entry per position); per-branch tables would double them for a
difference the two branches, which see the same latents and timestep, hardly show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..backends.options import KernelOptions
from ..backends.registry import make_backend
from ..cache.hooks import CacheLayout
from ..cache.schedules import make_schedule, schedule_cost
from ..config import CacheQuantConfig
from ..correction import QuantDecStats, fit_cache_dec, relative_reuse_error
from ..correction.vc import VCStats
from ..distributed import broadcast, gather, mine, rank_world, solve_on_rank0
from ..models.adapters import Adapter
from ..pipecall import call_pipeline, conditioning, sample_of
from ..plan import LayerSpec
from ..quant.quantizer import weight_qparams
from ..quant.specs import attention_modules, kept_float_why, layer_specs, user_float_layers
from ..session import Session
from .inputs import batches
from .observe import (ObserveState, attach_attention_observers, attach_hessians, attach_quant_dec_stats,
                      attach_range_observers)
from .pool import to_cpu, to_device

_GPTQ_MAX_BYTES = 8 << 30
_RANGE_SEED = 10_000  # the quantization passes draw other noise than the feature pass


@dataclass
class Calibration:
    """What the passes share."""
    pipe: Any
    model: nn.Module
    adapter: Adapter
    config: CacheQuantConfig
    num_inference_steps: int
    items: list
    pipeline_kwargs: dict
    layout: CacheLayout | None
    site: dict
    """The cache site ({} without cache)."""
    bar: Any
    timesteps: list[float] | None = None
    sigmas: list[float] | None = None
    begin: int = 0
    calls_per_step: int | None = None
    """Model calls per position (branches), learnt by :func:`trajectories`; None before."""
    diagnostics: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_positions(self) -> int:
        return len(self.timesteps)

    def batches(self, limit: int | None = None) -> list[list]:
        return batches(self.items, self.config.calib_batch_size, limit)

    def session(self, full_steps, cache_dec: torch.Tensor | None = None) -> Session:
        """A session with the clock on the pipeline's scheduler and, if caching, the cache hooks."""
        sess = Session.open(self.model, self.timesteps, full_steps, self.begin, type(self.pipe.scheduler).__name__,
                            self.num_inference_steps, guard=False, sigmas=self.sigmas,
                            calls_per_step=self.calls_per_step)
        try:
            if self.layout is not None:
                sess.add_cache(self.layout, cache_dec)
            sess.attach_scheduler(self.pipe.scheduler)
        except BaseException:
            sess.close()
            raise
        return sess

    def run(self, batch_list: list[list], seed: int, state: ObserveState | None = None,
            on_end: Callable[[int], None] | None = None) -> None:
        """Runs this process's share of ``batch_list``; global batch b draws seed ``seed + b``."""
        kind = conditioning(self.pipe)
        for i, batch in mine(batch_list):
            if state is not None:
                state.batch = i
            call_pipeline(self.pipe, batch, num_inference_steps=self.num_inference_steps,
                          generator=torch.Generator("cpu").manual_seed(seed + i),
                          output_type="latent" if kind == "prompt" else "np", **self.pipeline_kwargs)
            if on_end is not None:
                on_end(i)
            self.bar.update(1)


# -- 1. trajectories ------------------------------------------------------------------------------


def trajectories(cal: Calibration, batch_list: list[list], log_calls: bool) -> tuple[list | None, dict[int, list]]:
    """Runs ``batch_list`` in full precision without cache. Sets the sampler on ``cal`` (timesteps,
    first position, calls per step) and returns (per position, the cached feature over all batches
    in batch order, each batch's branches stacked — on rank 0, None elsewhere; {batch: logged
    calls} of this process when ``log_calls``)."""
    sess = cal.session(full_steps=None)
    key = None if cal.layout is None else cal.layout.feature_key
    calls: list = []
    feats: dict[int, dict[int, torch.Tensor]] = {}
    logs: dict[int, list] = {}
    positions: dict[int, list[int]] = {}

    def record(module, args, kwargs, out):
        pos = sess.clock.position
        feat = None if key is None else tuple(p.detach().float().cpu()
                                              for p in cal.layout.feature_parts(sess.store, sess.clock.branch))
        calls.append((pos, feat, (to_cpu(args), to_cpu(kwargs), to_cpu(sample_of(out))) if log_calls else None))

    def take(i):
        positions[i] = [c[0] for c in calls]
        if key is not None:
            feats[i] = _stack_branches((pos, f) for pos, f, _ in calls)
        if log_calls:
            logs[i] = [(pos, *c) for pos, _, c in calls]
        calls.clear()

    handle = cal.model.register_forward_hook(record, with_kwargs=True)
    try:
        cal.run(batch_list, cal.config.seed, on_end=take)
        planned, sigmas = sess.attachments[0].planned, sess.attachments[0].planned_sigmas
    finally:
        handle.remove()
        sess.close()
    # rank 0 runs batch 0, so it has seen the sampler; a process with no batch of this pass has not
    mine_ok = _check_positions(positions, len(planned)) if positions else None
    cal.timesteps, cal.sigmas, first = broadcast((planned, sigmas, mine_ok) if rank_world()[0] == 0 else None)
    cal.begin, cal.calls_per_step = first
    if mine_ok is not None and tuple(mine_ok) != tuple(first):
        raise RuntimeError(f"calibration runs started at position {mine_ok[0]} with {mine_ok[1]} model calls per "
                           f"step here, at {first[0]} with {first[1]} on rank 0")
    parts = gather(feats)
    features = None
    if key is not None and rank_world()[0] == 0:
        ordered = [d for _, d in sorted(((i, d) for p in parts for i, d in p.items()), key=lambda x: x[0])]
        features = [_cat_parts([d[t] for d in ordered]) for t in range(cal.begin, cal.num_positions)]
    return features, logs


def _cat_parts(per_batch: list[tuple[torch.Tensor, ...]]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """One position's feature over all batches: a tensor, or a tuple of parts (token streams)."""
    parts = tuple(torch.cat([f[k] for f in per_batch], dim=0) for k in range(len(per_batch[0])))
    return parts[0] if len(parts) == 1 else parts


def _stack_branches(calls) -> dict[int, tuple[torch.Tensor, ...]]:
    """{position: feature} of one run from its (position, feature parts) calls; the branches of a
    position (several calls per step) stacked along the batch, in call order."""
    by_pos: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    for pos, f in calls:
        by_pos.setdefault(pos, []).append(f)
    return {pos: fs[0] if len(fs) == 1 else tuple(torch.cat([f[k] for f in fs], dim=0) for k in range(len(fs[0])))
            for pos, fs in by_pos.items()}


def _check_positions(positions: dict[int, list[int]], T: int) -> tuple[int, int]:
    """(first position, model calls per position) of the runs, after checking every run visited
    the same positions up to the last, each the same number of times (what the clock and the plan
    assume: a pipeline with guidance as separate calls makes two per step)."""
    runs = list(positions.values())
    if not runs or not runs[0]:
        raise RuntimeError("the calibration runs made no model call")
    begin = runs[0][0]
    k = next((j for j, p in enumerate(runs[0]) if p != begin), len(runs[0]))
    want = [p for p in range(begin, T) for _ in range(k)]
    for r in runs:
        if r != want:
            raise RuntimeError(
                f"a calibration run called the model at positions {r[:6]}... of {T}; cachequant calibrates runs "
                f"that call the model the same number of times ({k} at the first) at every position from {begin} "
                f"to the end ({want[:6]}...): does the pipeline vary its calls per scheduler step, or stop early?")
    return begin, k


# -- 2. schedule and cache-DEC ------------------------------------------------------------------


def schedule_and_cache_dec(cal: Calibration, features: list | None,
                           source: list | None = None) -> tuple[list[int], torch.Tensor | None]:
    """(full positions, cache-DEC (2, T, C) or None), computed on rank 0 and shared; ``source``:
    the quantized model's features for quantization-aware DPS (``CacheQuantConfig.dps_cost``)."""
    result = _schedule_and_cache_dec(cal, features, source) if rank_world()[0] == 0 else None
    schedule, dec, diag = broadcast(result)
    cal.diagnostics.update(diag)
    return schedule, dec


def _schedule_and_cache_dec(cal: Calibration, features: list | None,
                            source: list | None = None) -> tuple[list[int], torch.Tensor | None, dict]:
    cfg = cal.config
    T, begin = cal.num_positions, cal.begin
    cached = cfg.interval > 1 and cal.layout is not None
    kind = cfg.schedule if cached else "uniform"
    flat, flat_q = (_dps_view(features), _dps_view(source)) if kind == "dps" else (None, None)
    rel = make_schedule(kind, T - begin, cfg.interval if cached else 1, flat, flat_q)
    diag: dict = {}
    if flat_q is not None:
        float_rel = make_schedule("dps", T - begin, cfg.interval, flat)
        diag["dps_quant"] = {"schedule_float_cost": [begin + s for s in float_rel],
                             "cost_quant": schedule_cost(flat, rel, flat_q),
                             "cost_quant_of_float_schedule": schedule_cost(flat, float_rel, flat_q)}
    dec = None
    if cached and features is not None:
        dim = cal.layout.channel_dim
        # in-sample, on the calibration trajectories: how stale the reused feature is (a large value
        # that DEC does not shrink, e.g. DDPM's fresh noise per step, predicts a quality loss)
        before = relative_reuse_error(features, rel, channel_dim=dim)
        diag["cache_reuse"] = {"relative_l1": before["relative_l1"]}
        if cfg.use_cache_dec:
            a, b = fit_cache_dec(features, rel, dim, slope=cfg.cache_dec_slope)
            after = relative_reuse_error(features, rel, (a, b), dim)
            diag["cache_reuse"]["relative_l1_after_cache_dec"] = after["relative_l1"]
            diag["cache_dec_fit"] = {"l1_before": before["mean_l1"], "l1_after": after["mean_l1"],
                                     "cached_steps": before["cached_steps"]}
            dec = torch.stack([torch.ones(T, a.shape[1]), torch.zeros(T, a.shape[1])])
            dec[0, begin:], dec[1, begin:] = a, b
    return [begin + s for s in rel], dec, diag


def closed_loop_cache_dec(cal: Calibration, schedule: list[int], cache_dec: torch.Tensor, specs: list[LayerSpec],
                          attn: list[str], tensors: dict[str, torch.Tensor], batch_list: list[list]) -> torch.Tensor:
    """Cache-DEC (Eq. 8) refitted on the trajectories the accelerated model follows.

    Pass 1 runs ``batch_list`` through the cached (and quantized, open-loop corrected) model and
    logs each call's inputs. Pass 2 replays every logged call with every position full: at a full
    position that recomputes the feature the cache held, at a cached one it gives the fresh feature
    the model would have computed on the latents it actually had. ``fit_cache_dec`` then regresses
    the fresh feature on the reused one, as the open-loop fit does on the float trajectories."""
    plain = without_quant_dec(specs)

    def session(full_steps, dec):
        return accelerated_session(cal, full_steps, dec, plain, attn, tensors) if plain else cal.session(full_steps, dec)

    logs = own_trajectory_calls(cal, session(schedule, cache_dec), batch_list)
    features = replay_features(cal, session(list(range(cal.begin, cal.num_positions)), None), logs)
    result = None
    if rank_world()[0] == 0:
        rel = [t - cal.begin for t in schedule]
        dim = cal.layout.channel_dim
        a, b = fit_cache_dec(features, rel, dim, slope=cal.config.cache_dec_slope)
        before = relative_reuse_error(features, rel, channel_dim=dim)
        open_loop = (cache_dec[0, cal.begin:], cache_dec[1, cal.begin:])
        dec = cache_dec.clone()
        dec[0, cal.begin:], dec[1, cal.begin:] = a, b
        opened, closed = (relative_reuse_error(features, rel, d, dim) for d in (open_loop, (a, b)))
        result = dec, {"relative_l1": before["relative_l1"], "relative_l1_open_loop_dec": opened["relative_l1"],
                       "relative_l1_closed_loop_dec": closed["relative_l1"], "mean_squared": before["mean_squared"],
                       "mean_squared_open_loop_dec": opened["mean_squared"],
                       "mean_squared_closed_loop_dec": closed["mean_squared"]}
    dec, diag = broadcast(result)
    cal.diagnostics["cache_dec_closed_loop"] = diag
    return dec


def own_trajectory_calls(cal: Calibration, sess: Session, batch_list: list[list],
                         outputs: bool = False) -> dict[int, list]:
    """Runs ``batch_list`` from noise through ``sess`` (the accelerated model; closed here) with
    the calibration seeds and returns {batch: [(position, args, kwargs[, output]) per model call]},
    on the CPU: the trajectories the accelerated model itself follows, for the closed-loop fits."""
    calls: list = []
    logs: dict[int, list] = {}

    def record(module, args, kwargs, out):
        calls.append((sess.clock.position, to_cpu(args), to_cpu(kwargs))
                     + ((to_cpu(sample_of(out)),) if outputs else ()))

    def take(i):
        logs[i] = list(calls)
        calls.clear()

    handle = cal.model.register_forward_hook(record, with_kwargs=True)
    try:
        cal.run(batch_list, cal.config.seed, on_end=take)
    finally:
        handle.remove()
        sess.close()
    return logs


def without_quant_dec(specs: list[LayerSpec]) -> list[LayerSpec]:
    """The same layers with quantization-DEC off (passes that run before it is fitted)."""
    return [LayerSpec(s.name, s.weight_bits, s.split, False) for s in specs]


def replay_features(cal: Calibration, sess: Session, logs: dict[int, list]) -> list | None:
    """Replays logged model calls ({batch: [(position, args, kwargs, ...), ...]}) through ``sess``,
    whose every position is full, and returns the cached feature per position over all batches in
    batch order (on rank 0; None elsewhere), as :func:`trajectories` does. Closes ``sess``."""
    feats: dict[int, dict[int, tuple]] = {}
    try:
        for i, log in logs.items():
            got = []
            for n, (pos, args, kwargs, *_) in enumerate(log):
                _place_replay(sess, cal.begin, pos, log[n - 1][0] if n else None)
                cal.model(*to_device(args, cal.device), **to_device(kwargs, cal.device))
                got.append((pos, tuple(p.detach().float().cpu()
                                       for p in cal.layout.feature_parts(sess.store, sess.clock.branch))))
            feats[i] = _stack_branches(got)
            cal.bar.update(1)
    finally:
        sess.close()
    parts = gather(feats)
    if rank_world()[0] != 0:
        return None
    ordered = [d for _, d in sorted(((i, d) for p in parts for i, d in p.items()), key=lambda x: x[0])]
    return [_cat_parts([d[t] for d in ordered]) for t in range(cal.begin, cal.num_positions)]


def quantized_features(cal: Calibration, specs: list[LayerSpec], attn: list[str], logs: dict[int, list]) -> list | None:
    """The cached feature the *quantized* model computes on the full-precision trajectories' own
    inputs (teacher-forced, every position full): the ``source`` of quantization-aware DPS.

    The activation ranges it quantizes with are provisional — calibrated on the uncached
    trajectories (no schedule exists yet) and discarded; the plan's ranges are calibrated on the
    cached trajectory of the chosen schedule afterwards, as without this pass."""
    full = list(range(cal.begin, cal.num_positions))
    provisional: dict[str, torch.Tensor] = {}
    ran = activation_ranges(cal, full, None, specs, attn, provisional)
    plain = without_quant_dec(ran)
    return replay_features(cal, accelerated_session(cal, full, None, plain, attn, provisional), logs)


def _place_replay(sess: Session, begin: int, pos: int, previous: int | None) -> None:
    """Places a logged call for its replay: a new position is set (at ``begin`` a new run starts);
    a further call at the same position is the next branch of that step (its own cache entry)."""
    if pos == previous:
        return
    if pos == begin:
        sess.clock.start_run()
    sess.clock.set(pos)


def _dps_view(features: list | None) -> list | None:
    """DPS costs are L1 distances over the whole feature: a feature in parts (token streams with
    different token counts) is flattened per sample and concatenated."""
    if not features or not isinstance(features[0], tuple):
        return features
    return [torch.cat([p.flatten(1) for p in f], dim=1) for f in features]


# -- 3. activation ranges (and weight ranges, GPTQ) --------------------------------------------


def quant_specs(cal: Calibration) -> tuple[list[LayerSpec], list[str], dict[str, int]]:
    """(layers, attention modules, cache consumers) the plan quantizes."""
    cfg, model, adapter = cal.config, cal.model, cal.adapter
    consumers = adapter.cache_consumers(model, cal.site) if cfg.use_quant_dec and cal.layout is not None else {}
    first_last = adapter.keep_8bit(model)
    specs = layer_specs(model, cfg.weight_bits, first_last, adapter.concat_splits(model, cal.site),
                        cfg.w8_layers, frozenset(consumers))
    floats = set() if cfg.quant_modulation else adapter.keep_float(model)
    if not cfg.quant_io:
        floats |= first_last
    floats |= user_float_layers(specs, cfg.float_layers)
    if floats:
        specs = [s for s in specs if s.name not in floats]
        cal.diagnostics["layers_kept_float"] = sorted(floats)
    attn, other = attention_modules(model) if cfg.quant_attention else ([], {})
    if other:
        cal.diagnostics["attention_kept_float"] = other
        why = kept_float_why(other)
        if why:
            cal.diagnostics["attention_kept_float_why"] = why
    return specs, attn, consumers


def activation_ranges(cal: Calibration, schedule: list[int], cache_dec, specs: list[LayerSpec], attn: list[str],
                      tensors: dict[str, torch.Tensor]) -> list[LayerSpec]:
    """Fills ``tensors`` with weight ranges (GPTQ codes) and per-position activation ranges; returns
    the specs of the layers that ran (a layer that never ran, such as one bypassed by fused
    projections, is left unquantized and named in the diagnostics)."""
    cfg, model = cal.config, cal.model
    for spec in specs:
        s, z = weight_qparams(model.get_submodule(spec.name).weight.detach(), spec.weight_bits)
        tensors[f"w.{spec.name}"] = torch.stack([s.reshape(-1), z.reshape(-1)]).float().cpu()
    state = ObserveState()
    sess = cal.session(schedule, cache_dec)
    undo: list = []
    try:
        layer_obs, u = attach_range_observers(model, specs, cfg.act_bits, sess.clock, state)
        undo += u
        attn_obs, u = attach_attention_observers(model, attn, cfg.act_bits, sess.clock, state)
        undo += u
        hessians = None
        if cfg.weight_rounding == "gptq":
            hessians, u = attach_hessians(model, specs, cfg.seed, _GPTQ_MAX_BYTES)
            undo += u
        if cfg.calibration == "trajectory":
            cal.run(cal.batches(), cfg.seed + _RANGE_SEED, state=state)
        else:
            cal.diagnostics["calibration_selection"] = _select_and_observe(cal, sess, state, schedule)
    finally:
        for fn in reversed(undo):
            fn()
        sess.close()
    if hessians is not None:
        cal.diagnostics["gptq"] = _apply_gptq(model, specs, hessians, tensors)

    histories = {f"act.{n}": [o.history for o in obs] for n, obs in layer_obs.items()}
    histories.update({f"attn.{n}": [obs[k].history for k in obs] for n, obs in attn_obs.items()})

    def tables(per_rank: list[dict]) -> dict[str, torch.Tensor | None]:
        from ..quant.observers import RangeObserver

        out = {}
        for key in per_rank[0]:
            parts = []
            for j in range(len(per_rank[0][key])):
                o = RangeObserver(cfg.act_bits, [h for p in per_rank for h in p[key][j]])
                parts.append(o.table(cal.num_positions, cal.begin, cfg.per_step_act) if o.history else None)
            out[key] = None if any(p is None for p in parts) else torch.stack(parts)
        return out

    result = solve_on_rank0({rank_world()[0]: histories}, tables)
    ran = []
    for spec in specs:
        t = result[f"act.{spec.name}"]
        if t is None:
            not_run = cal.diagnostics.setdefault("layers_not_run", [])
            if spec.name not in not_run:  # quantization-aware DPS's provisional pass may see it first
                not_run.append(spec.name)
            tensors.pop(f"w.{spec.name}", None)
            tensors.pop(f"w.{spec.name}.codes", None)
            continue
        tensors[f"act.{spec.name}"] = t
        ran.append(spec)
    for name in attn:
        t = result[f"attn.{name}"]
        if t is None:
            raise RuntimeError(f"the attention module {name} never ran during calibration")
        tensors[f"attn.{name}"] = t
    return ran


def _apply_gptq(model: nn.Module, specs: list[LayerSpec], acc: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """GPTQ codes for every layer, on the grid its range search chose (rank 0 sums the ranks'
    Hessians, then shares the codes). Returns a diagnostic: the mean relative output error
    ‖(W − Ŵ)X‖ / ‖WX‖ estimated through H, nearest vs GPTQ, over the layers."""
    from ..quant.gptq import gptq_codes, hessian_from
    from ..quant.quantizer import fake_quant

    def solve(per_rank: list[dict]):
        codes, before, after = {}, [], []
        for spec in specs:
            name = spec.name
            n = sum(p[name][1] for p in per_rank)
            if n == 0:
                continue  # never ran: keeps nearest rounding
            h = hessian_from(sum(p[name][0] for p in per_rank), n)
            w = model.get_submodule(name).weight.detach()
            h = h.to(w.device)
            wt = tensors[f"w.{name}"]
            shape = (-1,) + (1,) * (w.dim() - 1)
            s, z = wt[0].view(shape).to(w.device), wt[1].view(shape).to(w.device)
            codes[name] = gptq_codes(w, h, s, z, spec.weight_bits).to(torch.uint8).cpu()
            q = (codes[name].to(w.device).double() - z.double()) * s.double()
            w2 = w.reshape(w.shape[0], -1).double()
            ref = torch.einsum("ok,kl,ol->", w2, h.double(), w2).clamp_min(1e-30)
            for d, out in ((fake_quant(w.float(), s, z, spec.weight_bits), before), (q, after)):
                e = (w.double() - d.double()).reshape(w.shape[0], -1)
                out.append(float(torch.sqrt(torch.einsum("ok,kl,ol->", e, h.double(), e) / ref)))
        diag = {"layers": len(codes), "rel_output_error_nearest": sum(before) / max(len(before), 1),
                "rel_output_error_gptq": sum(after) / max(len(after), 1)}
        return codes, diag

    codes, diag = solve_on_rank0({rank_world()[0]: {name: (a.h.cpu(), a.n) for name, a in acc.items()}}, solve)
    for name, c in codes.items():
        tensors[f"w.{name}.codes"] = c
    return diag


def _select_and_observe(cal: Calibration, sess: Session, state: ObserveState, schedule: list[int]) -> dict:
    """Logs the cached trajectories (float), selects ``calib_select`` entries by the configured
    method, and replays only those with the observers on."""
    import time

    from .pool import build_pool, replay_observe
    from .select import select

    cfg = cal.config
    if rank_world()[1] > 1:
        raise ValueError(f"calibration={cfg.calibration!r} selects from a pool on one process; run it without "
                         "torchrun (the 'trajectory' calibration is the one that spreads over processes)")
    if cal.calls_per_step != 1:
        raise ValueError(f"calibration={cfg.calibration!r} selects from a pool of one model call per sampler step, "
                         f"but this pipeline calls the model {cal.calls_per_step} times per step (guidance as "
                         "separate calls, guidance_scale > 1): use calibration='trajectory'")
    log: list = []
    state.enabled = False
    handle = cal.model.register_forward_hook(
        lambda m, a, k, o: log.append((sess.clock.position, to_cpu(a), to_cpu(k), None)), with_kwargs=True)
    try:
        batch_list = cal.batches()
        cal.run(batch_list, cfg.seed + _RANGE_SEED)
    finally:
        handle.remove()
    pool = build_pool(log, [len(b) for b in batch_list], cal.num_positions - cal.begin)
    t = time.time()
    info: dict = {}
    chosen = select(cfg.calibration, pool.features, pool.steps, cfg.calib_select, lam=cfg.tap_lambda,
                    seed=cfg.seed, clusters=cfg.tap_clusters, info=info)
    t_sel = time.time() - t

    def call(position, args, kwargs):
        sess.clock.set(position)
        with torch.no_grad():
            cal.model(*args, **kwargs)

    def observe(on: bool):
        state.enabled = on

    per_step = replay_observe(call, frozenset(schedule), pool, chosen, cal.device, observe)
    return {"method": cfg.calibration, "pool": len(pool.entries), "selected": int(len(chosen)),
            "selection_seconds": t_sel, **info, "per_step": {str(k): v for k, v in sorted(per_step.items())},
            "selected_entries": [int(i) for i in chosen]}


# -- 4. quantization DEC --------------------------------------------------------------------------


def accelerated_session(cal: Calibration, schedule: list[int], cache_dec, specs: list[LayerSpec], attn: list[str],
                        tensors: dict[str, torch.Tensor]) -> Session:
    """The cached, quantized model on the float reference (what the plan so far describes)."""
    sess = cal.session(schedule, cache_dec)
    try:
        sess.add_quant(specs, cal.config.act_bits, tensors, make_backend("fake", KernelOptions()))
        sess.add_attention(attn, tensors, cal.config.act_bits, cal.config.attention_probs)
    except BaseException:
        sess.close()
        raise
    return sess


def quant_dec(cal: Calibration, schedule: list[int], cache_dec, specs: list[LayerSpec], attn: list[str],
              consumers: dict[str, int], tensors: dict[str, torch.Tensor]) -> None:
    """Fits the quantization-DEC coefficients of the cache's first consumers into ``tensors``."""
    plain = without_quant_dec(specs)
    state = ObserveState()
    sess = accelerated_session(cal, schedule, cache_dec, plain, attn, tensors)
    try:
        stats, undo = attach_quant_dec_stats(cal.model, consumers, sess.layers, sess.clock, state)
        try:
            cal.run(cal.batches(), cal.config.seed + _RANGE_SEED, state=state)
        finally:
            for fn in undo:
                fn()
    finally:
        sess.close()

    def solve(per_rank: list[dict]):
        coeffs, fits = {}, {}
        for name in consumers:
            st = _sum_in_order([p[name] for p in per_rank])
            a, b = st.solve()
            coeffs[name] = torch.stack([a, b])
            before, after = st.residual(a, b)
            fits[name] = {"mse_before": before, "mse_after": after}
        return coeffs, fits

    coeffs, fits = solve_on_rank0({rank_world()[0]: stats}, solve)
    cal.diagnostics["quant_dec_fit"] = fits
    for name, t in coeffs.items():
        tensors[f"qdec.{name}"] = t


def _sum_in_order(per_rank: list[dict]) -> QuantDecStats | VCStats:
    """Per-batch statistics objects from all ranks, accumulated in global batch order."""
    items = sorted(((i, st) for d in per_rank for i, st in d.items()), key=lambda x: x[0])
    total = items[0][1]
    for _, st in items[1:]:
        total.add(st)
    return total


# -- 5. variance compensation --------------------------------------------------------------------


@torch.no_grad()
def variance_compensation(cal: Calibration, sess: Session, logs: dict[int, list]) -> torch.Tensor:
    """Teacher-forced replay of the full-precision runs through the accelerated model: at each call,
    x̂ = accelerated output on the logged input, x = the logged full-precision output."""
    channels = int(cal.model.config.in_channels)
    stats = {}
    for i, log in logs.items():
        stats[i] = st = VCStats(cal.num_positions, channels, gamma=cal.config.vc_gamma)
        for n, (pos, args, kwargs, target) in enumerate(log):
            _place_replay(sess, cal.begin, pos, log[n - 1][0] if n else None)
            out = cal.model(*to_device(args, cal.device), **to_device(kwargs, cal.device))
            pred = sample_of(out)
            st.update(pos, pred, target.to(pred.device))

    return _solve_vc(cal, stats, "open")


@torch.no_grad()
def closed_loop_variance_compensation(cal: Calibration, sess: Session, batch_list: list[list]) -> torch.Tensor:
    """VC fitted on the trajectories the accelerated model follows (``vc_fit="closed"``).

    ``sess`` (the cached, quantized model, closed here) runs ``batch_list`` from noise with the
    calibration seeds; each call's inputs and output x̂ are logged. The full-precision model is
    then evaluated on the same logged inputs for the target x. Why: VC exists to counter exposure
    bias — the accelerated model's inputs drift off the float trajectory and its output variance
    drifts with them — and a teacher-forced fit (:func:`variance_compensation`) only ever shows it
    float inputs, where that drift cannot appear."""
    channels = int(cal.model.config.in_channels)
    logs = own_trajectory_calls(cal, sess, batch_list, outputs=True)
    stats = {}
    for i, log in logs.items():  # the plain float model now: the session is closed
        stats[i] = st = VCStats(cal.num_positions, channels, gamma=cal.config.vc_gamma)
        for pos, args, kwargs, pred in log:
            target = sample_of(cal.model(*to_device(args, cal.device), **to_device(kwargs, cal.device)))
            st.update(pos, pred.to(target.device), target)
    return _solve_vc(cal, stats, "closed")


def _solve_vc(cal: Calibration, stats: dict[int, VCStats], fit: str) -> torch.Tensor:
    def solve(per_rank: list[dict]):
        scale = _sum_in_order(per_rank).solve()
        return scale, {"fit": fit, "min": float(scale.min()), "max": float(scale.max()),
                       "batches": sum(len(p) for p in per_rank)}

    scale, diag = solve_on_rank0({rank_world()[0]: stats}, solve)
    cal.diagnostics["vc"] = diag
    return scale
