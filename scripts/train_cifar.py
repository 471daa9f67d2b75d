"""Trains the zoo's CIFAR-10 models (pixel-space DDPM-style UNet, class-conditional DiT and
SD3-style MMDiT) on one GPU.

    python scripts/train_cifar.py --model unet --data train.zip --out ckpt/unet --time-limit-min 8

UNet and DiT: ε-prediction, linear β 1e-4..0.02, T = 1000. MMDiT (``cifar10-mmdit``): an
``SD3Transformer2DModel`` of 7.7 M parameters trained by flow matching (x_σ = (1 − σ)·x0 + σ·ε,
target ε − x0, σ logit-normal as in SD3, timestep 1000·σ), sampled with
``FlowMatchEulerDiscreteScheduler``; the class label enters as a one-hot text token and a one-hot
pooled projection (``cachequant.zoo.pipelines.class_condition``, shared with sampling), so the checkpoint is a plain diffusers model. All:
bf16 autocast, AdamW with warm-up, EMA, random horizontal flips; 10 % of labels are dropped in
training (null class 10) for classifier-free guidance. Resumes from ``--resume`` (a checkpoint written by this script) and stops
cleanly at ``--time-limit-min``, writing the checkpoint and the fp16 EMA export.

``--init DIR`` starts instead from an fp16 EMA export (``--export``'s folder, 13–16 MB): both the
trained and the EMA weights start from it, the optimizer starts fresh with its own warm-up, and the
step count, image count and earlier runs continue from the export's ``train_info.json``. The full
checkpoint (weights, EMA and moments, ~70 MB) does not outlive a leased machine's session unless
it comes back in pieces; the export is small enough to keep in the repository
(``results/training/weights/``), so training goes on from it in any later session.

The checkpoint (``OUT/ckpt/``) is ``torch.save`` of model, EMA, optimizer and the loss curve, split
into pieces of at most 15 MiB with a SHA-256 manifest: a leased GPU returns only files of at most
16 MiB, and carries at most 64 MiB in, so a run continues on a fresh machine from pieces that went
out and came back (``--resume OUT/ckpt``). The optimizer's moments are stored in bf16, which halves
that traffic; loading casts them back to the parameters' fp32. It is rewritten every
``--save-every-min`` minutes (into a sibling folder, renamed over the old one), so a machine taken
back mid-run loses at most that much training.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from cachequant.zoo.pipelines import NUM_LABELS, class_condition as mmdit_condition  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def unet_config() -> dict:
    return dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(64, 128, 128),
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
                norm_num_groups=32, dropout=0.1)


def dit_config() -> dict:
    return dict(num_attention_heads=4, attention_head_dim=60, in_channels=3, out_channels=3, num_layers=6,
                sample_size=32, patch_size=2, num_embeds_ada_norm=10)


def mmdit_config() -> dict:
    return dict(sample_size=32, patch_size=2, in_channels=3, out_channels=3, num_layers=6, attention_head_dim=64,
                num_attention_heads=3, joint_attention_dim=NUM_LABELS, caption_projection_dim=192,
                pooled_projection_dim=NUM_LABELS, pos_embed_max_size=16)


def build(kind: str):
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DModel

    if kind == "mmdit":
        return SD3Transformer2DModel(**mmdit_config())
    return UNet2DModel(**unet_config()) if kind == "unet" else DiTTransformer2DModel(**dit_config())


def load_cifar(path: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and int64 labels (alphabetical class folders) from the JPEG zip."""
    from PIL import Image

    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))[:limit]
        imgs = np.stack([np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in names])
    labels = np.array([CLASSES.index(n.split("/")[-2]) for n in names], dtype=np.int64)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


PIECE_BYTES = 15 << 20
"""Checkpoint piece size: the device returns files of at most 16 MiB."""


def save_checkpoint(state: dict, folder: Path, piece_bytes: int = PIECE_BYTES) -> Path:
    """``torch.save(state)`` as pieces of ``piece_bytes`` plus ``manifest.json`` (SHA-256 of each
    piece and of the whole), built in a sibling folder and renamed over ``folder``: a save that is
    killed leaves the previous checkpoint whole."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pieces = []
    for start in range(0, len(data), piece_bytes):
        name, chunk = f"piece{len(pieces):02d}.bin", data[start:start + piece_bytes]
        (tmp / name).write_bytes(chunk)
        pieces.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pieces": pieces}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(path: str | Path, device: str = "cpu") -> dict:
    """A checkpoint folder written by :func:`save_checkpoint` (pieces checked against the manifest),
    or a single ``.pt`` file of the earlier format."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location=device, weights_only=True)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise SystemExit(f"--resume {path}: neither a checkpoint file nor a folder with manifest.json")
    manifest = json.loads(mpath.read_text())
    chunks = []
    for p in manifest["pieces"]:
        f = path / p["name"]
        if not f.is_file():
            raise SystemExit(f"--resume {path}: piece {p['name']} is missing; copy every piece the manifest lists")
        chunk = f.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != p["sha256"]:
            raise SystemExit(f"--resume {path}: piece {p['name']} does not match the manifest (damaged or from "
                             "another checkpoint)")
        chunks.append(chunk)
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise SystemExit(f"--resume {path}: the joined pieces do not match the manifest")
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def compact_optimizer_state(state: dict) -> dict:
    """Adam's moments in bf16 (8 mantissa bits are plenty for running averages; the step counts
    stay as they are). ``Optimizer.load_state_dict`` casts them back to the parameters' dtype."""
    out = {k: v for k, v in state.items() if k != "state"}
    out["state"] = {i: {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
                        else v for k, v in s.items()} for i, s in state["state"].items()}
    return out


def load_export(path: str | Path, kind: str, model) -> tuple[dict, dict]:
    """The fp32 state dict of an fp16 export made by ``export_fp16`` for this ``kind``, and its
    ``train_info.json`` (empty when absent). An export of another architecture is refused."""
    from safetensors.torch import load_file

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or len(files) != 1:
        raise SystemExit(f"--init {path}: expected an fp16 export (config.json and one .safetensors file), as "
                         "--export writes")
    info = json.loads((folder / "train_info.json").read_text()) if (folder / "train_info.json").is_file() else {}
    if info.get("model", kind) != kind:
        raise SystemExit(f"--init {path} holds a {info['model']} export, not --model {kind}")
    weights = {k: v.float() for k, v in load_file(str(files[0])).items()}
    own = model.state_dict()
    misfit = set(weights) ^ set(own) or {k for k in own if weights[k].shape != own[k].shape}
    if misfit:
        raise SystemExit(f"--init {path}: its weights do not fit --model {kind}'s architecture "
                         f"({len(misfit)} tensors differ in name or shape, e.g. {sorted(misfit)[0]})")
    return weights, info


def export_fp16(model, out_dir: Path) -> None:
    """The EMA model as diffusers config + fp16 safetensors."""
    model = model.to(torch.float16)
    model.save_pretrained(out_dir, safe_serialization=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["unet", "dit", "mmdit"], required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=10**9)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ema", type=float, default=0.9995)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--init", default=None, help="start from an fp16 EMA export (--export's folder) with a fresh "
                    "optimizer; refused together with --resume")
    ap.add_argument("--time-limit-min", type=float, default=8.0)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images (tests)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--save-every-min", type=float, default=5.0, help="checkpoint interval (minutes)")
    ap.add_argument("--export", default=None, help="folder for the fp16 EMA export")
    args = ap.parse_args()
    if args.resume and args.init:
        ap.error("--resume and --init both name a starting point: give one (--resume continues a checkpoint, "
                 "--init starts from an fp16 export)")
    t_start = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    imgs, labels = load_cifar(args.data, args.limit)
    imgs, labels = imgs.to(dev), labels.to(dev)
    print(f"data {tuple(imgs.shape)} in {time.time() - t_start:.1f}s", flush=True)

    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    acp = sched.alphas_cumprod.to(dev)
    torch.backends.cudnn.benchmark = True
    model = build(args.model).to(dev).train()
    ema = build(args.model).to(dev).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    cuda = dev == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=cuda)
    step, wall, curve, images, runs = 0, 0.0, [], 0, []
    if args.resume:
        ck = load_checkpoint(args.resume, dev)
        if ck.get("kind", args.model) != args.model:
            raise SystemExit(f"--resume {args.resume} holds a {ck['kind']} checkpoint, not --model {args.model}")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, wall, curve = int(ck["step"]), float(ck["wall"]), list(ck.get("curve", []))
        images, runs = int(ck.get("images", step * ck.get("batch", args.batch))), list(ck.get("runs", []))
    elif args.init:
        weights, info = load_export(args.init, args.model, model)
        model.load_state_dict(weights)
        ema.load_state_dict(weights)
        step, wall = int(info.get("iterations", 0)), float(info.get("train_seconds", 0.0))
        curve = list(info.get("curve", []))
        images = int(info.get("images_seen", step * info.get("batch", args.batch)))
        runs = list(info.get("runs", [])) or ([{"from_step": 0, "to_step": step, "batch": info["batch"],
                                                "seconds": round(wall, 1)}] if step and "batch" in info else [])
    warm_from = step if args.init else 0  # fresh moments warm up again; resumed ones do not
    channels_last = cuda and args.model == "unet"  # cuDNN's bf16 convolutions want NHWC
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f} M parameters, resuming at step {step}", flush=True)
    fwd = torch.compile(model) if args.compile else model
    ema_params, model_params = list(ema.parameters()), list(model.parameters())

    def flow_loss(x0, y):
        sigma = torch.sigmoid(torch.randn(x0.shape[0], device=dev))  # logit-normal (0, 1), as SD3
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        y = torch.where(torch.rand(y.shape, device=dev) < 0.1, torch.full_like(y, NUM_LABELS - 1), y)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            pred = fwd(xt, timestep=sigma * 1000, **mmdit_condition(y)).sample
        return F.mse_loss(pred.float(), noise - x0)

    def loss_fn(x0, y):
        if args.model == "mmdit":
            return flow_loss(x0, y)
        t = torch.randint(0, 1000, (x0.shape[0],), device=dev)
        noise = torch.randn_like(x0)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            if args.model == "unet":
                pred = fwd(xt, t).sample
            else:
                pred = fwd(xt, timestep=t, class_labels=y).sample
        return F.mse_loss(pred.float(), noise)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    device_name = torch.cuda.get_device_name() if cuda else "cpu"

    def this_run(seconds: float) -> dict:
        """Each invocation's settings: a resumed model's card lists every segment of its training."""
        return {"from_step": start_step, "to_step": step, "batch": args.batch, "lr": args.lr, "ema": args.ema,
                "compile": args.compile, "seconds": round(seconds, 1), "device": device_name,
                "torch": str(torch.__version__)}

    def all_runs() -> list[dict]:
        """The earlier runs and this one, if it trained (an export-only call trains nothing)."""
        return runs + ([this_run(time.time() - t0)] if step > start_step else [])

    def checkpoint(seconds: float) -> None:
        save_checkpoint({"kind": args.model, "model": model.state_dict(), "ema": ema.state_dict(),
                         "opt": compact_optimizer_state(opt.state_dict()), "step": step, "wall": seconds,
                         "batch": args.batch, "curve": curve, "images": images,
                         "runs": all_runs()}, out / "ckpt")

    t0 = last_save = time.time()
    losses, start_step = [], step
    while step < args.iters and (time.time() - t_start) < args.time_limit_min * 60:
        idx = torch.randint(0, imgs.shape[0], (args.batch,), device=dev)
        x0 = imgs[idx].float() / 127.5 - 1.0
        flip = torch.rand(args.batch, device=dev) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step - warm_from + 1) / args.warmup)
        loss = loss_fn(x0, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in model_params], 1 - d)
        losses.append(loss.item() if (step - start_step) % 50 == 0 else None)  # a resumed run logs its first
        step += 1
        images += args.batch
        if step % 500 == 0:
            recent = [l for l in losses[-500:] if l is not None]
            seconds = wall + time.time() - t0
            curve.append([step, float(np.mean(recent)), round(seconds, 1)])
            print(f"step {step} loss {np.mean(recent):.4f} {(step - start_step) / (time.time() - t0 + 1e-9):.1f} it/s "
                  f"(this run), {images / 1e6:.2f} M images", flush=True)
            if time.time() - last_save > args.save_every_min * 60:
                checkpoint(seconds)
                last_save = time.time()
    wall += time.time() - t0
    checkpoint(wall)
    runs = all_runs()
    recent = [l for l in losses[-2000:] if l is not None]
    info = {"model": args.model, "params": n_params, "iterations": step, "images_seen": images,
            "train_seconds": wall, "final_loss": float(np.mean(recent)) if recent else None, "runs": runs,
            "curve": curve}
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    if args.export:
        export_fp16(ema, Path(args.export))
        (Path(args.export) / "train_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
