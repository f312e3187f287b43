"""Issue 17's real-photo goal, measured the way a user gets it: `landmarks index` + `landmarks
recognize` run as commands, on the issue's fixed protocol.

Protocol (``datamodules.realphotos.alternate_split``, no seed): per landmark of
``../shared/realphotos``, the photos in sorted path order; even positions are the gallery (128),
odd positions the queries (118); all 164 non-landmark photos are distractors. recall@FPR 1 % is
the share of queries whose top landmark is right and scores at or above the threshold that admits
1 % of the distractors (1 of 164); P@1 is the share of queries whose top landmark is right. The
index is calibrated on the same distractors (``--nonlandmarks``, ``--target-fpr 1e-2``), so the
"shipped" recall, from the ``accepted`` column of ``landmarks recognize``, is the same decision
up to ties.

Each variant runs three times: on all 15 landmarks, and on each half of them (A: even positions of
the sorted names, 8 landmarks; B: odd, 7), with every distractor each time, so a default chosen
on A can be confirmed on B (issue 17: tune nothing per landmark).

The control row ``avg-pool kNN`` is the issue's own baseline (a plain ImageNet lite0, average
pooling, every gallery photo indexed; the issue quotes 0.949 / 0.966); it is computed in process
(the commands pool with GeM), with the same metric code. Embeddings are cached in
``runs/embedding-cache`` (the commands' ``--cache-dir``), so wall times here are not latencies
(those are in BENCHMARKS.md, "Recognizer latency").

    python bench/bench_realphotos_cli.py                       # ~8 min on 2 cores
    python bench/bench_realphotos_cli.py --variants lite0 "lite0 before"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import bench_recognition as br  # noqa: E402
import numpy as np  # noqa: E402

from datamodules.realphotos import DEFAULT_ROOT, alternate_split, read_realphotos  # noqa: E402
from retrieval.metrics import NONLANDMARK, recognition_at_fpr  # noqa: E402

LITE0, MOBILENET = "tf_efficientnet_lite0", "mobilenetv2_100"
#: name -> (backbone, extra `landmarks index` arguments). "lite0" is the commands' defaults (320 px
#: × scales 1 and 1.414 for a backbone, a landmark with < 15 photos indexed as its photos); "... before"
#: rows are the defaults before those measurements (224 px, one scale, photos + their mean) and
#: "... one scale" the defaults before multi-scale, the controls.
VARIANTS = {
    "lite0": (LITE0, []),
    "lite0 before": (LITE0, ["--image-size", "224", "--scales", "1", "--few-photos-mean"]),
    "lite0 one scale": (LITE0, ["--scales", "1"]),
    "lite0 224": (LITE0, ["--image-size", "224", "--scales", "1"]),
    "lite0 + mean": (LITE0, ["--few-photos-mean"]),
    "lite0 verify": (LITE0, ["--verify"]),
    "lite0 verify cnn": (LITE0, ["--verify", "--verify-local", "cnn"]),
    # Descriptor post-processing (off by default): the settings chosen on half A by
    # bench_descriptors.py for lite0 at 320 px, and QE with one neighbour, which cannot change a
    # decision (a check of the machinery: it must equal "lite0").
    "lite0 whiten": (LITE0, ["--whiten", "0.25", "--whiten-shrink", "0.1"]),
    "lite0 full whiten": (LITE0, ["--whiten", "0.5", "--whiten-shrink", "0.1"]),
    "lite0 DBA": (LITE0, ["--dba", "1"]),
    "lite0 QE 1": (LITE0, ["--query-expansion", "1"]),
    "lite0 QE 2": (LITE0, ["--query-expansion", "2"]),
    # Multi-scale embedding (the default is 1 and 1.414): the three scales, and 0.707 with 1.
    "lite0 ms": (LITE0, ["--scales", "0.707", "1", "1.414"]),
    "lite0 ms small": (LITE0, ["--scales", "0.707", "1"]),
    "mobilenetv2": (MOBILENET, []),
    "mobilenetv2 before": (MOBILENET, ["--image-size", "224", "--scales", "1", "--few-photos-mean"]),
    "mobilenetv2 one scale": (MOBILENET, ["--scales", "1"]),
    "lite1": ("tf_efficientnet_lite1", []),
    "lite2": ("tf_efficientnet_lite2", []),
}
FPR = 1e-2


def _landmarks(*args: str) -> str:
    command = [str(Path(sys.executable).parent / "landmarks"), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def _metrics(pred: list, score: np.ndarray, accepted: np.ndarray, truth: list) -> dict:
    """recall@FPR 1 % (threshold from the distractors), P@1, and the shipped decision's recall/FPR."""
    names = {name: i for i, name in enumerate(sorted({t for t in truth if t is not None}))}
    true = np.array([names[t] if t is not None else NONLANDMARK for t in truth])
    pred_row = np.array([names.get(p, -2) if p is not None else NONLANDMARK for p in pred])
    at = recognition_at_fpr(pred_row, score, true, alphas=(FPR,), user_prior=None)[FPR]
    is_query = true != NONLANDMARK
    correct = pred_row == true
    return {"recall": at["recall"], "p@1": float(correct[is_query].mean()),
            "shipped_recall": float((accepted & correct)[is_query].mean()),
            "shipped_fpr": float(accepted[~is_query].mean()), "n_queries": int(is_query.sum())}


def _cli_run(name: str, backbone: str, extra: list, files: dict, work: Path) -> dict:
    index = work / f"index-{name.replace(' ', '_')}-{files['scope']}"
    t = time.perf_counter()
    _landmarks("index", "--manifest", str(files["gallery"]), "--out", str(index), "--backbone", backbone,
               "--nonlandmarks", str(files["distractors"]), "--target-fpr", str(FPR),
               "--cache-dir", str(br.CACHE), *extra)
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    out = _landmarks("recognize", "--index", str(index), "--backbone", backbone, "--json",
                     "--cache-dir", str(br.CACHE), str(files["queries"]), str(files["distractors_txt"]))
    t_recognize = time.perf_counter() - t
    by_path = {r["path"]: r for r in map(json.loads, out.splitlines())}
    missing = [p for p in files["truth"] if p not in by_path]
    if missing or any(by_path[p].get("error") for p in files["truth"]):
        raise SystemExit(f"{name}: {len(missing)} photos without a result, e.g. {missing[:1]}")
    rows = [by_path[p] for p in files["truth"]]
    score = np.array([r["score"] if r["score"] is not None else -np.inf for r in rows], dtype=np.float64)
    accepted = np.array([bool(r["accepted"]) for r in rows])
    m = _metrics([r["landmark_id"] for r in rows], score, accepted, list(files["truth"].values()))
    return {**m, "index_s": round(t_index, 1), "recognize_s": round(t_recognize, 1)}


def _scope(table: dict, scope: str):
    """The gallery and queries of ``scope``: all 15 landmarks, or half "A" / "B" of them."""
    g, q = table["gallery"], table["queries"]
    return (g, q) if scope == "all" else (g[g["half"] == scope], q[q["half"] == scope])


def _control(table: dict, scope: str) -> dict:
    """The issue's baseline, in process: ImageNet lite0, average pooling, kNN over every gallery photo."""
    from retrieval.embedding_model import load_embedding_model

    model = load_embedding_model(backbone=LITE0, pooling="avg")
    (g, q), d = _scope(table, scope), table["distractors"]
    emb = {k: br._embed(model, list(v["path"])) for k, v in (("g", g), ("q", q), ("d", d))}
    index = br._index(emb["g"], list(g["label"]), "all", None, model.identity)
    m, score, pred = br._score(index, emb["q"], list(q["label"]), emb["d"], (FPR,))
    return {"recall": m[f"recall@{FPR:g}"], "p@1": m["p@1"], "n_queries": len(q)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_realphotos_cli")
    args = parser.parse_args()
    if not (DEFAULT_ROOT / "MANIFEST.csv").is_file():
        raise SystemExit(f"{DEFAULT_ROOT} is absent: nothing to measure")
    table = alternate_split(read_realphotos(DEFAULT_ROOT))
    args.work.mkdir(parents=True, exist_ok=True)
    distractors = table["distractors"]["path"]
    shared = {"distractors": args.work / "distractors.csv", "distractors_txt": args.work / "distractors.txt"}
    distractors.to_frame().to_csv(shared["distractors"], index=False)
    shared["distractors_txt"].write_text("".join(f"{p}\n" for p in distractors))
    scopes = {}
    for scope in ("all", "A", "B"):
        g, q = _scope(table, scope)
        files = {"scope": scope, "gallery": args.work / f"gallery-{scope}.csv",
                 "queries": args.work / f"queries-{scope}.txt", **shared}
        g.rename(columns={"label": "landmark_id"})[["path", "landmark_id"]].to_csv(files["gallery"], index=False)
        files["queries"].write_text("".join(f"{p}\n" for p in q["path"]))
        files["truth"] = {**dict(zip(q["path"], q["label"])), **{p: None for p in distractors}}
        scopes[scope] = files

    results = {"machine": br._machine(), "fpr": FPR, "rows": []}
    for scope in scopes:
        row = {"variant": "avg-pool kNN (control, in process)", "scope": scope, **_control(table, scope)}
        results["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    for name in args.variants:
        backbone, extra = VARIANTS[name]
        for scope, files in scopes.items():
            row = {"variant": name, "args": " ".join(["--backbone", backbone, *extra]), "scope": scope,
                   **_cli_run(name, backbone, extra, files, args.work)}
            results["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\nmachine: {results['machine']}\n")
    print("| variant | all 15: recall@FPR 1% / P@1 | half A (8) | half B (7) | shipped recall, FPR (all 15) |")
    print("|---|---|---|---|---|")
    by = {(r["variant"], r["scope"]): r for r in results["rows"]}
    for variant in dict.fromkeys(r["variant"] for r in results["rows"]):
        cells = [f"{by[variant, s]['recall']:.3f} / {by[variant, s]['p@1']:.3f}" for s in ("all", "A", "B")]
        shipped = by[variant, "all"]
        tail = (f"{shipped['shipped_recall']:.3f}, {shipped['shipped_fpr']:.4f}" if "shipped_recall" in shipped else "–")
        print(f"| {variant} | " + " | ".join(cells) + f" | {tail} |")


if __name__ == "__main__":
    main()
