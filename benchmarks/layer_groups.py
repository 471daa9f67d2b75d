"""Where a calibrated plan's quantization error comes from: the same plan with only one group of
layers quantized, or with one group left float, each sampled from the same seeds and judged by
PSNR / SSIM against full precision.

A group is a regular expression over layer and attention-module names. No calibration is repeated:
a variant is the plan with the other layers' entries (``LayerSpec``, weight and activation tables)
removed, so every variant quantizes its layers exactly as the whole plan does. Each variant is
sampled by ``cachequant evaluate`` (resumable: a variant with metrics is not sampled again).

    python benchmarks/layer_groups.py --model cifar10-dit --scheduler ddim --steps 50 --guidance-scale 1.5 \\
        --plan w8a8=W/w8a8/plan.cqplan --plan naive-n3=W/naive-n3/plan.cqplan \\
        --only 'patch embedding=^pos_embed' --only 'output layers=^proj_out' \\
        --float 'first and last=^(pos_embed|proj_out)' --fp-dir W/fp --work /tmp/groups --out groups.json

``--only`` variants are made from the first ``--plan`` (a quant-only plan says where the error of
quantization alone sits); ``--float`` variants from every plan, or from the plans named before the
group (``--float 'w8a8:pe=^pos_embed'``). PSNR on a few images is a proxy: it ranks, it does not
replace a 10k-sample FID.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def restrict(plan, keep) -> tuple[object, list[str]]:
    """``plan`` quantizing only the layers and attention modules for which ``keep(name)`` holds;
    returns it and the names left float."""
    layers = tuple(s for s in plan.quant.layers if keep(s.name))
    attn = tuple(m for m in plan.quant.attention if keep(m))
    gone = ({s.name for s in plan.quant.layers} - {s.name for s in layers}) | (set(plan.quant.attention) - set(attn))
    for key in list(plan.tensors):
        kind, _, rest = key.partition(".")
        if kind in ("w", "act", "attn", "qdec") and rest.removesuffix(".codes") in gone:
            del plan.tensors[key]
    plan.quant = dataclasses.replace(plan.quant, layers=layers, attention=attn)
    return plan, sorted(gone)


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise SystemExit(f"{what} takes NAME=VALUE, got {text!r}")
    return name, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", default=None, help="other weights for the zoo model (as evaluate --weights)")
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--guidance-scale", type=float, default=None)
    ap.add_argument("--plan", action="append", required=True, help="LABEL=PATH (repeatable; the first one "
                    "gives the --only variants)")
    ap.add_argument("--only", action="append", default=[], help="NAME=REGEX: the first plan, only these quantized")
    ap.add_argument("--float", action="append", default=[], dest="floats",
                    help="[PLAN,PLAN:]NAME=REGEX: the plans (default: all) with these left float")
    ap.add_argument("--fp-dir", default=None, help="evaluate --out-dir of full precision with the same settings "
                    "(default: sampled into --work)")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from cachequant.plan import load_plan
    from cachequant.utils.io import atomic_path

    plans = dict(_pair(p, "--plan") for p in args.plan)
    for label, path in plans.items():
        if not Path(path).is_file():
            raise SystemExit(f"--plan {label}: {path} does not exist")
    variants = [(label, "whole plan", None, None) for label in plans]
    first = next(iter(plans))
    for text in args.only:
        name, rx = _pair(text, "--only")
        variants.append((first, f"only {name}", name, re.compile(rx)))
    for text in args.floats:
        scope, _, rest = text.rpartition(":") if ":" in text.split("=", 1)[0] else ("", "", text)
        name, rx = _pair(rest, "--float")
        for label in (scope.split(",") if scope else plans):
            if label not in plans:
                raise SystemExit(f"--float {text!r}: no --plan labelled {label!r}")
            variants.append((label, f"{name} float", name, re.compile(rx)))

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, "-m", "cachequant", "evaluate", "--model", args.model, "--steps", str(args.steps),
              "--backend", "fake", "--num-samples", str(args.num_samples), "--batch-size", str(args.num_samples),
              "--quiet"]
    for flag, value in (("--weights", args.weights), ("--scheduler", args.scheduler),
                        ("--guidance-scale", args.guidance_scale)):
        if value is not None:
            common += [flag, str(value)]
    fp_dir = Path(args.fp_dir) if args.fp_dir else work / "fp"
    if not (fp_dir / "samples.npz").is_file():
        subprocess.run(common + ["--out-dir", str(fp_dir)], check=True, cwd=ROOT)

    rows = []
    for label, mode, group, rx in variants:
        slug = re.sub(r"[^a-z0-9]+", "-", f"{label} {mode}".lower()).strip("-")
        vdir = work / slug
        plan = load_plan(plans[label])
        kept_float: list[str] = []
        if rx is not None:
            only = mode.startswith("only ")
            plan, kept_float = restrict(plan, (lambda n: bool(rx.search(n))) if only else (lambda n: not rx.search(n)))
        if not (vdir / "metrics.json").is_file():
            vdir.mkdir(exist_ok=True)
            plan.save(vdir / "plan.cqplan")
            t0 = time.time()
            subprocess.run(common + ["--plan", str(vdir / "plan.cqplan"), "--fp-dir", str(fp_dir),
                                     "--out-dir", str(vdir / "eval")], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
            m = json.loads((vdir / "eval" / "metrics.json").read_text())["metrics"]
            m["seconds"] = time.time() - t0
            (vdir / "metrics.json").write_text(json.dumps(m))
        m = json.loads((vdir / "metrics.json").read_text())
        m = m.get("metrics", m)
        row = {"plan": label, "variant": mode, "group": group, "regex": rx.pattern if rx else None,
               "layers_quantized": len(plan.quant.layers), "attention_quantized": len(plan.quant.attention),
               "kept_float": kept_float, "psnr_vs_fp": m["psnr_vs_fp"], "ssim_vs_fp": m["ssim_vs_fp"]}
        rows.append(row)
        print(f"{label:>12}  {mode:<32} {row['layers_quantized']:>3} layers  PSNR {row['psnr_vs_fp']:6.2f} dB")

    import torch

    out = {"model": args.model, "weights": args.weights, "scheduler": args.scheduler, "steps": args.steps,
           "guidance_scale": args.guidance_scale, "num_samples": args.num_samples, "plans": plans,
           "rows": rows, "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                         "machine": platform.machine(), "cpus": os.cpu_count()},
           "command": " ".join(sys.argv)}
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
