"""A million-image dry run of every stage, with time and peak memory per stage, and the GLDv2
extrapolation.

Stages, each in a fresh subprocess (so its peak resident memory, ``VmHWM`` plus its worker
processes' ``ru_maxrss``, is its own):

1. ``prepare``: ``landmarks prepare shards`` (:func:`datamodules.shards.prepare_shards`,
   ``--workers``) of a ``--images``-row manifest over ``--landmarks`` landmarks. The rows point
   at ``--distinct`` small JPEGs (``--side`` px) reused round-robin, so the run writes
   ``--images`` tar members without creating a million files here; the work per row (decode to
   validate, copy the bytes into a tar) is the real one.
2. ``stream``: one epoch over all shards with ``ShardStream`` (webdataset, ``--workers`` loader
   workers, decode + evaluation transform at ``--side`` px, batches of 256), no model.
3. ``train-loader``: ``--train-batches`` P×K batches (P=32, K=4, random access into the shards,
   training augmentations) from ``LandmarkDataModule`` over the shard set, no model.
4. ``index``: the representation ``landmarks index`` builds by default
   (:func:`recognition.centroids.build_representation`) of ``--images`` synthetic 512-d embeddings
   of the same ``--landmarks`` landmarks (1–3 angles each), an IVF (``--index-kind``) index over its vectors
   (``LandmarkIndex.from_centroids``), the threshold calibrated at FPR 1e-3 on 20k non-landmark
   embeddings, and the artifact saved; each part timed.
5. ``recognize``: that artifact loaded, 10,000 query embeddings searched and decided.

Cleaning at 1M rows has its own benchmark: ``bench/bench_cleaning.py`` (run it for stage 6).

    python bench/bench_scale.py --images 1000000 --landmarks 200000 --workers 2
    python bench/bench_scale.py --images 20000 --landmarks 4000      # a ~1 minute check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _children_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _manifest(folder: Path, images: int, landmarks: int, distinct: int, side: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(distinct):
        small = rng.integers(0, 256, (side // 4, side // 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR).save(folder / "img" / f"{i}.jpg", quality=90)
    path = folder / "db.csv"
    with open(path, "w") as f:
        f.write("path,landmark_id\n")
        for row in range(images):
            f.write(f"img/{row % distinct}.jpg,{row % landmarks}\n")
    return path


def _embeddings(images: int, landmarks: int, dim: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((landmarks, dim)).astype(np.float32)
    angles = rng.integers(1, 4, landmarks)
    ids = np.arange(images) % landmarks
    view = rng.integers(0, 3, images) % angles[ids]
    # Per-angle offsets derived from (landmark, angle) without storing 3 × landmarks × dim.
    x = np.empty((images, dim), dtype=np.float32)
    for start in range(0, images, 100_000):
        stop = min(start + 100_000, images)
        i, v = ids[start:stop], view[start:stop]
        offset = np.random.default_rng(v + 7).standard_normal((1, dim)).astype(np.float32)  # 3 fixed offsets
        block = centres[i] + 1.5 * offset * (v[:, None] > 0) + 0.35 * rng.standard_normal((stop - start, dim), dtype=np.float32)
        x[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, ids.astype(str)


def stage(name: str, args: argparse.Namespace, folder: Path) -> dict:
    import numpy as np

    start = time.perf_counter()
    out: dict = {}
    if name == "prepare":
        from datamodules.shards import prepare_shards

        header = prepare_shards(folder / "db.csv", folder / "shards", max_side=args.side, workers=args.workers,
                                progress=False)
        out = {"shards": len(header["shards"]), "bytes": sum(s["filesize"] for s in header["shards"]),
               "samples": header["num_samples"]}
    elif name == "stream":
        import torch

        from datamodules.shards import ShardStream, read_shard_set
        from datamodules.transforms import eval_transform

        manifest = read_shard_set(folder / "shards")
        stream = ShardStream(manifest, np.zeros(len(manifest), dtype=np.int64), eval_transform(args.side), args.side)
        seen = 0
        for batch in torch.utils.data.DataLoader(stream, batch_size=256, num_workers=args.workers):
            seen += len(batch["index"])
        out = {"samples": seen}
    elif name == "train-loader":
        from datamodules import LandmarkDataModule

        dm = LandmarkDataModule(data_dir=str(folder), db_manifest="shards", nonlandmark_manifest=None,
                                query_manifest=None, distractor_manifest=None, nonlandmark_share=0.0,
                                image_size=args.side, classes_per_batch=32, samples_per_class=4,
                                batches_per_epoch=args.train_batches, num_workers=args.workers)
        seen = sum(len(b["index"]) for b in dm.train_dataloader())
        out = {"samples": seen, "classes": dm.num_classes}
    elif name == "index":
        from recognition.artifact import LandmarkIndex
        from recognition.calibration import calibrate_threshold
        from recognition.centroids import build_representation

        x, ids = _embeddings(args.images, args.landmarks, 512, 0)
        t0 = time.perf_counter()
        reps = build_representation(x, ids)  # the defaults of `landmarks index`
        del x
        t1 = time.perf_counter()
        index = LandmarkIndex.from_centroids(reps, {"identity": {"embedding_size": 512}, "key": "bench", "source": {}},
                                             index_kind=args.index_kind,
                                             index_params={"nprobe": 16, **({"nlist": args.nlist} if args.nlist else {})})
        t2 = time.perf_counter()
        rng = np.random.default_rng(1)
        others = rng.standard_normal((20_000, 512)).astype(np.float32)
        others /= np.linalg.norm(others, axis=1, keepdims=True)
        index.calibration = calibrate_threshold(index.search(others, k=1)[0][:, 0], 1e-3)
        t3 = time.perf_counter()
        index.save(folder / "index")
        t4 = time.perf_counter()
        out = {"vectors": len(index), "threshold": float(index.threshold), "representation_s": t1 - t0,
               "faiss_s": t2 - t1, "calibration_s": t3 - t2, "save_s": t4 - t3,
               "bytes": sum(f.stat().st_size for f in (folder / "index").iterdir())}
    elif name == "recognize":
        from recognition.artifact import LandmarkIndex

        queries, qids = _embeddings(10_000 * 3, args.landmarks, 512, 0)  # same centres, fresh noise
        pick = np.random.default_rng(2).choice(len(queries), 10_000, replace=False)
        queries, qids = queries[pick], qids[pick]
        start = time.perf_counter()  # embedding generation is not part of the stage
        index = LandmarkIndex.load(folder / "index")
        loaded = time.perf_counter()
        scores, rows = index.search(queries, k=5)
        accepted = scores[:, 0] >= index.threshold
        correct = np.array(index.landmark_ids)[rows[:, 0]] == qids
        out = {"queries": len(queries), "load_s": loaded - start, "search_s": time.perf_counter() - loaded,
               "accepted": float(accepted.mean()), "recall": float((accepted & correct).mean())}
    out.update(seconds=time.perf_counter() - start, peak_mib=_vmhwm_mib(), workers_peak_mib=_children_mib())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--landmarks", type=int, default=200_000)
    parser.add_argument("--distinct", type=int, default=2000)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-batches", type=int, default=500)
    parser.add_argument("--index-kind", default="ivf", choices=("flat", "ivf", "hnsw"))
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: the default, 4·sqrt(vectors))")
    parser.add_argument("--stages", default="prepare,stream,train-loader,index,recognize")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(stage(args.child[0], args, Path(args.child[1]))))
        return
    results = {"images": args.images, "landmarks": args.landmarks, "cpus": os.cpu_count(),
               "load_average": os.getloadavg()[0], "stages": {}}
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        folder = Path(tmp)
        _manifest(folder, args.images, args.landmarks, args.distinct, args.side)
        for name in args.stages.split(","):
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "json", "stages")]
            done = subprocess.run([sys.executable, __file__, *flags, "--child", name, str(folder)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"stage {name} failed:\n{done.stderr[-3000:]}")
            results["stages"][name] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results["stages"][name]
            print(f"{name:13s} {r['seconds']:8.1f} s   peak {r['peak_mib']:7.0f} MiB (+ workers {r['workers_peak_mib']:.0f} MiB)"
                  f"   {json.dumps({k: v for k, v in r.items() if k not in ('seconds', 'peak_mib', 'workers_peak_mib')})}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
