"""Images/s of kesi's FFCV loader vs torchvision ImageFolder + DataLoader (PIL decode).

Both read the same Tiny-ImageNet-shaped data: N synthetic class-conditional 64x64 JPEGs written
into an ImageFolder tree in a temporary folder (converted once to .beton for FFCV), with the same
augmentation, batch size and worker count, timed over whole epochs after one warm-up epoch (FFCV
compiles its pipeline there; torchvision's workers are persistent, so it pays no start-up either).
Both deliver normalised float32 NCHW batches.

    ./dev bench loader_throughput --json
    .venv/bin/python bench/loader_throughput.py --images 10000 --workers 2 --augment imagenet --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def write_jpeg_tree(root: Path, images: int, classes: int, size: int, seed: int) -> None:
    """root/train/<class>/<class>_<i>.JPEG (quality 90, like Tiny-ImageNet) and a small root/val."""
    from PIL import Image

    from kesi_dist.data.synthetic import SyntheticSplit

    for split, n, sid in (("train", images, 0), ("val", classes, 1)):
        gen = SyntheticSplit(n, classes, size, difficulty=0.5, seed=seed, split_id=sid)
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label, _ = gen[i]
            Image.fromarray(img).save(root / split / f"n{label:08d}" / f"n{label:08d}_{i}.JPEG", quality=90)


def time_epochs(loader, epochs: int, set_epoch: bool) -> tuple[float, int]:
    """Seconds and images for `epochs` full passes, after one untimed warm-up pass."""
    def one(e):
        if set_epoch:
            loader.set_epoch(e)
        n = 0
        for x, _ in loader:
            n += x.shape[0]
        return n

    one(0)
    t0 = time.perf_counter()
    n = sum(one(e) for e in range(1, epochs + 1))
    return time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000, help="training JPEGs (>= 10k for the reported figure)")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--size", type=int, default=64, help="side of the JPEGs")
    ap.add_argument("--resolution", type=int, default=64, help="side the model sees")
    ap.add_argument("--augment", choices=["imagenet", "cifar"], default="imagenet",
                    help="imagenet: RandomResizedCrop + flip; cifar: pad-4 random crop + flip")
    ap.add_argument("--workers", type=int, default=2, help="FFCV threads = DataLoader worker processes")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch")
    ap.add_argument("--kesi-torch", action="store_true", help="also time kesi's torch backend (.beton via DataLoader)")
    ap.add_argument("--workdir", default=None, help="where to write the data (default: a temp dir, removed after)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()

    import torch
    import torchvision
    from torchvision import transforms as T

    from kesi_dist.data import make_loader, prepare_dataset

    load_start = os.getloadavg()
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kesi-bench-"))
    try:
        raw = tmp / "jpeg"
        if not (raw / "train").is_dir():
            log(f"writing {args.images} {args.size}x{args.size} JPEGs into {raw}")
            write_jpeg_tree(raw, args.images, args.classes, args.size, args.seed)
        t = time.perf_counter()
        meta = prepare_dataset("imagefolder", str(raw), tmp / "ffcv", resolution=args.size)
        prepare_s = time.perf_counter() - t
        res, bs, nw = args.resolution, args.batch_size, args.workers

        log("FFCV loader")
        ffcv_loader = make_loader(tmp / "ffcv", "train", batch_size=bs, resolution=res, augment=args.augment,
                                  backend="ffcv", num_workers=nw, seed=args.seed)
        ffcv_s, ffcv_n = time_epochs(ffcv_loader, args.epochs, set_epoch=True)

        log("torchvision ImageFolder + DataLoader")
        if args.augment == "imagenet":
            aug = [T.RandomResizedCrop(res), T.RandomHorizontalFlip()]
        else:
            aug = ([T.Resize(res)] if res != args.size else []) + [T.RandomCrop(res, padding=4), T.RandomHorizontalFlip()]
        tf = T.Compose([*aug, T.ToTensor(), T.Normalize([m / 255 for m in meta["mean"]], [s / 255 for s in meta["std"]])])
        dataset = torchvision.datasets.ImageFolder(str(raw / "train"), transform=tf)
        tv_loader = torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=True, num_workers=nw, drop_last=True,
                                                persistent_workers=nw > 0)
        tv_s, tv_n = time_epochs(tv_loader, args.epochs, set_epoch=False)

        result = {
            "ffcv_images_per_s": round(ffcv_n / ffcv_s, 1),
            "torch_images_per_s": round(tv_n / tv_s, 1),
            "ratio": round((ffcv_n / ffcv_s) / (tv_n / tv_s), 2),
        }
        if args.kesi_torch:
            log("kesi torch backend (.beton via DataLoader)")
            kt = make_loader(tmp / "ffcv", "train", batch_size=bs, resolution=res, augment=args.augment,
                             backend="torch", num_workers=nw, seed=args.seed)
            kt_s, kt_n = time_epochs(kt, args.epochs, set_epoch=True)
            result["kesi_torch_backend_images_per_s"] = round(kt_n / kt_s, 1)
        result.update({
            "images": args.images, "image_size": args.size, "resolution": res, "augment": args.augment,
            "workers": nw, "batch_size": bs, "epochs_timed": args.epochs, "ffcv_storage": meta["write_mode"],
            "prepare_s": round(prepare_s, 1), "cpu_count": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__, "torchvision": torchvision.__version__,
        })
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>32}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
