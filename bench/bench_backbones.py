"""Forward-pass time of the offline ImageNet backbones (the embedding network of `landmarks index`
and `recognize` without a checkpoint): median ms per image over ``--passes`` passes after one
warm-up, random input (the time does not depend on the pixels).

    python bench/bench_backbones.py          # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

BACKBONES = ["mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def main() -> None:
    import torch

    from retrieval.embedding_model import load_embedding_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    print(f"load average {os.getloadavg()[0]:.1f}; batch {args.batch}, {args.image_size} px, {args.threads} threads")
    for name in args.backbones:
        net = load_embedding_model(backbone=name, image_size=args.image_size).net.eval()
        times = []
        with torch.inference_mode():
            for _ in range(args.passes + 1):
                start = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - start)
        print(f"{name:24s} {1000 * statistics.median(times[1:]) / args.batch:6.1f} ms/image", flush=True)


if __name__ == "__main__":
    main()
