"""Why FP8 costs more quality than INT8, and why a better range cannot buy it back.

The FP8 backends quantize with e4m3 (3 mantissa bits): a floating-point grid whose relative step
is the same at every magnitude, so its signal-to-quantization-noise ratio (SQNR) is about the same
whatever the scale, as long as nothing saturates or underflows. A uniform 8-bit grid with a
searched range spends its 256 levels on the bulk of a near-Gaussian tensor instead. This measures
both, in dB (10·log10 of signal power over error power), on

- the shipped models' weights (every Linear / conv weight of ``cifar10-dit`` and ``cifar10-unet``):
  INT8 per output channel with the L_p-searched range (the reference and INT8 kernels), e4m3 with
  one scale per layer (cuBLASLt, what ``backend="auto"`` runs on Hopper) and one per output channel
  (the Triton FP8 GEMM);
- activation-like tensors (Gaussian, Laplace, GELU outputs, a few outlier channels): INT8 per
  tensor with :func:`~cachequant.quant.quantizer.activation_range`, e4m3 at the scale the FP8
  backend derives from that range, at the tensor's absolute maximum, and at the best of a grid of
  scales (an FP8-aware range search could do no better than that).

and, with ``--layer-outputs``, on the error each layer's *output* gets from quantizing its weight
or its input alone, with the shipped DiT's real activations: the Hessian for GPTQ is accumulated
while sampling with one seed and the outputs are judged on the inputs of a second run (other
seed, other classes), so a rounding that fits its own data is not credited. Weights: e4m3 rounded
to nearest, e4m3 with GPTQ's error feedback (Frantar et al. 2022, Alg. 1, on the e4m3 grid), INT8
per channel; inputs: e4m3 and INT8 with one range per call (per step, as the plans calibrate).

No GPU: a few minutes on a CPU (`--layer-outputs` samples 2 × 4 images, 20 DDIM steps).

    python benchmarks/fp8_sqnr.py --layer-outputs --out results/quality/fp8-sqnr.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachequant.quant.gptq import gptq_columns  # noqa: E402
from cachequant.quant.quantizer import E4M3_MAX as FP8_MAX  # noqa: E402
from cachequant.quant.quantizer import activation_range, fake_quant, params_from_range, weight_qparams  # noqa: E402
from cachequant.quant.quantizer import e4m3_round as e4m3  # noqa: E402  (the FP8 backends' rounding)
from cachequant.utils.io import atomic_path  # noqa: E402

SCALE_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)  # fractions of the absolute maximum mapped to ±448


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).mean() / (x - xq).pow(2).mean().clamp_min(1e-30)))


def weight_row(w: torch.Tensor) -> dict:
    w = w.detach().float()
    flat = w.reshape(w.shape[0], -1)
    s, z = weight_qparams(w, 8)
    amax_c = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    return {"int8_per_channel": sqnr_db(w, fake_quant(w, s, z, 8)),
            "e4m3_per_tensor": sqnr_db(flat, e4m3(flat, flat.abs().max().clamp_min(1e-12) / FP8_MAX)),
            "e4m3_per_channel": sqnr_db(flat, e4m3(flat, amax_c / FP8_MAX))}


def activation_row(x: torch.Tensor) -> dict:
    lo, hi = activation_range(x, 8)
    s, z = params_from_range(torch.tensor(lo), torch.tensor(hi), 8)
    amax = float(x.abs().max())
    grid = {f: sqnr_db(x, e4m3(x, amax * f / FP8_MAX)) for f in SCALE_GRID}
    best = max(grid, key=grid.get)
    return {"int8_searched_range": sqnr_db(x, fake_quant(x, s, z, 8)),
            "e4m3_at_int8_range": sqnr_db(x, e4m3(x, max(-lo, hi) / FP8_MAX)),
            "e4m3_at_amax": grid[1.0], "e4m3_best_scale": grid[best], "best_fraction_of_amax": best}


def activations(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (4, 256, 240)  # (batch, tokens, channels) of the shipped DiT's Linear inputs
    gauss = torch.randn(shape, generator=g)
    outliers = gauss.clone()
    outliers[..., :3] *= 20
    laplace = torch.sign(torch.rand(shape, generator=g) - 0.5) * -torch.log(torch.rand(shape, generator=g))
    return {"gaussian": gauss, "laplace": laplace,
            "gelu(2·gaussian)": torch.nn.functional.gelu(2 * torch.randn(shape, generator=g)),
            "gaussian, 3 channels ×20": outliers}


def model_weights(name: str, folder: str | None = None) -> dict[str, torch.Tensor]:
    """The zoo model's ≥ 2-d weights: the shipped ones, or those in ``folder`` (``--weights``)."""
    from safetensors.torch import load_file

    import cachequant as cq

    path = (cq.zoo.check_weights(name, folder) if folder else cq.zoo.WEIGHTS / name) / \
        "diffusion_pytorch_model.safetensors"
    return {k: v for k, v in load_file(str(path)).items() if k.endswith(".weight") and v.dim() >= 2}


def gptq_e4m3(weight: torch.Tensor, hessian: torch.Tensor, scale: float, damp: float = 0.01,
              block: int = 128) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022, Alg. 1) with e4m3 at ``scale`` as the grid: the error feedback of
    :func:`~cachequant.quant.gptq.gptq_columns`, only the rounding differs. Dequantized weights
    (float64)."""
    def to_grid(col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = e4m3(col, scale).double()
        return q, q

    return gptq_columns(weight.detach().double(), hessian, to_grid, damp, block)


def capture_dit(steps: int = 20, weights: str | None = None) -> tuple[dict, dict, dict]:
    """The shipped DiT's Linear layers, their GPTQ Hessians from a run with seed 0 (classes 0–3),
    and their inputs, call by call, from a run with seed 1 (classes 5–8)."""
    import cachequant as cq
    from cachequant.quant.gptq import HessianAccumulator

    pipe = cq.zoo.load_pipeline("cifar10-dit", weights=weights)
    layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    acc = {n: HessianAccumulator(m, positions=512) for n, m in layers.items()}
    held: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    phase = ["fit"]

    def pre(name):
        def hook(_, inputs):
            x = inputs[0].detach().float()
            if phase[0] == "fit":
                acc[name].add(x)
            else:
                held[name].append(x.reshape(-1, x.shape[-1])[::4].half())  # every 4th row: memory
        return hook

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for ph, classes, seed in (("fit", [0, 1, 2, 3], 0), ("held-out", [5, 6, 7, 8], 1)):
                phase[0] = ph
                pipe(class_labels=classes, num_inference_steps=steps, guidance_scale=1.5, output_type="np",
                     generator=torch.Generator().manual_seed(seed))
    finally:
        for h in handles:
            h.remove()
    return layers, {n: a.hessian() for n, a in acc.items()}, held


def layer_output_row(weight: torch.Tensor, hessian: torch.Tensor, calls: list[torch.Tensor]) -> dict:
    """Output SQNR of one Linear over held-out calls, with only its weight or only its input quantized."""
    w = weight.detach().double()
    s = float(w.abs().max()) / FP8_MAX
    sc, z = weight_qparams(weight.detach().float(), 8)
    weights = {"w_e4m3_nearest": e4m3(w, s), "w_e4m3_gptq": gptq_e4m3(w, hessian, s),
               "w_int8_per_channel": fake_quant(weight.detach().float(), sc, z, 8)}
    weights = {k: v.double() for k, v in weights.items()}
    num = {k: 0.0 for k in (*weights, "x_e4m3", "x_int8")}
    sig = 0.0
    for x in calls:
        x = x.double()
        y = x @ w.t()
        sig += float(y.pow(2).sum())
        for k, wq in weights.items():
            num[k] += float((y - x @ wq.t()).pow(2).sum())
        lo, hi = activation_range(x, 8)  # one range per call: a per-step static range, fitted on it
        sx, zx = params_from_range(torch.tensor(lo), torch.tensor(hi), 8)
        num["x_int8"] += float((y - fake_quant(x.float(), sx, zx, 8).double() @ w.t()).pow(2).sum())
        num["x_e4m3"] += float((y - e4m3(x, max(-lo, hi) / FP8_MAX).double() @ w.t()).pow(2).sum())
    return {k: 10 * math.log10(sig / max(v, 1e-300)) for k, v in num.items()}


def summary(rows: dict[str, dict]) -> dict:
    keys = next(iter(rows.values())).keys()
    out = {}
    for k in keys:
        v = torch.tensor([r[k] for r in rows.values()])
        out[k] = {"median": float(v.median()), "min": float(v.min()), "max": float(v.max())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["cifar10-dit", "cifar10-unet"])
    p.add_argument("--layer-outputs", action="store_true",
                   help="also the per-layer output error on the shipped DiT's real activations (a few minutes)")
    p.add_argument("--weights", action="append", default=[], metavar="MODEL=DIR",
                   help="other weights for a zoo model (repeatable), e.g. "
                        "cifar10-dit=results/training/weights/cifar10-dit-1.6M")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import cachequant as cq

    other = dict(w.split("=", 1) for w in a.weights if "=" in w)
    if len(other) != len(a.weights) or set(other) - set(a.models):
        p.error(f"--weights takes MODEL=DIR for a model of --models ({', '.join(a.models)}), not {a.weights}")
    result = {"weights": {}, "activations": {}, "torch": torch.__version__,
              "weights_sha1": {m: r["weights_sha1"] for m in a.models
                               if (r := cq.zoo.weights_record(m, other.get(m)))}}
    print("SQNR in dB (higher is better)\n\n| weights | layers | INT8 per channel | e4m3 per tensor | e4m3 per channel |"
          "\n|---|---|---|---|---|")
    for m in a.models:
        rows = {k: weight_row(w) for k, w in model_weights(m, other.get(m)).items()}
        s = summary(rows)
        result["weights"][m] = {"layers": rows, "summary": s}
        print(f"| {m} | {len(rows)} | " + " | ".join(
            f"{s[k]['median']:.1f} ({s[k]['min']:.1f}–{s[k]['max']:.1f})"
            for k in ("int8_per_channel", "e4m3_per_tensor", "e4m3_per_channel")) + " |")
    print("\n| activation | INT8, searched range | e4m3 at that range | e4m3 at abs max | e4m3, best scale |"
          "\n|---|---|---|---|---|")
    for name, x in activations().items():
        r = activation_row(x)
        result["activations"][name] = r
        print(f"| {name} | {r['int8_searched_range']:.1f} | {r['e4m3_at_int8_range']:.1f} | {r['e4m3_at_amax']:.1f} | "
              f"{r['e4m3_best_scale']:.1f} (×{r['best_fraction_of_amax']}) |")
    if a.layer_outputs:
        layers, hessians, held = capture_dit(weights=other.get("cifar10-dit"))
        rows = {n: layer_output_row(m.weight, hessians[n], held[n]) for n, m in layers.items() if held[n]}
        s = summary(rows)
        result["layer_outputs"] = {"model": "cifar10-dit", "layers": rows, "summary": s}
        cols = ("w_e4m3_nearest", "w_e4m3_gptq", "w_int8_per_channel", "x_e4m3", "x_int8")
        print(f"\n| cifar10-dit Linear outputs ({len(rows)} layers, held-out inputs) | " + " | ".join(cols) + " |\n|---"
              + "|---" * len(cols) + "|")
        print("| median (min–max) | " + " | ".join(f"{s[k]['median']:.1f} ({s[k]['min']:.1f}–{s[k]['max']:.1f})"
                                                for k in cols) + " |")
    if a.out:
        with atomic_path(Path(a.out)) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1))
        print(f"\nwritten {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
