"""The calibrated plan: one safetensors file with tensors plus JSON metadata. No pickle.

Metadata (``__metadata__["cachequant"]``) holds the config, the schedule, the sampler it was
calibrated for (scheduler class, step count, the exact timesteps), the model fingerprint
(architecture config + SHA-256 of the weights), the cache site, the quantized-layer list and the
library version. Tensors hold the numbers: cache-DEC (a, b), per-step activation ranges,
per-channel weight ranges and quantization-DEC coefficients.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import CacheQuantConfig
from .errors import PlanError, PlanMismatchError

FORMAT = "cachequant-plan"
FORMAT_VERSION = 1
_META_KEY = "cachequant"


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


def fingerprint(model: nn.Module) -> dict:
    return {"class": type(model).__name__, "config": model_config(model), "weights_sha256": weights_sha256(model)}


@dataclass
class Plan:
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def config(self) -> CacheQuantConfig:
        return CacheQuantConfig.from_dict(self.meta["config"])

    @property
    def schedule(self) -> list[int]:
        return list(self.meta["schedule"])

    @property
    def num_calls(self) -> int:
        return int(self.meta["sampler"]["num_calls"])

    def save(self, path: str | os.PathLike) -> Path:
        """Writes atomically: a temporary file in the same folder, then a rename."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(self.meta, sort_keys=True)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # -- checks ----------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raises :class:`PlanMismatchError` naming what differs from the calibrated model."""
        fp = self.meta["model"]
        cls = type(model).__name__
        if cls != fp["class"]:
            raise PlanMismatchError(f"this plan was calibrated for a {fp['class']}, not a {cls}")
        cfg = model_config(model)
        diff = sorted(k for k in set(cfg) | set(fp["config"]) if cfg.get(k) != fp["config"].get(k))
        if diff:
            shown = ", ".join(f"{k}: plan {fp['config'].get(k)!r} vs model {cfg.get(k)!r}" for k in diff[:5])
            raise PlanMismatchError(f"this plan was calibrated for a different {cls} architecture ({shown}); "
                                    "calibrate a plan for this model")
        if weights_sha256(model) != fp["weights_sha256"]:
            raise PlanMismatchError(f"this plan was calibrated for the same {cls} architecture but different "
                                    "weights (weights SHA-256 differs); calibrate a plan for these weights")


def load_plan(path: str | os.PathLike) -> Plan:
    """Reads a plan; a missing, damaged or foreign file raises :class:`PlanError`."""
    from safetensors import safe_open

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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PlanError(f"{path} is not a cachequant plan (format field is {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PlanError(f"{path} has plan format version {meta.get('format_version')}; this cachequant reads "
                        f"version {FORMAT_VERSION}: recalibrate with this version")
    for key in ("config", "schedule", "sampler", "model", "site"):
        if key not in meta:
            raise PlanError(f"{path}: the plan metadata lacks '{key}' (damaged file)")
    try:
        CacheQuantConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise PlanError(f"{path}: the plan's config is invalid ({e})") from None
    return Plan(meta, tensors)
