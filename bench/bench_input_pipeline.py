"""Input pipeline: training images per second the loader delivers, image files vs tar shards,
against the rate the model consumes them, and where a worker's time goes.

Two settings, each from a folder of JPEGs that is also packed into shards
(``datamodules.shards.prepare_shards``) in a temporary folder:

* **demo**: the embedded synthetic world's DB (``data/synthetic``, 3,000 small JPEGs), 96 px,
  MobileNetV2, shards at ``--max-side 256``;
* **paper**: the real photos of ``../shared/realphotos`` re-saved at 512 px on the longer side
  (the size ``prepare shards --max-side 512`` stores for 224-px training), 224 px, ResNet-50-sized
  work measured with MobileNetV2 as well (skipped with a message where the photos are absent).

Measured, alternating the two loaders within each repeat so machine noise falls on both:

* **loader**: ``LandmarkDataModule.train_dataloader()`` (P×K + non-landmarks, augmentations,
  ``--workers`` worker processes) over files and over shards, images/s after a warm-up batch;
* **stream**: one evaluation pass (``ShardStream``, webdataset, same workers) against the
  map-style evaluation loader over files;
* **model**: a plain training step (forward, ArcFace, backward, AdamW) of the demo's network on
  batches already in memory, images/s, on the same cores;
* **breakdown**: CPU ms per image in one process: reading the bytes (open + read of a file, or
  seek + read in a shard), JPEG decode, augmentation, and collating a batch.

    python bench/bench_input_pipeline.py --setting demo --workers 2 --batches 30 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules import LandmarkDataModule  # noqa: E402
from datamodules.images import decode_rgb  # noqa: E402
from datamodules.shards import ShardReader, ShardStream, prepare_shards, read_shard_set  # noqa: E402
from datamodules.transforms import eval_transform, train_transform  # noqa: E402

REALPHOTOS = ROOT.parent / "shared" / "realphotos"


def _paper_folder(tmp: Path) -> Path | None:
    manifest = REALPHOTOS / "MANIFEST.csv"
    if not manifest.is_file():
        print(f"paper setting skipped: {manifest} not found")
        return None
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    rows = []
    for i, (rel, label, kind) in enumerate(zip(table["relpath"], table["label"], table["kind"])):
        with Image.open(REALPHOTOS / rel) as image:
            image = image.convert("RGB")
            image.thumbnail((512, 512))
            name = f"{i:04d}.jpg"
            image.save(tmp / name, quality=90)
        # Non-landmark photos get 40 pseudo-classes: only the loading cost is measured here.
        rows.append((name, label if kind == "landmark" else f"other{i % 40}"))
    pd.DataFrame(rows, columns=["path", "landmark_id"]).to_csv(tmp / "db.csv", index=False)
    return tmp


def _datamodule(data_dir: Path, db: str, size: int, workers: int, p: int, k: int) -> LandmarkDataModule:
    return LandmarkDataModule(data_dir=str(data_dir), db_manifest=db, nonlandmark_manifest=None, query_manifest=None,
                              distractor_manifest=None, nonlandmark_share=0.0, image_size=size, classes_per_batch=p,
                              samples_per_class=k, num_workers=workers, eval_num_workers=workers, eval_batch_size=64)


def _rate(loader, batches: int) -> float:
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch are not timed
    n, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), iterator):
        n += len(batch["image"])
    return n / (time.perf_counter() - start)


def _model_rate(size: int, batch: int, steps: int = 6) -> float:
    import timm
    from pytorch_metric_learning.losses import ArcFaceLoss

    torch.manual_seed(0)
    net = torch.nn.Sequential(timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0),
                              torch.nn.Linear(1280, 512), torch.nn.BatchNorm1d(512))
    loss = ArcFaceLoss(num_classes=100, embedding_size=512)
    optim = torch.optim.AdamW(list(net.parameters()) + list(loss.parameters()), lr=1e-3)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 100, (batch,))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        value = loss(net(x), y)
        optim.zero_grad()
        value.backward()
        optim.step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[1:])


def _breakdown(files: LandmarkDataModule, shards_dir: Path, size: int, n: int = 200) -> dict:
    paths = files.db.paths[:n]
    reader = ShardReader(read_shard_set(shards_dir))
    augment = train_transform(size)
    cost = {"read file": [], "read shard": [], "decode": [], "augment": []}
    samples = []
    for i, path in enumerate(paths):
        t0 = time.process_time()
        with open(path, "rb") as f:
            data = f.read()
        t1 = time.process_time()
        reader.read(i)
        t2 = time.process_time()
        image = decode_rgb(data, path, max_side=2 * size)
        t3 = time.process_time()
        sample = augment(image=image)["image"]
        t4 = time.process_time()
        samples.append({"image": sample, "label": 0, "index": i, "valid": True})
        for key, dt in zip(cost, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            cost[key].append(dt)
    t0 = time.process_time()
    for first in range(0, len(samples), 64):
        torch.utils.data.default_collate(samples[first:first + 64])
    collate = (time.process_time() - t0) / len(samples)
    return {**{k: 1e3 * statistics.mean(v) for k, v in cost.items()}, "collate": 1e3 * collate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("demo", "paper"), nargs="+", default=["demo", "paper"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, loader workers {args.workers}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for setting in args.setting:
            if setting == "demo":
                data_dir, db, size, max_side = ROOT / "data" / "synthetic", "db.csv", 96, 256
                if not (data_dir / "db.csv").is_file():
                    print("demo setting skipped: run `landmarks synth --out data/synthetic` first")
                    continue
            else:
                folder = tmp / "paper"
                folder.mkdir()
                data_dir = _paper_folder(folder)
                if data_dir is None:
                    continue
                db, size, max_side = "db.csv", 224, 512
            shards_dir = tmp / f"{setting}-shards"
            start = time.perf_counter()
            header = prepare_shards(data_dir / db, shards_dir, max_side=max_side, samples_per_shard=250,
                                    workers=args.workers, progress=False)
            prepare_s = time.perf_counter() - start
            files = _datamodule(data_dir, db, size, args.workers, 16, 4)
            shards = _datamodule(data_dir, str(shards_dir), size, args.workers, 16, 4)
            rates: dict[str, list[float]] = {"files": [], "shards": [], "eval files": [], "stream": []}
            for _ in range(args.repeats):
                rates["files"].append(_rate(files.train_dataloader(), args.batches))
                rates["shards"].append(_rate(shards.train_dataloader(), args.batches))
                rates["eval files"].append(_rate(files.val_dataloader()[0], min(args.batches, 20)))
                manifest = read_shard_set(shards_dir)
                stream = ShardStream(manifest, np.zeros(len(manifest), dtype=np.int64), eval_transform(size), size)
                loader = torch.utils.data.DataLoader(stream, batch_size=64, num_workers=args.workers)
                rates["stream"].append(_rate(loader, min(args.batches, 20)))
            model = statistics.median(_model_rate(size, 64) for _ in range(args.repeats))
            cost = _breakdown(files, shards_dir, size)
            print(f"\n## {setting}: {len(files.db)} images, {size} px; shards: {len(header['shards'])} files, "
                  f"{sum(s['filesize'] for s in header['shards']) / 2**20:.1f} MiB, prepared in {prepare_s:.1f} s")
            print("| loader | images/s, median (runs) | vs files | headroom vs the model |")
            print("|---|---|---|---|")
            for name, values in rates.items():
                base = rates["eval files" if name in ("eval files", "stream") else "files"]
                ratio = statistics.median(v / b for v, b in zip(values, base))
                print(f"| {name} | {statistics.median(values):.0f} ({', '.join(f'{v:.0f}' for v in values)}) | "
                      f"{ratio:.2f} | {statistics.median(values) / model:.1f}× |")
            print(f"| model (train step, MobileNetV2, batch 64) | {model:.0f} | | |")
            print("\nCPU ms per image, one process: " + ", ".join(f"{k} {v:.2f}" for k, v in cost.items()))


if __name__ == "__main__":
    main()
