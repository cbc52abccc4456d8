"""How far cached distillation's top-k soft labels are from the dense ensemble distribution, on a run's teachers.

    .venv/bin/python bench/topk_gap.py RUN_DIR --json [--k 10 20 50] [--images 2048]

RUN_DIR is a finished (or at least ensembled) `kesi run`: its teachers are the ensemble stage's, its data
the run's prepared folder, its temperature and augmentation the run's `method.distill` and `data`. For
`--images` training images (the first ones of epoch 0, augmented as the student sees them, the held-out
ones excluded) the teachers' mean softened distribution p is computed once; for each k the cache's
form p_k (top-k kept, the rest spread uniformly, `kesi_dist.distill.dense_from_topk`) is compared with
p: KL(p || p_k) per image (nats; mean, median, max) and the probability mass outside the top k. "all"
(k = number of classes) is exact by construction and is printed as the check. The loss itself moves by
at most T^2 times the bound in `kesi_dist.distill.losses`; this is the distortion of the target only.

Bytes per image per epoch in the cache: k * (4 + 2) with float32 values and int16 classes (k * 4 with
float16 values), the figure printed as `bytes_per_image_epoch`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a kesi run folder (manifest.json with a complete ensemble stage)")
    ap.add_argument("--k", type=int, nargs="*", default=[10, 20, 50])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import yaml

    from kesi_dist.data.loaders import make_loader
    from kesi_dist.distill import dense_from_topk, ensemble_probs, load_teachers, topk_probs

    run = Path(args.run)
    manifest = json.loads((run / "manifest.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ens = manifest["stages"].get("ensemble", {})
    if ens.get("status") != "complete":
        raise SystemExit(f"error: {run}: no complete ensemble stage (run kesi run first)")
    data = cfg["data"]
    temperature = float(cfg["method"]["distill"]["temperature"])
    teachers = load_teachers([str(run / manifest["snapshots"][n]["checkpoint"]) for n in ens["teachers"]], "cpu")
    loader = make_loader(manifest["stages"]["data"]["path"], "train", batch_size=args.batch_size,
                         resolution=data["resolution"], augment=data["augment"], backend="torch", num_workers=0,
                         seed=cfg["seed"], holdout=data.get("holdout", 0), holdout_seed=cfg["seed"])
    probs, seen = [], 0
    loader.set_epoch(0)
    with torch.no_grad():
        for images, _ in loader:
            probs.append(ensemble_probs(teachers, images, temperature).double())
            seen += len(images)
            if seen >= args.images:
                break
    p = torch.cat(probs)[: args.images]
    classes = p.shape[1]
    rows = []
    for k in sorted({*[k for k in args.k if k < classes], classes}):
        v, i = topk_probs(p, k)
        pk = dense_from_topk(v, i, classes).double()
        kl = (p * (p.clamp_min(1e-300).log() - pk.clamp_min(1e-300).log())).sum(1)
        kl = kl.clamp_min(0).tolist()
        rows.append({"k": "all" if k == classes else k, "kl_mean": statistics.fmean(kl),
                     "kl_median": statistics.median(kl), "kl_max": max(kl),
                     "tail_mass_mean": float((1 - v.double().sum(1)).clamp_min(0).mean()),
                     "bytes_per_image_epoch": k * 6, "bytes_per_image_epoch_fp16": k * 4})
    out = {"run": str(run), "teachers": ens["teachers"], "classes": classes, "temperature": temperature,
           "images": len(p), "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{len(ens['teachers'])} teachers, {classes} classes, T={temperature:g}, {len(p)} images")
        for r in rows:
            print(f"  k={r['k']!s:>4}: KL mean {r['kl_mean']:.4g}  median {r['kl_median']:.4g}  max {r['kl_max']:.4g}"
                  f"  tail mass {r['tail_mass_mean']:.3f}  {r['bytes_per_image_epoch']} B/image/epoch")


if __name__ == "__main__":
    main()
