"""Carries one sampled variant of an ablation table (its ``samples.npz`` and ``info.json``) from one
device session to the next.

Why: every session gets a fresh machine, and a table's PSNR / SSIM column needs the full-precision
samples of the same seeds. For the DiT DDPM 250 table, re-sampling ``fp`` costs ~7 of a session's
30 device-minutes. Its samples (10,000 CIFAR images, ~31 MB) fit through ``$OUT`` in two parts
instead, and travel back in a later session's call.

    # on the device, at the end of a session: parts + manifest into $OUT/carry
    python3 benchmarks/device/carry_variant.py export --work /root/cqp/abl --table dit-ddpm250 --variant fp --out $OUT/carry
    # locally: copy the returned files to .carry/ (git-ignored); a later call carries .carry, and
    # benchmarks/device/setup.sh runs
    python3 benchmarks/device/carry_variant.py import --work /root/cqp/abl --parts .carry

``import`` checks the SHA-1 of the joined file against the manifest, writes ``samples.npz`` before
``info.json`` (so a cut import is never taken for a finished variant), and refuses to replace a
finished variant whose samples differ. ``ablation.py sample`` then skips the variant only if its
run key equals the one the current arguments give.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness

from harness.io import file_hash as _sha1  # noqa: E402 - the SHA-1 the metrics keys use


def export_variant(work: Path, table: str, variant: str, out: Path, part_bytes: int = 15 << 20) -> Path:
    """Splits ``work/table/variant/samples.npz`` into parts of ``part_bytes`` plus a manifest."""
    vdir = work / table / variant
    info_path, samples = vdir / "info.json", vdir / "samples.npz"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    if not info or info.get("status") != "done" or "same_as" in info or not samples.is_file():
        raise SystemExit(f"export: {vdir} holds no finished samples of its own (info.json status 'done' "
                         "and samples.npz); sample it first")
    if part_bytes < 1:
        raise SystemExit(f"export: part size must be positive, got {part_bytes}")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{table}-{variant}"
    names = []
    with open(samples, "rb") as f:
        while True:
            chunk = f.read(part_bytes)
            if not chunk:
                break
            name = f"{stem}.samples.part{len(names):02d}"
            (out / name).write_bytes(chunk)
            names.append(name)
    manifest = {"table": table, "variant": variant, "info": info, "samples_sha1": _sha1(samples),
                "bytes": samples.stat().st_size, "parts": names}
    path = out / f"{stem}.manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


def import_variants(work: Path, parts: Path) -> list[str]:
    """Restores every variant whose manifest is in ``parts``; returns what it did, one line each."""
    from cachequant.utils.io import atomic_path

    manifests = sorted(parts.glob("*.manifest.json"))
    if not manifests:
        raise SystemExit(f"import: no *.manifest.json in {parts}")
    done = []
    for mpath in manifests:
        m = json.loads(mpath.read_text())
        vdir = work / m["table"] / m["variant"]
        label = f"{m['table']}/{m['variant']}"
        missing = [p for p in m["parts"] if not (parts / p).is_file()]
        if missing:
            raise SystemExit(f"import {label}: parts missing from {parts}: {', '.join(missing)}")
        old = vdir / "samples.npz"
        info_path = vdir / "info.json"
        if info_path.is_file() and old.is_file() and json.loads(info_path.read_text()).get("status") == "done":
            if _sha1(old) == m["samples_sha1"]:
                done.append(f"{label}: already there")
                continue
            raise SystemExit(f"import {label}: {vdir} already holds different samples; move it away to import")
        vdir.mkdir(parents=True, exist_ok=True)
        info_path.unlink(missing_ok=True)  # not done until the samples are complete
        with atomic_path(old) as tmp:
            with open(tmp, "wb") as f:
                for p in m["parts"]:
                    f.write((parts / p).read_bytes())
            if _sha1(tmp) != m["samples_sha1"]:
                raise SystemExit(f"import {label}: the joined parts do not match the manifest's SHA-1 "
                                 "(a part is damaged or from another export)")
        with atomic_path(info_path) as tmp:
            tmp.write_text(json.dumps({**m["info"], "imported_from": str(mpath)}, indent=1))
        done.append(f"{label}: imported ({m['bytes']} bytes, {len(m['parts'])} parts)")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="samples of one variant → parts + manifest")
    e.add_argument("--work", required=True)
    e.add_argument("--table", required=True)
    e.add_argument("--variant", default="fp")
    e.add_argument("--out", required=True)
    e.add_argument("--part-mib", type=int, default=15, help="part size (the device returns files ≤ 16 MiB)")
    i = sub.add_parser("import", help="parts + manifests → the work folder")
    i.add_argument("--work", required=True)
    i.add_argument("--parts", required=True)
    a = p.parse_args(argv)
    if a.cmd == "export":
        print(f"written {export_variant(Path(a.work), a.table, a.variant, Path(a.out), a.part_mib << 20)}")
    else:
        for line in import_variants(Path(a.work), Path(a.parts)):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
