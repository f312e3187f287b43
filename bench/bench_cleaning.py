"""Benchmark: ``landmarks clean`` on 1M embeddings of 50k long-tailed landmarks vs naive clustering.

Data (generated in chunks straight into a memory-mapped .npy, never held whole in memory):
``--landmarks`` landmarks whose sizes follow a power law ``max(--min-size, round(--largest x
(rank+1)^-a))`` with ``a`` chosen so that they sum to ``--rows``; each landmark has 1-3 shooting
angles (view centre = normalise(landmark centre + N(0, 1.5/d I)); an image = normalise(view centre
+ N(0, (1/3)/d I)), so images of one angle are ~0.25 apart in cosine distance, of two angles ~0.7,
of two landmarks ~1.0). ``--noise`` of the rows are wrong labels: half another landmark's image,
half a random direction (no landmark). ``--duplicates`` landmarks repeat another one's angles.
Rows are shuffled, as in a real database. Ground truth goes into the manifest (``is_noise``,
``true_landmark_id``), so the run also reports precision/recall.

Method
------
* ``clean``: a fresh subprocess runs :func:`cleaning.command.clean_manifest` (the code behind
  ``landmarks clean --embeddings``) on the generated manifest + .npy with ``--jobs`` worker
  processes, no HTML report (the images do not exist), and writes ``clean.csv`` and
  ``summary.json``. Wall time covers the whole call (reading the manifest, the algorithm, the
  FAISS steps, writing the outputs), not interpreter start-up.
* ``naive``: a fresh subprocess per size runs one agglomerative clustering (average linkage,
  cosine, :func:`retrieval.clustering.agglomerative_clusters`: BLAS distances + fastcluster) over
  the first ``n`` rows of the database, ignoring landmarks — what "cluster the whole database"
  costs. Its O(n²) time and memory are extrapolated to ``--rows``.
* Peak memory of ``clean``: sampled every 0.2 s from ``/proc``: the main process's anonymous
  (heap) and file-backed resident pages (the memory-mapped embeddings and the workers' row file:
  page cache the kernel can drop under pressure; the input alone is ``rows x dim x 4`` bytes),
  and the largest single worker (all pages, and anonymous only). ``peak_rss_mib`` is the main
  process's ``VmHWM`` (both kinds; ``ru_maxrss`` would include the parent's mark, see _peak_mib).
* ``largest``: step 1 on the largest landmark alone in a fresh process (``VmHWM`` after
  resetting it): what one worker needs at most, whatever the database size.
* ``naive`` peak memory: ``VmHWM`` of its subprocess.

Usage::

    python bench/bench_cleaning.py                 # the BENCHMARKS.md setting (~10 min on 2 cores)
    python bench/bench_cleaning.py --small         # 50k rows, 2.5k landmarks: a ~1 minute check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def landmark_sizes(rows: int, landmarks: int, largest: int, min_size: int) -> np.ndarray:
    """Power-law sizes summing to ~``rows`` with the largest class ``largest`` (bisection on the exponent)."""
    rank = np.arange(1, landmarks + 1, dtype=np.float64)

    def sizes(a: float) -> np.ndarray:
        return np.maximum(min_size, np.round(largest * rank ** -a)).astype(np.int64)

    lo, hi = 0.01, 5.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if sizes(mid).sum() < rows else (mid, hi)
    return sizes(hi)


def generate(folder: Path, args) -> dict:
    """Write ``emb.npy`` + ``db.csv`` (with ground truth) into ``folder``; return what was made."""
    import pandas as pd

    rng = np.random.default_rng(args.seed)
    d = args.dim
    sizes = landmark_sizes(args.rows, args.landmarks, args.largest, args.min_size)
    n = int(sizes.sum())
    ids = np.arange(args.landmarks) + 100000
    structure = np.arange(args.landmarks)  # duplicates show another landmark's structure
    dup = rng.choice(np.arange(1, args.landmarks), size=args.duplicates, replace=False)
    originals = np.setdiff1d(np.arange(args.landmarks), dup)
    structure[dup] = rng.choice(originals, size=args.duplicates, replace=False)
    num_views = rng.integers(1, 4, size=args.landmarks)

    def views_of(k: int) -> np.ndarray:
        # Deterministic per structure, so a duplicate sees the very same angles.
        g = np.random.default_rng([args.seed, int(k)])
        centre = g.standard_normal(d)
        centre /= np.linalg.norm(centre)
        v = centre + np.sqrt(1.5 / d) * g.standard_normal((int(num_views[k]), d))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    emb = np.lib.format.open_memmap(folder / "emb.npy", mode="w+", dtype=np.float32, shape=(n, d))
    position = rng.permutation(n)  # row order of the database: shuffled
    label = np.repeat(np.arange(args.landmarks), sizes)
    noisy = rng.random(n) < args.noise
    no_landmark = noisy & (rng.random(n) < 0.5)
    shown = structure[label].copy()  # the structure each image really shows (-1: none)
    wrong = noisy & ~no_landmark
    other = rng.choice(originals, size=int(wrong.sum()))
    clash = other == structure[label[wrong]]
    other[clash] = originals[(np.searchsorted(originals, other[clash]) + 1) % len(originals)]
    shown[wrong] = other
    shown[no_landmark] = -1
    start = 0
    chunk_rows = 1 << 16
    order = np.argsort(shown, kind="stable")  # generate structure by structure, in chunks
    for s in range(0, n, chunk_rows):
        rows = order[s:s + chunk_rows]
        block = np.empty((len(rows), d), dtype=np.float32)
        for k in np.unique(shown[rows]):
            mask = shown[rows] == k
            m = int(mask.sum())
            if k < 0:
                x = rng.standard_normal((m, d))
            else:
                v = views_of(int(k))
                x = v[rng.integers(0, len(v), size=m)] + np.sqrt((1 / 3) / d) * rng.standard_normal((m, d))
            block[mask] = x / np.linalg.norm(x, axis=1, keepdims=True)
        emb[position[rows]] = block
        start += len(rows)
    emb.flush()
    del emb
    true_id = np.where(shown >= 0, ids[np.maximum(shown, 0)], -1)
    table = pd.DataFrame({
        "path": [f"img/{i}.jpg" for i in range(n)],
        "landmark_id": np.empty(n, dtype=object),
        "is_noise": np.empty(n, dtype=object),
        "true_landmark_id": np.empty(n, dtype=object),
    })
    table.loc[position, "landmark_id"] = ids[label].astype(str)
    table.loc[position, "is_noise"] = noisy.astype(int).astype(str)
    table.loc[position, "true_landmark_id"] = np.where(true_id >= 0, true_id.astype(str), "")
    table.to_csv(folder / "db.csv", index=False)
    return {"rows": n, "landmarks": args.landmarks, "largest": int(sizes.max()), "smallest": int(sizes.min()),
            "median_size": float(np.median(sizes)), "noise_rows": int(noisy.sum()), "duplicates": args.duplicates,
            "sum_of_squared_sizes": int((sizes.astype(np.float64) ** 2).sum())}


def _peak_mib() -> dict:
    # VmHWM, not ru_maxrss: a child started by fork+exec inherits its parent's ru_maxrss (Linux
    # keeps the larger of the old and new address space's marks), VmHWM belongs to the new one.
    return {"peak_rss_mib": round(_status_kib("self", ("VmHWM",))["VmHWM"] / 1024, 1)}


def _status_kib(pid: str | int, fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in fields:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


class MemorySampler(threading.Thread):
    """Peak resident memory of this process split into anonymous (heap) and file-backed (the
    memory-mapped embeddings) pages, and the peak of each worker process, sampled every 0.2 s.

    ``ru_maxrss`` cannot tell the two kinds apart, and a spawned worker inherits its parent's
    high-water mark through fork+exec, so its own ``ru_maxrss`` says nothing about the worker.
    """

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak = {"parent_anon": 0, "parent_file": 0, "parent_total": 0, "worker_max": 0, "worker_anon_max": 0,
                     "workers_sum": 0}

    def _children(self) -> list[str]:
        pids = []
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/children") as f:
                    pids += f.read().split()
            except OSError:
                pass
        return pids

    def run(self) -> None:
        while not self.stop.wait(0.2):
            me = _status_kib("self", ("RssAnon", "RssFile", "VmRSS"))
            status = [_status_kib(pid, ("VmRSS", "RssAnon")) for pid in self._children()]
            workers = [w.get("VmRSS", 0) for w in status]
            for key, value in (("parent_anon", me.get("RssAnon", 0)), ("parent_file", me.get("RssFile", 0)),
                               ("parent_total", me.get("VmRSS", 0)), ("worker_max", max(workers, default=0)),
                               ("worker_anon_max", max((w.get("RssAnon", 0) for w in status), default=0)),
                               ("workers_sum", sum(workers))):
                self.peak[key] = max(self.peak[key], value)

    def result(self) -> dict:
        return {f"peak_{k}_mib": round(v / 1024, 1) for k, v in self.peak.items()}


def run_clean(folder: Path, jobs: int, image_rule: str = "clusters") -> dict:
    from cleaning.algorithm import CleaningParams
    from cleaning.command import clean_manifest

    sampler = MemorySampler()
    sampler.start()
    start = time.perf_counter()
    result = clean_manifest(folder / "db.csv", folder / "out", embeddings=str(folder / "emb.npy"),
                            params=CleaningParams(image_rule=image_rule), jobs=jobs, report=False, progress=False)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    summary = json.loads((folder / "out" / "summary.json").read_text())
    return {"image_rule": image_rule, "seconds": round(seconds, 2), **_peak_mib(), **sampler.result(), "counts": result.counts(),
            "ground_truth": {k: summary["ground_truth"][k] for k in ("removal", "duplicates")}}


def run_largest_class(folder: Path) -> dict:
    """Step 1 on the largest landmark alone, in a fresh process: the per-worker memory bound."""
    import pandas as pd

    from cleaning.algorithm import CleaningParams, cluster_landmark

    ids = pd.read_csv(folder / "db.csv", usecols=["landmark_id"], dtype=str)["landmark_id"]
    largest = ids.value_counts().index[0]
    rows = np.flatnonzero(ids.to_numpy() == largest)
    x = np.asarray(np.load(folder / "emb.npy", mmap_mode="r", allow_pickle=False)[rows])
    before = _status_kib("self", ("VmRSS",))["VmRSS"]
    try:  # reset the high-water mark (Linux >= 4.0), so VmHWM is this step's peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    start = time.perf_counter()
    clusters = cluster_landmark(x, CleaningParams())
    seconds = time.perf_counter() - start
    peak = _status_kib("self", ("VmHWM",))["VmHWM"]
    return {"rows": int(len(rows)), "seconds": round(seconds, 2), "valid_clusters": clusters.num_valid,
            "peak_extra_mib": round((peak - before) / 1024, 1)}


def run_naive(folder: Path, n: int) -> dict:
    from retrieval.clustering import agglomerative_clusters

    x = np.load(folder / "emb.npy", mmap_mode="r", allow_pickle=False)
    sample = np.ascontiguousarray(x[:n])
    start = time.perf_counter()
    labels = agglomerative_clusters(sample, 0.5, "average")
    seconds = time.perf_counter() - start
    return {"n": n, "seconds": round(seconds, 2), **_peak_mib(), "clusters": int(labels.max() + 1),
            "condensed_matrix_mib": round(n * (n - 1) / 2 * 8 / 2**20, 1)}


def _subprocess(*argv: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--landmarks", type=int, default=50_000)
    parser.add_argument("--largest", type=int, default=5000)
    parser.add_argument("--min-size", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--duplicates", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--naive-sizes", default="10000,20000", help="comma-separated n for the naive clustering")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-rule", default="clusters", choices=("clusters", "evidence"),
                        help="CleaningParams.image_rule of the timed run")
    parser.add_argument("--small", action="store_true", help="50k rows, 2.5k landmarks (largest 250), naive n=5000")
    parser.add_argument("--keep", default=None, help="folder to generate into and keep (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "FOLDER", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, folder, arg = args.child
        runs = {"clean": lambda: run_clean(Path(folder), int(arg.split(":")[0]), *arg.split(":")[1:]), "naive": lambda: run_naive(Path(folder), int(arg)),
                "largest": lambda: run_largest_class(Path(folder))}
        out = runs[what]()
        print(json.dumps(out))
        return
    if args.small:
        args.rows, args.landmarks, args.largest, args.duplicates, args.naive_sizes = 50_000, 2500, 250, 10, "5000"

    with tempfile.TemporaryDirectory(prefix="bench-cleaning-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        data = generate(folder, args)
        data["generate_seconds"] = round(time.perf_counter() - start, 1)
        print(f"data: {json.dumps(data)}", flush=True)
        results = {"data": data, "jobs": args.jobs, "cpus": os.cpu_count(), "naive": []}
        results["clean"] = _subprocess("--child", "clean", str(folder), f"{args.jobs}:{args.image_rule}")
        print(f"clean: {json.dumps(results['clean'])}", flush=True)
        results["largest_class"] = _subprocess("--child", "largest", str(folder), "0")
        print(f"largest class alone: {json.dumps(results['largest_class'])}", flush=True)
        for n in [int(s) for s in args.naive_sizes.split(",") if s]:
            naive = _subprocess("--child", "naive", str(folder), str(n))
            scale = (data["rows"] / n) ** 2
            naive["extrapolated_to_rows"] = {"hours": round(naive["seconds"] * scale / 3600, 2),
                                             "condensed_matrix_gib": round(naive["condensed_matrix_mib"] * scale / 1024, 1)}
            results["naive"].append(naive)
            print(f"naive: {json.dumps(naive)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
