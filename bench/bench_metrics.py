"""Benchmark: retrieval.metrics.evaluate_recognition vs pytorch-metric-learning's AccuracyCalculator.

Both compute precision@1 of ``n_query`` queries against an ``n_gallery`` gallery of clustered,
L2-normalised float32 embeddings with a landmark-like hierarchy: ``regions`` region centres
~ N(0, region_std^2 I); each class (landmark) centre = a random region's centre + N(0, class_std^2 I);
each photo = its class centre + N(0, noise^2 I), then L2-normalised. Landmarks of one region are
confusable (so P@1 < 1) while different regions are far apart (the structure real embeddings of
a trained model have, and which approximate indexes exploit). ``--regions 0`` gives flat,
isotropic clusters instead (class centres ~ N(0, I)): harder for approximate indexes.

Method
------
* The embeddings are generated once and saved as .npy in a temporary directory.
* Every (method, repeat) runs in a FRESH subprocess, which imports everything, loads the arrays,
  then resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0),
  runs the method, and reports ``VmHWM - VmRSS_before``: the peak resident memory the method
  added on top of the loaded embeddings. This sees faiss' C++ and BLAS allocations, which
  ``tracemalloc`` does not. Where clear_refs is not writable, it falls back to
  ``ru_maxrss - RSS_before`` (the same quantity, because loading .npy files has no transient).
* Wall time covers only the method call (index build + search + metric), not imports or loading.
* Reported: median time over repeats, max of the peak memory over repeats.

Methods
-------
* ``pml``: ``AccuracyCalculator(include=("precision_at_1",), k=1, device=cpu).get_accuracy(query,
  query_labels, gallery, gallery_labels, ref_includes_query=False)``. ``k=1`` is required: PML's
  default ``k=None`` searches the whole gallery per query (20k x 100k ids + distances = 24 GB).
* ``flat``: ``evaluate_recognition(..., index_kind="flat", k=...)`` -- exact; also computes mAP@k
  and GAP.
* ``ivf``: the same with ``index_kind="ivf"`` (approximate; nlist / nprobe on the command line).

Usage::

    python bench/bench_metrics.py                    # defaults: the BENCHMARKS.md setting
    python bench/bench_metrics.py --n-gallery 20000 --n-query 4000 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# worker (one method, one run, fresh process)
# ----------------------------------------------------------------------------------------------


def worker(method: str, data_dir: Path, k: int, nlist: int | None, nprobe: int) -> dict:
    import numpy as np
    import torch

    if method == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    else:
        from retrieval.metrics import evaluate_recognition

    gallery = np.load(data_dir / "gallery.npy")
    g_labels = np.load(data_dir / "gallery_labels.npy")
    query = np.load(data_dir / "query.npy")
    q_labels = np.load(data_dir / "query_labels.npy")

    rss_before_kb = _status_kb("VmRSS")
    hwm_reset = _reset_peak()
    t0 = time.perf_counter()
    if method == "pml":
        calc = AccuracyCalculator(include=("precision_at_1",), k=1, device=torch.device("cpu"))
        acc = calc.get_accuracy(
            torch.from_numpy(query),
            torch.from_numpy(q_labels),
            torch.from_numpy(gallery),
            torch.from_numpy(g_labels),
            ref_includes_query=False,
        )
        p1 = acc["precision_at_1"]
        extra = {}
    else:
        kwargs = {"nlist": nlist or None, "nprobe": nprobe} if method == "ivf" else {}
        res = evaluate_recognition(
            gallery, g_labels, query, q_labels, None, k=k, index_kind=method, **kwargs
        )
        p1 = res.metrics["p@1"]
        extra = {f"map@{k}": res.metrics[f"map@{k}"], "gap": res.metrics["gap"]}
    seconds = time.perf_counter() - t0
    if hwm_reset:
        peak_kb = _status_kb("VmHWM")
        how = "VmHWM after clear_refs"
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "ru_maxrss"
    return {
        "method": method,
        "seconds": seconds,
        "peak_extra_mb": (peak_kb - rss_before_kb) / 1024,
        "rss_before_mb": rss_before_kb / 1024,
        "peak_how": how,
        "p@1": p1,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def make_data(out: Path, n_gallery: int, n_query: int, dim: int, n_classes: int, regions: int,
              region_std: float, class_std: float, noise: float, seed: int) -> float:
    import numpy as np

    rng = np.random.default_rng(seed)
    if regions > 0:
        region_centers = region_std * rng.standard_normal((regions, dim), dtype=np.float32)
        centers = region_centers[rng.integers(0, regions, n_classes)]
        centers += class_std * rng.standard_normal((n_classes, dim), dtype=np.float32)
    else:
        centers = rng.standard_normal((n_classes, dim), dtype=np.float32)

    def make(n: int):
        labels = rng.integers(0, n_classes, n)
        x = centers[labels]
        x += noise * rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, labels

    gallery, g_labels = make(n_gallery)
    query, q_labels = make(n_query)
    np.save(out / "gallery.npy", gallery)
    np.save(out / "gallery_labels.npy", g_labels)
    np.save(out / "query.npy", query)
    np.save(out / "query_labels.npy", q_labels)
    return (gallery.nbytes + query.nbytes) / 2**20


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-gallery", type=int, default=100_000)
    p.add_argument("--n-query", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--regions", type=int, default=500, help="0: no hierarchy, class centres ~ N(0, I)")
    p.add_argument("--region-std", type=float, default=1.0)
    p.add_argument("--class-std", type=float, default=0.3)
    p.add_argument("--noise", type=float, default=0.8, help="per-dimension std of a photo around its class centre")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="pml,flat,ivf")
    p.add_argument("--k", type=int, default=10, help="search depth / mAP@k of evaluate_recognition")
    p.add_argument("--nlist", type=int, default=316, help="IVF lists (~sqrt(n_gallery); 0: build_index's default)")
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.k, args.nlist, args.nprobe)))
        return

    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        emb_mb = make_data(data, args.n_gallery, args.n_query, args.dim, args.classes, args.regions,
                           args.region_std, args.class_std, args.noise, args.seed)
        print(f"data: {args.n_gallery} x {args.n_query} x {args.dim}, {emb_mb:.0f} MiB, "
              f"generated in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.repeats):
            for m in methods:  # interleaved, so drift (thermal, neighbours) hits every method alike
                cmd = [sys.executable, __file__, "--worker", m, "--data", str(data), "--k", str(args.k),
                       "--nprobe", str(args.nprobe)]
                if args.nlist is not None:
                    cmd += ["--nlist", str(args.nlist)]
                env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    sys.exit(f"{m} failed:\n{out.stderr}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["loadavg_1min_after"] = os.getloadavg()[0]
                runs[m].append(r)
                print(f"  rep {rep} {m}: {r['seconds']:.2f}s, +{r['peak_extra_mb']:.0f} MiB, "
                      f"P@1 {r['p@1']:.6f}", file=sys.stderr)

    summary = {
        m: {
            "median_s": statistics.median(r["seconds"] for r in rs),
            "times": [round(r["seconds"], 2) for r in rs],
            "peak_extra_mb": max(r["peak_extra_mb"] for r in rs),
            "p@1": rs[0]["p@1"],
            "rest": {k: v for k, v in rs[0].items() if k.startswith(("map@", "gap"))},
            "peak_how": rs[0]["peak_how"],
            "loadavg": [r["loadavg_1min_after"] for r in rs],
        }
        for m, rs in runs.items()
    }
    base = summary.get("pml")
    print(f"\nMachine: {os.cpu_count()} CPU cores, {lscpu_model()}; embeddings {emb_mb:.0f} MiB "
          f"({args.n_gallery} + {args.n_query}) x {args.dim} float32; "
          f"peak memory via {next(iter(summary.values()))['peak_how']}")
    print(f"Command: python bench/bench_metrics.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| method | wall time, median (runs) | speed-up vs PML | peak extra memory | x embeddings | P@1 | P@1 - PML's | other |")
    print("|---|---|---|---|---|---|---|---|")
    for m, s in summary.items():
        speed = f"{base['median_s'] / s['median_s']:.2f}x" if base else "-"
        label = {"pml": "PML AccuracyCalculator (k=1)", "flat": f"evaluate_recognition flat (k={args.k})",
                 "ivf": f"evaluate_recognition ivf (k={args.k}, nlist={args.nlist or 'default'}, nprobe={args.nprobe})"}[m]
        rest = ", ".join(f"{k}={v:.4f}" for k, v in s["rest"].items())
        delta = f"{s['p@1'] - base['p@1']:+.6f}" if base else "-"
        print(f"| {label} | {s['median_s']:.2f} s ({', '.join(map(str, s['times']))}) | {speed} | "
              f"{s['peak_extra_mb']:.0f} MiB | {s['peak_extra_mb'] / emb_mb:.2f} | {s['p@1']:.6f} | {delta} | {rest} |")
    loads = [x for s in summary.values() for x in s["loadavg"]]
    print(f"\n1-min load average after the runs: {min(loads):.2f} .. {max(loads):.2f} (2 cores)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json), "data": None},
                                         "summary": summary, "runs": runs}, indent=2, default=str))


if __name__ == "__main__":
    main()
