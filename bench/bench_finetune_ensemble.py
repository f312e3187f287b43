"""The fine-tuned backbone together with the ImageNet start it came from (issue 17 item 5's
output-space candidate): does scoring with both keep the held-out landmarks at the start?

Weight-space interpolation (WiSE-FT, ``landmarks realphotos --wise-ft``) did not (EXPERIMENTS.md,
"Real photos", part 5). Its paper's other arm is the output-space ensemble, measured here: each
photo is embedded by the untouched ImageNet backbone and by the fine-tuned one (both GeM,
L2-normalised), and the two vectors are concatenated with weights sqrt(1 - alpha) and sqrt(alpha),
so the cosine of two photos is ``(1 - alpha) * cos_imagenet + alpha * cos_finetuned``
(``cli.realphotos.output_ensemble``, ``landmarks realphotos --ensemble``); a unit vector that FAISS
and the index take as any other, for two forward passes per photo. This bench scores saved
checkpoints from embeddings at hand, every alpha at once.

Protocol: ``landmarks realphotos``'s class-disjoint split at 160 px (per split seed, 8 training
landmarks; the other 7 scored with gallery / queries = halves of each one's photos, distractors =
the 104 other non-landmark photos), scored by ``cli.realphotos.score_embedded``. The fine-tuned
checkpoints are the ones ``landmarks realphotos`` wrote (``--runs DIR``: ``DIR/seedN/finetuned.ckpt``,
the run's own split seed N):

    landmarks realphotos --epochs 5 --backbone-lr-scale 0.1 --l2sp 0.1 --freeze-bn --curve --out runs/realphotos-curve-frozenbn
    landmarks realphotos --seeds 3 4 5 --epochs 5 --backbone-lr-scale 0.1 --l2sp 0.1 --freeze-bn \
        --wise-ft 0.25 0.5 0.75 --out runs/realphotos-gentle-345
    (and the same without the recipe's options: runs/realphotos-curve-plain, runs/realphotos-plain-345)
    python bench/bench_finetune_ensemble.py --runs runs/realphotos-curve-frozenbn runs/realphotos-gentle-345 --tag gentle
    python bench/bench_finetune_ensemble.py --runs runs/realphotos-curve-plain runs/realphotos-plain-345 --tag plain

alpha 0 is the control (the ImageNet start alone; it reproduces the recorded ImageNet rows) and
alpha 1 the fine-tuned backbone alone. alpha is chosen on split seeds 0-2 and confirmed on 3-5.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import bench_recognition as br  # noqa: E402
import numpy as np  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
METRICS = ("recall@fpr=1e-02", "p@1")


def ensemble(start: np.ndarray, tuned: np.ndarray, alpha: float) -> np.ndarray:
    """``landmarks realphotos --ensemble``'s rows (``cli.realphotos.ensemble_rows``) from embeddings at hand."""
    import torch

    from cli.realphotos import ensemble_rows

    return ensemble_rows(torch.from_numpy(start), torch.from_numpy(tuned), alpha).numpy()


def run(args) -> dict:
    from cli.realphotos import backbone_only, score_embedded
    from datamodules.realphotos import DEFAULT_ROOT, class_disjoint_split, read_realphotos
    from retrieval.embedding_model import load_embedding_model

    table = read_realphotos(args.root or DEFAULT_ROOT)
    paths = sorted(table["path"])
    start = dict(zip(paths, br._embed(load_embedding_model(backbone="mobilenetv2_100", image_size=args.image_size),
                                      paths)))
    results = {"machine": br._machine(), "image_size": args.image_size, "runs": [str(r) for r in args.runs],
               "seeds": {}}
    for run_dir in map(Path, args.runs):
        for checkpoint in sorted(run_dir.glob("seed*/finetuned.ckpt")):
            seed = int(checkpoint.parent.name[len("seed"):])
            split = class_disjoint_split(table, seed, 8, 60)
            held = ("gallery", "queries", "distractors")
            ordered = [p for name in held for p in split[name]["path"]]
            tuned = dict(zip(ordered, br._embed(backbone_only(checkpoint, args.image_size), ordered)))
            rows = {}
            for alpha in ALPHAS:
                embedded = {name: ensemble(np.stack([start[p] for p in split[name]["path"]]),
                                           np.stack([tuned[p] for p in split[name]["path"]]), alpha)
                            for name in held}
                metrics = score_embedded(embedded, split)
                rows[f"alpha {alpha:g}"] = {k: metrics[k] for k in METRICS}
            results["seeds"][str(seed)] = rows
    return results


def _print(results: dict) -> None:
    seeds = sorted(results["seeds"], key=int)
    names = list(next(iter(results["seeds"].values())))
    for metric in METRICS:
        print(f"\n{metric} on the 7 held-out landmarks, per split seed ({' / '.join(seeds)}), mean of 0-2 | 3-5 | all")
        for name in names:
            values = {s: results["seeds"][s][name][metric] for s in seeds}
            first = [v for s, v in values.items() if int(s) <= 2]
            rest = [v for s, v in values.items() if int(s) > 2]
            print(f"  {name:<10} " + " / ".join(f"{values[s]:.3f}" for s in seeds)
                  + f"  | {np.mean(first) if first else float('nan'):.3f} | {np.mean(rest) if rest else float('nan'):.3f}"
                  + f" | {np.mean(list(values.values())):.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="landmarks realphotos output folders")
    parser.add_argument("--root", default=None, help="the realphotos folder (default ../shared/realphotos)")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--tag", default="ensemble")
    args = parser.parse_args()
    results = run(args)
    _print(results)
    out = ROOT / "runs" / f"bench_finetune_ensemble_{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
