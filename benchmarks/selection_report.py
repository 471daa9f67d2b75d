"""What decided each calibration selection: clusters, TAP's candidates, random top-up, and how much
the selections of different methods / λ values differ. Runs the Q&C table's calibration (cifar10-dit,
DDIM 50, guidance 1.5, N = 3, W8A8, 32 trajectories, 256 selected) once per setting.

    python benchmarks/selection_report.py --device cpu --settings tap:0.3 tap:0.7 dbscan [--out sel.json]

Each setting is ``method`` or ``tap:λ``. On 2 CPU cores one setting takes about 1.5 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _environment(device: str) -> dict:
    import platform

    import diffusers
    import torch

    import cachequant as cq
    from cachequant.utils.cpus import usable_cpus

    dev = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({usable_cpus()} usable cores)"
    return {"device": dev, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cachequant": cq.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    from cachequant.cli.common import add_weights_option

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10-dit")
    add_weights_option(p)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--settings", nargs="+", default=["tap:0.3", "tap:0.7", "dbscan"])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-select", type=int, default=256)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import cachequant as cq
    from cachequant.cli.common import load_pipeline
    from cachequant.pipecall import conditioning, num_classes

    pipe = load_pipeline(a.model, a.device, "ddim", a.weights)
    pipe.set_progress_bar_config(disable=True)
    kw = ({"class_labels": [i % num_classes(pipe) for i in range(a.calib_samples)],
           "pipeline_kwargs": {"guidance_scale": 1.5}} if conditioning(pipe) == "class"
          else {"num_samples": a.calib_samples})
    rows = []
    for setting in a.settings:
        method, _, lam = setting.partition(":")
        cfg = cq.CacheQuantConfig(interval=3, schedule="uniform", dec=False, calibration=method,
                                  tap_lambda=float(lam) if lam else 0.5, num_calib_samples=a.calib_samples,
                                  calib_batch_size=a.calib_samples, dps_samples=8, calib_select=a.calib_select)
        t0 = time.time()
        plan = cq.calibrate(pipe, cfg, num_inference_steps=a.steps, progress=False, **kw)
        sel = plan.diagnostics["calibration_selection"]
        rows.append({"setting": setting, "seconds": time.time() - t0,
                     **{k: v for k, v in sel.items() if k not in ("per_step",)}})
        print(f"{setting}: pool {sel['pool']}, clusters {sel.get('clusters', '–')}, TAP candidates "
              f"{sel.get('candidates', '–')}, random top-up {sel.get('random_top_up', '–')}", flush=True)
    print("\nentries selected by one setting and not the other (of", a.calib_select, "):")
    for i, r in enumerate(rows):
        for s in rows[i + 1:]:
            diff = len(set(r["selected_entries"]) ^ set(s["selected_entries"])) // 2
            print(f"  {r['setting']} vs {s['setting']}: {diff}")
    if a.out:
        from cachequant.utils.io import atomic_path

        with atomic_path(a.out) as tmp:
            Path(tmp).write_text(json.dumps({"command": " ".join(sys.argv), "environment": _environment(a.device),
                                             "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
