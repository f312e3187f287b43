"""Learned whitening with the backbone frozen (issue 17 item 5's first candidate: Radenović et al.,
TPAMI 2018) against the untouched ImageNet backbone, on landmarks the whitening never saw.

Protocol: ``landmarks realphotos``'s class-disjoint split (``class_disjoint_split``: per split seed, 8
training landmarks + 60 training non-landmark photos; the other 7 landmarks are scored with gallery =
half of each one's photos, queries = the other half, distractors = the other 104 non-landmark photos),
MobileNetV2 with the offline ImageNet weights at 160 px, scored by ``cli.realphotos.score_embedded``
(the function ``landmarks realphotos`` scores with). The network is never trained; only a linear map
fitted on the training side is applied to every held-out vector:

* ``learned p=P s=S``: ``Whitening.fit(train_db, P, S, groups=landmark)``: the scatter of the
  differences of matching pairs of the 8 training landmarks, ridge S · mean λ, power P;
* ``PCA p=P s=S``: ``Whitening.fit`` without labels on the training landmarks' photos and the 60
  training non-landmark photos (what ``landmarks index --whiten`` would do there).

The row ``none`` is the control: the same sets, nothing applied (it reproduces the ImageNet rows of
EXPERIMENTS.md's fine-tuning tables). Settings are chosen on split seeds 0-2 and confirmed on 3-5.

    python bench/bench_learned_whitening.py            # ~1 min with cached embeddings (~3 min without)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_recognition as br  # noqa: E402
import numpy as np  # noqa: E402

GRID = [(p, s) for p in (0.25, 0.5) for s in (0.1, 0.3, 1.0, 3.0)]
METRICS = ("recall@fpr=1e-02", "p@1")


def run(args) -> dict:
    from cli.realphotos import score_embedded
    from datamodules.realphotos import DEFAULT_ROOT, class_disjoint_split, read_realphotos
    from recognition.descriptors import Whitening
    from retrieval.embedding_model import load_embedding_model

    table = read_realphotos(args.root or DEFAULT_ROOT)
    paths = sorted(table["path"])
    model = load_embedding_model(backbone="mobilenetv2_100", image_size=args.image_size)
    vectors = dict(zip(paths, br._embed(model, paths)))
    results = {"machine": br._machine(), "image_size": args.image_size, "seeds": {}}
    for seed in args.seeds:
        split = class_disjoint_split(table, seed, 8, 60)
        embedded = {name: np.stack([vectors[p] for p in split[name]["path"]]) for name in split}
        held_out = {name: embedded[name] for name in ("gallery", "queries", "distractors")}
        rows = {"none": score_embedded(held_out, split)}
        for power, shrink in GRID:
            fits = {
                f"learned p={power:g} s={shrink:g}": Whitening.fit(embedded["train_db"], power, shrink,
                                                                   groups=split["train_db"]["label"].to_numpy()),
                f"PCA p={power:g} s={shrink:g}": Whitening.fit(
                    np.concatenate([embedded["train_db"], embedded["train_nonlandmarks"]]), power, shrink),
            }
            for name, whitening in fits.items():
                rows[name] = score_embedded({k: whitening(v) for k, v in held_out.items()}, split)
        results["seeds"][str(seed)] = {name: {k: m[k] for k in METRICS} for name, m in rows.items()}
    return results


def _print(results: dict) -> None:
    seeds = list(results["seeds"])
    names = list(next(iter(results["seeds"].values())))
    for metric in METRICS:
        print(f"\n{metric} on the 7 held-out landmarks, per split seed ({' / '.join(seeds)}) and mean")
        for name in names:
            values = [results["seeds"][s][name][metric] for s in seeds]
            print(f"  {name:<22} " + " / ".join(f"{v:.3f}" for v in values) + f"  = {np.mean(values):.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="the realphotos folder (default ../shared/realphotos)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_learned_whitening.json"))
    args = parser.parse_args()
    results = run(args)
    _print(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
