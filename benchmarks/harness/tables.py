"""The quality study's tables (``benchmarks/ablation.py``): each table's model, sampler and variants
(CacheQuantConfig overrides), a table's results gathered into one JSON, and the JSON files of
several runs merged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .io import read_json


NO_QUANT = {"weight_bits": None, "act_bits": None}


@dataclass
class Variant:
    slug: str
    label: str
    config: dict | None
    """CacheQuantConfig overrides on top of the table's base; None = full precision (no plan)."""


@dataclass
class Table:
    name: str
    title: str
    model: str
    scheduler: str
    steps: int
    guidance_scale: float | None
    variants: list[Variant] = field(default_factory=list)

    def variant(self, slug: str) -> Variant:
        for v in self.variants:
            if v.slug == slug:
                return v
        raise KeyError(f"table {self.name} has no variant {slug!r}; variants: {', '.join(v.slug for v in self.variants)}")


def _cache_quant_variants(intervals_cache: list[int], intervals_joint: list[int], w4: bool,
                          dec_halves: tuple[int, ...] = (), shift_dec: tuple[int, ...] = ()) -> list[Variant]:
    """The CacheQuant issue's ablation rows: cache only, quant only, naive joint, +DPS, +DPS+DEC;
    then, at the intervals in ``dec_halves``, DPS with one half of DEC each (which half closes the
    gap to full precision: on the UNet, DPS + DEC at N = 10 beat quant-only W8A8 on FID); last, at
    the intervals in ``shift_dec``, DPS + DEC with a shift-only cache-DEC (does the fitted slope's
    shrinkage cost the FID that DEC loses under DDPM 250?)."""
    vs = [Variant("fp", "full precision", None)]
    for n in intervals_cache:
        vs.append(Variant(f"cache-n{n}", f"cache only, uniform N={n}",
                          dict(interval=n, schedule="uniform", dec=False, **NO_QUANT)))
    vs.append(Variant("w8a8", "quant only W8A8", dict(interval=1, schedule="uniform", dec=False)))
    if w4:
        vs.append(Variant("w4a8", "quant only W4A8", dict(interval=1, schedule="uniform", weight_bits=4, dec=False)))
        vs.append(Variant("w4a8-gptq", "quant only W4A8, GPTQ rounding",
                          dict(interval=1, schedule="uniform", weight_bits=4, dec=False, weight_rounding="gptq")))
        vs.append(Variant("w4a8-gptq-mixed", "quant only W4A8, GPTQ rounding, shortcut 1×1 convs at 8 bits",
                          dict(interval=1, schedule="uniform", weight_bits=4, dec=False, weight_rounding="gptq",
                               w8_layers=("*.conv_shortcut",))))
    for n in intervals_joint:
        vs.append(Variant(f"naive-n{n}", f"naive cache N={n} + W8A8", dict(interval=n, schedule="uniform", dec=False)))
    for n in intervals_joint:
        vs.append(Variant(f"dps-n{n}", f"+ DPS (N={n}, W8A8)", dict(interval=n, schedule="dps", dec=False)))
    for n in intervals_joint:
        vs.append(Variant(f"dps-dec-n{n}", f"+ DPS + DEC (N={n}, W8A8)", dict(interval=n, schedule="dps", dec=True)))
    for n in dec_halves:
        vs.append(Variant(f"dps-cachedec-n{n}", f"+ DPS + cache-DEC only (N={n}, W8A8)",
                          dict(interval=n, schedule="dps", dec=True, quant_dec=False)))
        vs.append(Variant(f"dps-quantdec-n{n}", f"+ DPS + quantization-DEC only (N={n}, W8A8)",
                          dict(interval=n, schedule="dps", dec=True, cache_dec=False)))
    for n in shift_dec:
        vs.append(Variant(f"dps-shiftdec-n{n}", f"+ DPS + DEC, shift-only cache-DEC (N={n}, W8A8)",
                          dict(interval=n, schedule="dps", dec=True, cache_dec_slope=False)))
    return vs


def _float_attention_variants(intervals: list[int]) -> list[Variant]:
    """W8A8 with the attention matmuls (QKᵀ, softmax·V) left in float, alone and with DPS + DEC:
    what the 8-bit attention costs, against the rows that quantize them (the default)."""
    vs = [Variant("w8a8-fattn", "quant only W8A8, float attention matmuls",
                  dict(interval=1, schedule="uniform", dec=False, quant_attention=False))]
    for n in intervals:
        vs.append(Variant(f"dps-dec-n{n}-fattn", f"+ DPS + DEC (N={n}, W8A8), float attention matmuls",
                          dict(interval=n, schedule="dps", dec=True, quant_attention=False)))
    return vs


def _e4m3_probs_variants(intervals: list[int]) -> list[Variant]:
    """W8A8 with the attention's softmax probabilities on e4m3 (``attention_probs="e4m3"``), alone
    and with DPS + DEC: against the rows with the uniform 8-bit range (the default) and those with
    float attention, how much of the 8-bit attention's cost the float grid gives back."""
    vs = [Variant("w8a8-pe4m3", "quant only W8A8, attention probabilities on e4m3",
                  dict(interval=1, schedule="uniform", dec=False, attention_probs="e4m3"))]
    for n in intervals:
        vs.append(Variant(f"dps-dec-n{n}-pe4m3", f"+ DPS + DEC (N={n}, W8A8), attention probabilities on e4m3",
                          dict(interval=n, schedule="dps", dec=True, attention_probs="e4m3")))
    return vs


def _qandc_main(n: int) -> list[Variant]:
    """Q&C's main rows at cache interval ``n``, W8A8; the baseline is uniform caching + W8A8 with
    the default calibration (``CacheQuantConfig.calibration = "trajectory"``: every step of every
    calibration trajectory), no DEC; last, the union with CacheQuant."""
    base = dict(interval=n, schedule="uniform", dec=False)
    return [Variant("fp", "full precision", None),
            Variant("baseline", f"cache N={n} + W8A8 (trajectory calibration)", dict(base)),
            Variant("tap", "+ TAP", dict(base, calibration="tap")),
            Variant("vc", "+ VC", dict(base, vc=True)),
            Variant("tap-vc", "+ TAP + VC", dict(base, calibration="tap", vc=True)),
            Variant("union", "DPS + DEC + TAP + VC", dict(base, schedule="dps", dec=True, calibration="tap", vc=True))]


def _qandc_unet_variants() -> list[Variant]:
    """Does Q&C transfer to the UNet? Its main rows at the UNet table's N = 10."""
    return _qandc_main(10)


def _qandc_variants() -> list[Variant]:
    """Q&C's ablations on the DiT at N = 3: the main rows first, then the comparisons, so that a
    time-budgeted run samples what matters most first."""
    base = dict(interval=3, schedule="uniform", dec=False)
    vs = _qandc_main(3)
    for m in ("random", "uniform-per-step", "kmeans", "dbscan", "agglomerative", "tap"):
        vs.append(Variant(f"calib-{m}", f"calibration selection: {m}", dict(base, calibration=m)))
    for lam in (0.3, 0.4, 0.5, 0.6, 0.7):
        vs.append(Variant(f"tap-lam{lam}", f"TAP λ={lam}", dict(base, calibration="tap", tap_lambda=lam)))
    return vs


def _qandc_fair_variants() -> list[Variant]:
    """Q&C redone at equal budgets on the DiT (N = 3, W8A8, uniform schedule, no DEC): TAP against
    the paper's baseline (the same number of entries from every step) and TAP stratified by step,
    with 256 and 800 entries, each with activation ranges per step and shared across steps (and a
    random selection with per-step ranges, which the range-search aliasing may have hurt); then VC
    fitted teacher-forced (the paper's) and closed-loop, on the whole-pool calibration."""
    base = dict(interval=3, schedule="uniform", dec=False)
    vs = [Variant("fp", "full precision", None),
          Variant("all", "every pool entry, ranges per step", dict(base))]
    for shared in (False, True):
        tag, label = ("-shared", "shared ranges") if shared else ("", "ranges per step")
        extra = dict(per_step_act=False) if shared else {}
        if shared:
            vs.append(Variant("all-shared", "every pool entry, shared ranges", dict(base, **extra)))
        for n in (256, 800):
            for m, slug, name in (("uniform-per-step", "uniform", "uniform per step"), ("tap", "tap", "TAP"),
                                  ("tap-per-step", "tap-per-step", "TAP per step"), ("random", "random", "random")):
                if not (shared and m == "random"):
                    vs.append(Variant(f"{slug}-{n}{tag}", f"{name}, {n} entries, {label}",
                                      dict(base, calibration=m, calib_select=n, **extra)))
    vs += [Variant("vc-open", "every pool entry + VC fitted teacher-forced (Q&C)", dict(base, vc=True)),
           Variant("vc-closed", "every pool entry + VC fitted closed-loop", dict(base, vc=True, vc_fit="closed"))]
    return vs


def _vc_variants() -> list[Variant]:
    """VC under a stochastic sampler: the same rows as the fair table's VC rows."""
    base = dict(interval=3, schedule="uniform", dec=False)
    return [Variant("fp", "full precision", None),
            Variant("all", "cache N=3 + W8A8, every pool entry", dict(base)),
            Variant("vc-open", "+ VC fitted teacher-forced (Q&C)", dict(base, vc=True)),
            Variant("vc-closed", "+ VC fitted closed-loop", dict(base, vc=True, vc_fit="closed"))]


TABLES: dict[str, Table] = {
    "unet": Table("unet", "CIFAR-10 UNet, DDIM 100 steps", "cifar10-unet", "ddim", 100, None,
                  _cache_quant_variants([5, 10, 20], [10, 20], w4=True, dec_halves=(10,))),
    "dit-ddpm250": Table("dit-ddpm250", "CIFAR-10 DiT, DDPM 250 steps, guidance 1.5", "cifar10-dit", "ddpm", 250, 1.5,
                         _cache_quant_variants([2, 3, 5], [2, 3], w4=False, shift_dec=(2, 3))),
    "dit-ddim50": Table("dit-ddim50", "CIFAR-10 DiT, DDIM 50 steps, guidance 1.5", "cifar10-dit", "ddim", 50, 1.5,
                        _cache_quant_variants([2, 3, 5], [2, 3], w4=False)),
    "mmdit-euler28": Table("mmdit-euler28", "CIFAR-10 MMDiT (rectified flow), Euler 28 steps, guidance 1.5",
                           "cifar10-mmdit", "flow-euler", 28, 1.5,
                           _cache_quant_variants([2, 3], [2, 3], w4=False) + _float_attention_variants([3])
                           + _e4m3_probs_variants([3])),
    "qandc": Table("qandc", "Q&C ablations: CIFAR-10 DiT, DDIM 50 steps, N = 3, W8A8, guidance 1.5", "cifar10-dit",
                   "ddim", 50, 1.5, _qandc_variants()),
    "qandc-fair": Table("qandc-fair", "Q&C at equal budgets: CIFAR-10 DiT, DDIM 50 steps, N = 3, W8A8, guidance 1.5",
                        "cifar10-dit", "ddim", 50, 1.5, _qandc_fair_variants()),
    "qandc-vc-ddpm250": Table("qandc-vc-ddpm250",
                              "VC under DDPM: CIFAR-10 DiT, DDPM 250 steps, N = 3, W8A8, guidance 1.5",
                              "cifar10-dit", "ddpm", 250, 1.5, _vc_variants()),
    "qandc-unet": Table("qandc-unet", "Q&C on the UNet: CIFAR-10 UNet, DDIM 100 steps, N = 10, W8A8", "cifar10-unet",
                        "ddim", 100, None, _qandc_unet_variants()),
}

REPORT_FILES = {"ablation": ["unet", "dit-ddpm250", "dit-ddim50", "mmdit-euler28"],
                "qandc": ["qandc", "qandc-unet", "qandc-fair", "qandc-vc-ddpm250"]}

REPORT_TITLES = {"ablation": "CacheQuant ablation on the CIFAR-10 models",
                 "qandc": "Q&C ablations on the CIFAR-10 DiT (DDIM 50, N = 3, W8A8)"}


def gather_table(work: Path, table: Table, env: dict | None = None) -> dict:
    """One JSON with every variant's info + metrics + status, and the environment."""
    tdir = work / table.name
    status = read_json(tdir / "sample-status.json") or {}
    rows = []
    for v in table.variants:
        vdir = tdir / v.slug
        info = read_json(vdir / "info.json")
        shared_info = None
        if info and "same_as" in info:
            shared_info = read_json(work / info["same_as"] / "info.json")
        rows.append({"variant": v.slug, "label": v.label, "info": info, "shared_info": shared_info,
                     "metrics": read_json(vdir / "metrics.json"), "error": read_json(vdir / "error.json"),
                     "skipped_time_budget": v.slug in status.get("skipped_time_budget", [])})
    return {"table": table.name, "title": table.title, "model": table.model, "scheduler": table.scheduler,
            "default_steps": table.steps, "guidance_scale": table.guidance_scale, "sample_status": status,
            "metrics_environment": env, "rows": rows}


def table_commands(datas: list[dict]) -> list[str]:
    cmds = []
    for d in datas:
        st = d.get("sample_status") or {}
        if st.get("environment", {}).get("command"):
            cmds.append(st["environment"]["command"])
        me = d.get("metrics_environment") or {}
        if me.get("command"):
            cmds.append(me["command"])
    return cmds


def _row_done(row: dict) -> bool:
    return bool(row.get("info") and row["info"].get("status") == "done")


def _fp_key(data: dict) -> tuple[str | None, str | None]:
    """(full-precision samples' SHA-1, reference statistics' SHA-1) that a table's metrics used."""
    fps, refs = set(), set()
    for r in data["rows"]:
        key = (r.get("metrics") or {}).get("key") or {}
        if key.get("fp_sha1"):
            fps.add(key["fp_sha1"])
        if (key.get("reference") or {}).get("sha1"):
            refs.add(key["reference"]["sha1"])
    if len(fps) > 1 or len(refs) > 1:
        raise ValueError(f"table {data['table']}: its rows were measured against different full-precision samples "
                         f"{sorted(fps)} or reference statistics {sorted(refs)}")
    return (fps.pop() if fps else None, refs.pop() if refs else None)


def merge_table_jsons(datas: list[dict]) -> list[dict]:
    """Join the ``<table>.json`` files of several runs (sessions) into one table per name.

    A table sampled over several sessions on fresh machines has each variant's row in one run's
    file. Rows are comparable only when every run measured PSNR / SSIM against the same
    full-precision samples and FID against the same reference statistics (the SHA-1s in each
    ``metrics.json`` key); otherwise this refuses. A variant measured in several runs must have
    produced the same samples (same SHA-1); the later run's row is kept."""
    merged: dict[str, dict] = {}
    for d in datas:
        if not isinstance(d, dict) or d.get("table") not in TABLES or not isinstance(d.get("rows"), list):
            raise ValueError("not a table JSON written by `ablation.py metrics`/`report` (needs 'table' and 'rows')")
        name = d["table"]
        if name not in merged:
            merged[name] = {**d, "rows": [dict(r) for r in d["rows"]], "merged_commands": table_commands([d])}
            _fp_key(merged[name])
            continue
        base = merged[name]
        for attr in ("model", "scheduler", "default_steps", "guidance_scale"):
            if base.get(attr) != d.get(attr):
                raise ValueError(f"table {name}: runs differ in {attr} ({base.get(attr)!r} vs {d.get(attr)!r})")
        a, b = _fp_key(base), _fp_key(d)
        for what, x, y in (("full-precision samples", a[0], b[0]), ("reference statistics", a[1], b[1])):
            if x and y and x != y:
                raise ValueError(f"table {name}: the runs' {what} differ (SHA-1 {x} vs {y}): their PSNR / FID "
                                 "are not comparable; re-sample the variants in one run")
        rows = {r["variant"]: i for i, r in enumerate(base["rows"])}
        for r in d["rows"]:
            if not _row_done(r):
                continue
            i = rows.get(r["variant"])
            if i is None:
                base["rows"].append(dict(r))
                continue
            old = base["rows"][i]
            sa = ((old.get("metrics") or {}).get("key") or {}).get("samples_sha1")
            sb = ((r.get("metrics") or {}).get("key") or {}).get("samples_sha1")
            if sa and sb and sa != sb:
                raise ValueError(f"table {name}, variant {r['variant']}: two runs produced different samples "
                                 f"(SHA-1 {sa} vs {sb})")
            if r.get("metrics") or not old.get("metrics"):
                base["rows"][i] = dict(r)
        base["merged_commands"] += [c for c in table_commands([d]) if c not in base["merged_commands"]]
        st = dict(base.get("sample_status") or {})
        st.setdefault("num_samples", (d.get("sample_status") or {}).get("num_samples"))
        base["sample_status"] = st
    for d in merged.values():  # the table's own variant order; rows of variants it no longer has go last
        rank = {v.slug: i for i, v in enumerate(TABLES[d["table"]].variants)}
        d["rows"].sort(key=lambda r: rank.get(r["variant"], len(rank)))
    order = {t: i for i, t in enumerate(TABLES)}
    return sorted(merged.values(), key=lambda d: order[d["table"]])
