"""Two torch.distributed (gloo) processes over one .beton: disjoint shards that cover the split."""

from __future__ import annotations

import json
import time

import pytest
import torch.multiprocessing as mp

from kesi_dist.data import prepare_dataset

N_TRAIN, N_VAL, WORLD = 75, 33, 2


def _worker(rank: int, data_dir: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from kesi_dist.data import make_loader

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = {}
        t0 = time.perf_counter()
        for backend in ("ffcv", "torch"):
            kw = dict(batch_size=8, resolution=16, augment="none", backend=backend, num_workers=1 if backend == "ffcv" else 0,
                      seed=3, distributed=True, return_indices=True)
            for split, drop_last in (("train", False), ("train", True), ("val", None)):
                ld = make_loader(data_dir, split, drop_last=drop_last, **kw)
                ld.set_epoch(1)
                ids, labels = [], []
                for _, y, i in ld:
                    ids += i.tolist()
                    labels += y.tolist()
                result[f"{backend}/{split}/{drop_last}"] = {"ids": ids, "labels": labels, "len": len(ld)}
            result[f"{backend}/seconds"] = round(time.perf_counter() - t0, 1)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_get_disjoint_shards_covering_the_split(tmp_path):
    data = tmp_path / "data"
    prepare_dataset("synthetic", None, data, resolution=16, workers=1, num_train=N_TRAIN, num_val=N_VAL,
                    num_classes=5, difficulty=0.3)
    mp.start_processes(_worker, args=(str(data), str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))

    for backend in ("ffcv", "torch"):
        a, b = r0[f"{backend}/train/False"], r1[f"{backend}/train/False"]
        assert not set(a["ids"]) & set(b["ids"])  # disjoint
        assert sorted(a["ids"] + b["ids"]) == list(range(N_TRAIN))  # union is the epoch
        assert (len(a["ids"]), len(b["ids"])) == (38, 37)
        a, b = r0[f"{backend}/train/True"], r1[f"{backend}/train/True"]
        assert a["len"] == b["len"] == 37 // 8  # equal batch counts keep DDP in step
        assert not set(a["ids"]) & set(b["ids"]) and len(a["ids"]) == len(b["ids"]) == 32
        a, b = r0[f"{backend}/val/None"], r1[f"{backend}/val/None"]
        assert sorted(a["ids"] + b["ids"]) == list(range(N_VAL))
        assert a["ids"] == list(range(0, N_VAL, 2))  # val: unshuffled, strided
    for key in r0:  # both backends shard identically, labels included
        backend, rest = key.split("/", 1)
        if backend == "ffcv" and rest != "seconds":
            assert r0[key] == r0["torch/" + rest] and r1[key] == r1["torch/" + rest]
