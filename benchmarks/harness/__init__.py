"""The benchmarks' shared harness: plain modules that the study scripts of ``benchmarks/`` import
(a script never imports another script).

- ``io``: JSON written atomically (``cachequant.utils.io.atomic_path``), read back, file SHA-1;
- ``env``: the environment (device, versions, command) recorded with every result;
- ``timing``: device sync, timed pipeline runs with a warm-up limit, a stack sampler, graph-replayed
  kernel timings;
- ``models``: the full-size (or ``--tiny``) random-weight SD 1.5 / DiT-XL/2 pipelines, their call
  arguments, plans calibrated once per process, torchao's Linear filter;
- ``tables``: the quality study's tables and variants, a table's JSON gathered and runs merged;
- ``sampling``: the zoo loader, run keys, resumable OOM-safe sampling of one variant;
- ``metrics``: FID / precision / recall / PSNR / SSIM of a table's variants, device and CPU parts;
- ``render``: a table's markdown rows, the report and its plots.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # the cachequant package of this checkout
    sys.path.insert(0, _ROOT)
