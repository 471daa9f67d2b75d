"""The environment recorded with every result (numbers without it are not reproducible)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def environment(device: str) -> dict:
    """Versions and device, recorded with every result (numbers without them are not reproducible)."""
    import diffusers
    import torch

    import cachequant as cq

    if device.startswith("cuda") and torch.cuda.is_available():
        dev_name = torch.cuda.get_device_name(torch.device(device))
    else:
        from cachequant.utils.cpus import usable_cpus

        dev_name = f"CPU ({platform.processor() or platform.machine()}, {usable_cpus()} usable cores)"
    return {"device": dev_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cachequant": cq.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "command": " ".join([Path(sys.executable).name] + sys.argv)}


def timing_environment(device: str) -> dict:
    """The ``env`` of a timing result: the GPU, versions, the command, and the environment
    settings that change what a row measures."""
    import torch

    env = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (--tiny smoke test)",
           "torch": torch.__version__, "python": platform.python_version(),
           "command": " ".join(sys.argv),
           # the environment settings that change what a row measures: inductor's caches and compile
           # threads (whether a seeded tuning applies: results/speed/README.md), cachequant's
           # kernel choices (CACHEQUANT_FP8_GEMM, CACHEQUANT_TILES) and the device scripts' seed
           "settings": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith(("TORCHINDUCTOR_", "CACHEQUANT_", "CQ_"))}}
    if device == "cuda":
        import torch._inductor.config as inductor_config

        env["inductor_compile_threads"] = inductor_config.compile_threads
    for mod in ("triton", "diffusers", "torchao"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"unavailable ({type(e).__name__}: {e})"
    return env
