"""Where torch.compile's warm-up goes for a torchao-quantized denoiser: tracing or code generation.

Compiling the torchao int8 / float8 DiT-XL/2 took 242 s / 183 s on the H200, and the SD 1.5 UNet's
did not finish in a 560 s device call (results/speed/README.md), against 9 s and 73 s for the
same models in fp16. This script times one denoiser call of the full-size architecture (random
weights, the inputs its pipeline passes at the first step):

- eager, the float model (the second of two calls);
- the first and second call of ``torch.compile(model, backend=...)``, float and torchao-quantized
  (``--quant int8``: every Linear with more than 16 rows, as in speed.py's torchao rows).

With ``--backend aot_eager`` the first call is dynamo's and AOTAutograd's tracing plus one eager
run, without inductor's code generation: on any machine, it tells how much of the warm-up the
tracing alone takes. ``torch._dynamo.utils.compile_times()`` is saved too.

    python benchmarks/compile_time.py --model sd15 --quant none int8 --backend aot_eager \\
        --out results/compile/compile-time-sd15-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachequant.pipecall import call_pipeline  # noqa: E402
from harness.io import write_json  # noqa: E402
from harness.models import build, call_kwargs, denoiser, torchao_filter  # noqa: E402
from harness.timing import sync  # noqa: E402


def first_call_inputs(pipe, model: str, batch: int, tiny: bool) -> tuple[tuple, dict]:
    """The positional and keyword arguments of the denoiser's first call in a real pipeline run."""
    seen: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        if not seen:
            seen.append((args, kwargs))

    h = denoiser(pipe).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            call_pipeline(pipe, **{**call_kwargs(model, batch, 1, tiny), "output_type": "latent"})
    finally:
        h.remove()
    return seen[0]


def timed(fn) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    sync("cuda" if torch.cuda.is_available() else "cpu")
    return time.perf_counter() - t0


def measure(m: torch.nn.Module, args: tuple, kwargs: dict, backend: str) -> dict:
    from torch._dynamo.utils import compile_times, counters

    torch._dynamo.reset()
    counters.clear()
    c = torch.compile(m, backend=backend)
    first = timed(lambda: c(*args, **kwargs))
    second = timed(lambda: c(*args, **kwargs))
    return {"first_call_s": first, "second_call_s": second, "dynamo_graphs": counters["stats"]["unique_graphs"],
            "dynamo_graph_breaks": sum(counters["graph_break"].values()), "compile_times": compile_times(repr="str")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["sd15", "dit-xl2"], default="sd15")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quant", nargs="+", choices=["none", "int8", "fp8"], default=["none", "int8"])
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend: aot_eager (tracing only), inductor")
    ap.add_argument("--tiny", action="store_true", help="small configs: a smoke test of this script")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "fp8" in a.quant and device != "cuda":
        ap.error("--quant fp8 needs a CUDA GPU (torchao's float8 dynamic quantization refuses the CPU)")
    try:
        import torchao
    except ImportError:
        if set(a.quant) != {"none"}:
            ap.error(f"--quant {' '.join(q for q in a.quant if q != 'none')} needs torchao: "
                     "pip install torchao (or pass --quant none)")
        torchao = None
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    res: dict = {"env": {"device": torch.cuda.get_device_name() if device == "cuda" else
                         f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
                         "torchao": torchao.__version__ if torchao else "not installed", "python": platform.python_version(),
                         "command": " ".join(sys.argv)},
                 "model": a.model, "batch": a.batch, "backend": a.backend, "rows": []}
    pipe = build(a.model, "ddim" if a.model == "dit-xl2" else "pndm", device, a.tiny)
    args, kwargs = first_call_inputs(pipe, a.model, a.batch, a.tiny)
    base = denoiser(pipe)
    timed(lambda: base(*args, **kwargs))
    res["eager_float_call_s"] = timed(lambda: base(*args, **kwargs))
    for q in a.quant:
        m = base
        row: dict = {"quant": q}
        if q != "none":
            from torchao.quantization import quantize_

            if q == "int8":
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig as C
            else:
                from torchao.quantization import Float8DynamicActivationFloat8WeightConfig as C
            keep, info = torchao_filter(pipe, a.model, a.batch, a.tiny)
            m = copy.deepcopy(base)
            quantize_(m, C(), filter_fn=keep)
            row.update(info)
        row.update(measure(m, args, kwargs, a.backend))
        res["rows"].append(row)
        print(f"{a.model} {q:5s} {a.backend}: first call {row['first_call_s']:.1f} s, "
              f"second {row['second_call_s']:.2f} s, {row['dynamo_graphs']} graphs, "
              f"{row['dynamo_graph_breaks']} breaks", flush=True)
        write_json(out, res, default=None)
    print(f"eager float call: {res['eager_float_call_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
