"""Images/s of three loaders over the same images: kesi's FFCV loader and kesi's torch loader, both on
the same .beton file, and torchvision's ImageFolder + DataLoader on the JPEGs it was made from.

The data: N synthetic class-conditional 64x64 JPEGs (Tiny-ImageNet's shape) in an ImageFolder tree,
converted once to .beton. Images up to 128 px are stored raw in the .beton, so the two kesi arms read
pixels and differ only in their pipeline (FFCV's compiled, multi-threaded one vs a torch DataLoader of
`--workers` processes running the same seeded augmentation), while torchvision decodes every JPEG with
PIL: the FFCV vs torchvision ratio includes that decoding, the FFCV vs kesi-torch ratio does not.
All arms use the same augmentation, batch size and worker count and deliver normalised float32 NCHW
batches. Each arm is warmed up for one epoch (FFCV compiles its pipeline there; the DataLoaders'
workers are persistent), then `--repeats` rounds time one whole epoch of every arm, interleaved, so
that load on a shared machine hits all arms alike; the figures are medians over rounds (min and max
given too), the ratios are ratios of medians.

    ./dev bench loader_throughput --json
    .venv/bin/python bench/loader_throughput.py --images 10000 --workers 2 --augment imagenet --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def epoch_rate(loader, epoch: int, set_epoch: bool) -> float:
    """Images/s of one full pass."""
    if set_epoch:
        loader.set_epoch(epoch)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += batch[0].shape[0]
    return n / (time.perf_counter() - t0)


def summary(rates: list[float]) -> dict:
    return {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1), "max": round(max(rates), 1),
            "all": [round(r, 1) for r in rates]}


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
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (one epoch of every arm each)")
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

        common = dict(batch_size=bs, resolution=res, augment=args.augment, num_workers=nw, seed=args.seed)
        if args.augment == "imagenet":
            aug = [T.RandomResizedCrop(res), T.RandomHorizontalFlip()]
        else:
            aug = ([T.Resize(res)] if res != args.size else []) + [T.RandomCrop(res, padding=4), T.RandomHorizontalFlip()]
        tf = T.Compose([*aug, T.ToTensor(), T.Normalize([m / 255 for m in meta["mean"]], [s / 255 for s in meta["std"]])])
        dataset = torchvision.datasets.ImageFolder(str(raw / "train"), transform=tf)
        arms = {  # name -> (loader, whether it takes set_epoch)
            "ffcv": (make_loader(tmp / "ffcv", "train", backend="ffcv", **common), True),
            "kesi_torch": (make_loader(tmp / "ffcv", "train", backend="torch", **common), True),
            "torchvision": (torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=True, num_workers=nw,
                                                        drop_last=True, persistent_workers=nw > 0), False),
        }
        for name, (loader, set_epoch) in arms.items():
            log(f"warm-up: {name}")
            epoch_rate(loader, 0, set_epoch)
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(1, args.repeats + 1):
            log(f"round {r}/{args.repeats}")
            for name, (loader, set_epoch) in arms.items():
                rates[name].append(epoch_rate(loader, r, set_epoch))
        med = {name: statistics.median(v) for name, v in rates.items()}
        result = {
            "images_per_s": {name: summary(v) for name, v in rates.items()},
            "ffcv_vs_torchvision": round(med["ffcv"] / med["torchvision"], 2),
            "ffcv_vs_kesi_torch": round(med["ffcv"] / med["kesi_torch"], 2),
            "kesi_torch_vs_torchvision": round(med["kesi_torch"] / med["torchvision"], 2),
        }
        result.update({
            "images": args.images, "image_size": args.size, "resolution": res, "augment": args.augment,
            "workers": nw, "batch_size": bs, "repeats": args.repeats, "beton_storage": meta["write_mode"],
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
