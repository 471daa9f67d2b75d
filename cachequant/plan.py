"""The calibrated plan: typed data, saved as one safetensors file (tensors + JSON metadata, no pickle).

A plan says, for one model and one sampler configuration:

* ``sampler`` — the scheduler class, the step count, the exact timesteps (one per position, the
  *positions* every per-step quantity is indexed by), the exact sigmas where the sampler has them
  (flow matching after its shift) and the first position a run visits (``begin``: 0 for
  text-to-image, later for image-to-image at strength < 1) and the model calls per scheduler step
  (2 for a pipeline that runs guidance as separate conditional / unconditional calls, such as
  ``WanPipeline`` with ``guidance_scale > 1``; both share every per-position table);
* ``cache`` — the cache site and the schedule (the positions that run the whole model);
* ``quant`` — the quantized layers (weight bits, input split, whether they carry quantization-DEC)
  and attention modules, or None;
* ``vc`` — whether variance compensation factors are present;
* ``fingerprint`` — the model class, architecture config, dtype and SHA-256 of the weights.

The numbers live in ``tensors``:

=====================  ==========================================================================
``cache_dec``          (2, T, C) cache-DEC slope and shift per position and channel (Eq. 8)
``vc``                 (T, C) variance-compensation factors
``act.<layer>``        (parts, 2, T) activation scale and zero point per input part and position
``attn.<module>``      (4, 2, T) the same for the q, k, softmax and v operands of attention
``w.<layer>``          (2, N) per-output-channel weight scale and zero point
``w.<layer>.codes``    uint8 weight codes chosen by GPTQ (absent: round to nearest)
``qdec.<layer>``       (2, T, N) quantization-DEC slope and shift per position and output channel
=====================  ==========================================================================

:func:`load_plan` validates all of it once (:meth:`Plan.from_meta`); everything downstream trusts
the types.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CacheQuantConfig
from .errors import PlanError, PlanMismatchError

FORMAT = "cachequant-plan"
FORMAT_VERSION = 2
_META_KEY = "cachequant"
CACHE_KINDS = ("none", "unet", "transformer")
ATTENTION_OPERANDS = ("q", "k", "p", "v")


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over every state-dict tensor (name, dtype, shape and raw bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def model_config(model: nn.Module) -> dict:
    """The architecture config as plain JSON (private ``_``-keys such as the source path dropped)."""
    cfg = {k: v for k, v in dict(getattr(model, "config", {})).items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, default=str, sort_keys=True))


def model_dtype(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "float32"


# -- the schema ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    cls: str
    config: dict
    weights_sha256: str
    dtype: str

    @classmethod
    def of(cls, model: nn.Module) -> "Fingerprint":
        return cls(type(model).__name__, model_config(model), weights_sha256(model), model_dtype(model))

    def check(self, model: nn.Module) -> None:
        """Raises :class:`PlanMismatchError` naming what differs from the calibrated model."""
        name = type(model).__name__
        if name != self.cls:
            raise PlanMismatchError(f"this plan was calibrated for a {self.cls}, not a {name}")
        cfg = model_config(model)
        diff = sorted(k for k in set(cfg) | set(self.config) if cfg.get(k) != self.config.get(k))
        if diff:
            shown = ", ".join(f"{k}: plan {self.config.get(k)!r} vs model {cfg.get(k)!r}" for k in diff[:5])
            raise PlanMismatchError(f"this plan was calibrated for a different {name} architecture ({shown}); "
                                    "calibrate a plan for this model")
        dtype = model_dtype(model)
        if dtype != self.dtype:
            raise PlanMismatchError(
                f"this plan was calibrated on {self.dtype} weights and the model is {dtype}: the weight "
                f"fingerprint is taken in the calibrated dtype. Accelerate the model in {self.dtype} and move "
                f"it afterwards (cq.accelerate(pipe, plan); pipe.to(torch.{dtype})), or calibrate in {dtype}")
        if weights_sha256(model) != self.weights_sha256:
            raise PlanMismatchError(
                f"this plan was calibrated for the same {name} architecture but different weights (weights "
                "SHA-256 differs: other checkpoint, a fused LoRA or another LoRA scale?); calibrate a plan for "
                "these weights")


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str
    num_inference_steps: int
    timesteps: tuple[float, ...]
    """One entry per position of a whole run (a model call, or ``calls_per_step`` of them): the
    positions of the plan."""
    begin: int = 0
    """The first position calibrated runs visited (image-to-image starts later than 0)."""
    sigmas: tuple[float, ...] | None = None
    """The sampler's exact noise levels (``scheduler.sigmas``; flow matching: after shift or
    dynamic shifting), or None for samplers without them. Runs with other sigmas are refused."""
    calls_per_step: int = 1
    """Model calls at every position (the *branches* of a step): 2 where the pipeline calls the
    model for the conditional and then the unconditional prediction (guidance as separate calls).
    Runs with another count (another ``guidance_scale``) are refused by the step clock. Plans
    without the field predate it and were calibrated with one call per step."""

    @property
    def num_calls(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class CacheSpec:
    kind: str
    """'none' (no caching), 'unet' (DeepCache-style layer skipping) or 'transformer' (block-span deviation)."""
    site: dict
    schedule: tuple[int, ...]
    """Positions that run the whole model; every other visited position reuses the cache."""


@dataclass(frozen=True)
class LayerSpec:
    name: str
    weight_bits: int
    split: int | None
    """Leading input channels of a two-part concatenated input (one quantizer per part), or None."""
    dec: bool = False
    """Carries quantization-DEC coefficients (a first consumer of the cached feature)."""


@dataclass(frozen=True)
class QuantSpec:
    act_bits: int
    per_step_act: bool
    weight_rounding: str
    layers: tuple[LayerSpec, ...]
    attention: tuple[str, ...]
    """Attention modules whose two matmuls run on 8-bit operands."""


@dataclass
class Plan:
    config: CacheQuantConfig
    sampler: SamplerSpec
    cache: CacheSpec
    quant: QuantSpec | None
    vc: bool
    fingerprint: Fingerprint
    tensors: dict[str, torch.Tensor]
    diagnostics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    """Where the plan came from: pipeline and adapter names, calibration inputs, versions."""

    # -- convenience ---------------------------------------------------------------------------
    @property
    def schedule(self) -> list[int]:
        return list(self.cache.schedule)

    @property
    def num_calls(self) -> int:
        return self.sampler.num_calls

    # -- (de)serialization -----------------------------------------------------------------------
    def to_meta(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "sampler": {**asdict(self.sampler), "timesteps": list(self.sampler.timesteps),
                        "sigmas": None if self.sampler.sigmas is None else list(self.sampler.sigmas)},
            "cache": {"kind": self.cache.kind, "site": self.cache.site, "schedule": list(self.cache.schedule)},
            "quant": None if self.quant is None else {
                "act_bits": self.quant.act_bits, "per_step_act": self.quant.per_step_act,
                "weight_rounding": self.quant.weight_rounding,
                "layers": [asdict(layer) for layer in self.quant.layers], "attention": list(self.quant.attention)},
            "vc": self.vc,
            "fingerprint": asdict(self.fingerprint),
            "diagnostics": self.diagnostics,
            "info": self.info,
        }

    @classmethod
    def from_meta(cls, meta: Any, tensors: dict[str, torch.Tensor], source: str = "plan") -> "Plan":
        """The one validation of a plan: types, ranges and every tensor's presence and shape.
        Raises :class:`PlanError` naming ``source`` and the first problem found."""
        try:
            return _parse(meta, tensors)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise PlanError(f"{source}: the plan metadata is invalid ({what}); recalibrate it") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Writes atomically: a temporary file in the same folder, then a rename."""
        from safetensors.torch import save_file

        from .utils.io import atomic_path

        if path is None or not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"plan.save needs a file path, got {path!r}")
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; give a file name such as {path / 'plan.cqplan'}")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(self.to_meta(), sort_keys=True)})
        return path


def load_plan(path: str | os.PathLike) -> Plan:
    """Reads a plan; a missing, damaged or foreign file raises :class:`PlanError`."""
    from safetensors import safe_open

    if path is None or not isinstance(path, (str, os.PathLike)):
        raise PlanError(f"load_plan needs a file path, got {path!r}")
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt input
        raise PlanError(f"{path} is not a readable cachequant plan (safetensors could not parse it: {e})") from None
    if raw is None:
        raise PlanError(f"{path} is a safetensors file but not a cachequant plan (no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: the plan metadata is damaged ({e})") from None
    return Plan.from_meta(meta, tensors, source=str(path))


# -- validation ----------------------------------------------------------------------------------


def _int(v: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise PlanError(f"{name} must be an integer {bound}, got {v!r}")
    return v


def _tensor(tensors: dict, key: str, shape: tuple, dtype: torch.dtype = torch.float32) -> None:
    t = tensors.get(key)
    if t is None:
        raise PlanError(f"tensor {key!r} is missing")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise PlanError(f"tensor {key!r} is {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise PlanError(f"tensor {key!r} holds non-finite values")


def _parse(meta: Any, tensors: dict[str, torch.Tensor]) -> Plan:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PlanError(f"not a cachequant plan (format field is {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PlanError(f"plan format version {meta.get('format_version')}; this cachequant reads version "
                        f"{FORMAT_VERSION}: recalibrate the plan with this version")
    # plans written before quant_io existed quantized the first and last layers
    config = CacheQuantConfig.from_dict({"quant_io": True, **meta["config"]})

    s = meta["sampler"]
    steps = _int(s["num_inference_steps"], "sampler.num_inference_steps", 1)
    ts = s["timesteps"]
    if not isinstance(ts, list) or not ts or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in ts):
        raise PlanError("sampler.timesteps must be a non-empty list of numbers")
    T = len(ts)
    begin = _int(s.get("begin", 0), "sampler.begin", 0, T - 1)
    if not isinstance(s["scheduler"], str) or not s["scheduler"]:
        raise PlanError("sampler.scheduler must name a scheduler class")
    sig = s.get("sigmas")
    if sig is not None and (not isinstance(sig, list) or not sig or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) for x in sig)):
        raise PlanError("sampler.sigmas must be null or a non-empty list of numbers")
    calls_per_step = _int(s.get("calls_per_step", 1), "sampler.calls_per_step", 1)
    sampler = SamplerSpec(s["scheduler"], steps, tuple(float(t) for t in ts), begin,
                          None if sig is None else tuple(float(x) for x in sig), calls_per_step)

    c = meta["cache"]
    if c["kind"] not in CACHE_KINDS:
        raise PlanError(f"cache.kind must be one of {', '.join(CACHE_KINDS)}, got {c['kind']!r}")
    sched = c["schedule"]
    if not isinstance(sched, list) or not sched or any(isinstance(x, bool) or not isinstance(x, int) for x in sched):
        raise PlanError("cache.schedule must be a non-empty list of positions")
    if sched != sorted(set(sched)) or sched[0] != begin or sched[-1] >= T:
        raise PlanError(f"cache.schedule {sched[:8]}... must be increasing positions in [{begin}, {T - 1}] "
                        f"starting at the first calibrated position {begin}")
    if not isinstance(c["site"], dict):
        raise PlanError("cache.site must be a mapping")
    cache = CacheSpec(c["kind"], c["site"], tuple(sched))
    if cache.kind == "none" and len(sched) != T - begin:
        raise PlanError("a plan without cache must run every position in full")
    if "cache_dec" in tensors:
        t = tensors["cache_dec"]
        if t.dim() != 3:
            raise PlanError(f"tensor 'cache_dec' must be (2, T, C), got {tuple(t.shape)}")
        _tensor(tensors, "cache_dec", (2, T, t.shape[2]))

    quant = None
    q = meta["quant"]
    if q is not None:
        act_bits = _int(q["act_bits"], "quant.act_bits", 2, 8)
        layers = []
        for d in q["layers"]:
            spec = LayerSpec(str(d["name"]), _int(d["weight_bits"], f"weight bits of {d['name']}", 2, 8),
                             None if d.get("split") is None else _int(d["split"], f"split of {d['name']}", 1),
                             bool(d.get("dec", False)))
            parts = 1 if spec.split is None else 2
            _tensor(tensors, f"act.{spec.name}", (parts, 2, T))
            w = tensors.get(f"w.{spec.name}")
            if w is None or w.dim() != 2:
                raise PlanError(f"tensor 'w.{spec.name}' is missing or not (2, N)")
            _tensor(tensors, f"w.{spec.name}", (2, w.shape[1]))
            if f"w.{spec.name}.codes" in tensors and tensors[f"w.{spec.name}.codes"].dtype != torch.uint8:
                raise PlanError(f"tensor 'w.{spec.name}.codes' must be uint8")
            if spec.dec:
                _tensor(tensors, f"qdec.{spec.name}", (2, T, w.shape[1]))
            layers.append(spec)
        attention = tuple(str(a) for a in q["attention"])
        for name in attention:
            _tensor(tensors, f"attn.{name}", (len(ATTENTION_OPERANDS), 2, T))
        if q["weight_rounding"] not in ("nearest", "gptq"):
            raise PlanError(f"quant.weight_rounding {q['weight_rounding']!r} is unknown")
        quant = QuantSpec(act_bits, bool(q["per_step_act"]), q["weight_rounding"], tuple(layers), attention)

    vc = bool(meta["vc"])
    if vc:
        t = tensors.get("vc")
        if t is None or t.dim() != 2:
            raise PlanError("tensor 'vc' is missing or not (T, C)")
        _tensor(tensors, "vc", (T, t.shape[1]))
    f = meta["fingerprint"]
    fingerprint = Fingerprint(str(f["cls"]), dict(f["config"]), str(f["weights_sha256"]), str(f["dtype"]))
    return Plan(config, sampler, cache, quant, vc, fingerprint, dict(tensors), dict(meta.get("diagnostics") or {}),
                dict(meta.get("info") or {}))
