"""The main job's quality and time, over seeds of the world and the fit: `landmarks demo` as shipped
against the same chain with the world's ground truth as the cleaning (``--oracle-clean``).

    python bench/bench_demo_chain.py --seeds 0 1 2 [--oracle] [--extra --config ... ]

Each run is a fresh process (``landmarks demo --seed S --fresh``) with its own world
(``data/synthetic`` for seed 0, ``data/synthetic-seed<S>`` otherwise) and output folder
(``runs/bench/demo-chain/<variant>-seed<S>``). Prints a Markdown table per variant (per seed, then
mean ± standard deviation) with the recogniser that ships (recall at the threshold calibrated for
``--target-fpr`` on ``calibration.csv``, and the FPR it achieves on the 5,000 unseen distractors),
the cleaning's removal precision/recall, the kNN recall of the trained model, and each stage's
seconds; writes every summary to ``runs/bench/demo-chain/results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LANDMARKS = str(Path(sys.executable).with_name("landmarks"))
OUT = ROOT / "runs" / "bench" / "demo-chain"


def run(seed: int, oracle: bool, extra: list[str], tag: str) -> dict:
    out = OUT / f"{tag}-seed{seed}"
    args = [LANDMARKS, "demo", "--seed", str(seed), "--out", str(out), "--fresh"] + (
        ["--oracle-clean"] if oracle else []) + extra
    print("$", " ".join(args[1:]), flush=True)
    subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def row(s: dict) -> dict:
    r, c = s["recognizer"], s["cleaning"]
    return {
        "recall": r["recall"], "achieved_fpr": r["achieved_fpr"], "precision": r["precision"], "p_at_1": r["p_at_1"],
        "knn_recall@1e-3": s["training"]["trained"].get("recall@fpr=1e-03"),
        "clean_precision": c.get("removal_precision"), "clean_recall": c.get("removal_recall"),
        "minutes": s["seconds"] / 60,
    }


def table(name: str, rows: dict[int, dict]) -> str:
    keys = list(next(iter(rows.values())))
    lines = [f"**{name}**", "", "| seed | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}" if abs(v) < 0.01 else f"{v:.3f}"  # noqa: E731
    for seed, values in rows.items():
        lines.append(f"| {seed} | " + " | ".join(fmt(values[k]) for k in keys) + " |")
    stats = []
    for k in keys:
        vals = [v[k] for v in rows.values() if v[k] is not None]
        stats.append("n/a" if not vals else f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}")
    lines.append("| mean ± sd | " + " | ".join(stats) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--oracle", action="store_true", help="also run every seed with --oracle-clean")
    parser.add_argument("--tag", default="shipped", help="name of this variant's output folders")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `landmarks demo` arguments")
    args = parser.parse_args()
    results = json.loads((OUT / "results.json").read_text()) if (OUT / "results.json").is_file() else {}
    variants = [(args.tag, False)] + ([(f"{args.tag}-oracle", True)] if args.oracle else [])
    for tag, oracle in variants:
        for seed in args.seeds:
            results.setdefault(tag, {})[str(seed)] = run(seed, oracle, args.extra, tag)
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "results.json").write_text(json.dumps(results, indent=1, default=float))
    for tag, _ in variants:
        print()
        print(table(tag, {int(s): row(v) for s, v in sorted(results[tag].items(), key=lambda kv: int(kv[0]))}))
        first = next(iter(results[tag].values()))
        print("\nseconds per stage (seed", next(iter(results[tag])), "):", first["phases_seconds"])


if __name__ == "__main__":
    main()
