"""Per-image cost of the training loader (decode + augmentation), full decode vs JPEG draft mode.

For GLDv2-scale training (1.6 M + 1.5 M files per epoch) the question is how many images per
second one loader worker delivers, so that ``num_workers`` per GPU can be sized against the
GPU's training rate (experiments/gldv2_paper.yaml). Two ways to produce the same 224-px training
sample from a large JPEG:

* **full**: decode the whole JPEG, then resize to ≤ 448 px and augment (a plain PIL loader);
* **draft** (``datamodules.images.load_rgb(max_side=448)``, what ``ImageDataset`` does): libjpeg
  decodes directly at 1/2, 1/4 or 1/8 scale (≥ 448 px), then the same resize and augmentation.

Test images: real photos from ``../shared/realphotos`` (or the synthetic world when absent),
upscaled to ``--side`` px on the longer side and saved as quality-90 JPEGs in a temporary folder
(never in the project). One process, one thread; passes alternate (full, draft, full, ...). Times
are CPU time of the process (``time.process_time``), which a machine shared with other jobs
inflates far less than wall time; decoding alone and decoding + augmentation are both reported.

    python bench/bench_decode.py --images 200 --side 1024 --repeats 5
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

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules.images import load_rgb  # noqa: E402
from datamodules.transforms import train_transform  # noqa: E402


def _sources(limit: int) -> list[Path]:
    real = ROOT.parent / "shared" / "realphotos" / "landmarks"
    folder = real if real.is_dir() else ROOT / "data" / "synthetic" / "images" / "db"
    files = sorted(folder.rglob("*.jpg"))
    if not files:
        raise SystemExit(f"no source photos under {folder}")
    return files[:limit]


def _make_images(sources: list[Path], side: int, out: Path) -> list[str]:
    paths = []
    for i, source in enumerate(sources):
        with Image.open(source) as image:
            image = image.convert("RGB")
            scale = side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
            target = out / f"{i:05d}.jpg"
            image.save(target, quality=90)
            paths.append(str(target))
    return paths


def _full(path: str, max_side: int) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max_side / max(image.size)
        if scale < 1:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=1024, help="longer side of the test JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="training resolution (decode hint = 2×)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    transform = train_transform(args.image_size)
    max_side = 2 * args.image_size
    loaders = {
        "full": lambda p: _full(p, max_side),
        "draft": lambda p: load_rgb(p, max_side=max_side),
    }
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        paths = _make_images(_sources(args.images), args.side, Path(tmp))
        mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
        for p in paths[:5]:  # warm the page cache and the libraries
            for load in loaders.values():
                transform(image=load(p))
        times = {(name, stage): [] for name in loaders for stage in ("decode", "decode+augment")}
        for _ in range(args.repeats):
            for name, load in loaders.items():
                start = time.process_time()
                for p in paths:
                    load(p)
                times[(name, "decode")].append((time.process_time() - start) / len(paths) * 1000)
                start = time.process_time()
                for p in paths:
                    transform(image=load(p))
                times[(name, "decode+augment")].append((time.process_time() - start) / len(paths) * 1000)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f}; {len(paths)} JPEGs, longer side {args.side} px, mean {mean_kb:.0f} KiB; "
          f"decode hint {max_side} px, training crop {args.image_size} px")
    print("| loader | work | CPU ms per image, median of repeats (all) | images/s per worker | speed-up vs full |")
    print("|---|---|---|---|---|")
    for stage in ("decode", "decode+augment"):
        base = statistics.median(times[("full", stage)])
        for name in loaders:
            values = times[(name, stage)]
            median = statistics.median(values)
            print(f"| {name} | {stage} | {median:.2f} ({', '.join(f'{v:.2f}' for v in values)}) | {1000 / median:.0f} | "
                  f"{base / median:.2f}× |")


if __name__ == "__main__":
    main()
