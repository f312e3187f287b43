"""Inference evidence: index representations compared, and the Recognizer's end-to-end latency.

Three parts (results: printed Markdown tables + JSON under ``--out``):

``synthetic``  The demo world (``data/synthetic``: every landmark has 2-3 shooting angles) and
    the demo's trained checkpoint. Gallery = ``db.csv`` without the ground-truth noise rows
    (``is_noise == 1``; the demo's ``oracle_clean``) and, as a second setting, the noisy DB as is.
    Queries = ``queries.csv`` (485) + ``distractors.csv`` (5000). For each representation --
    shooting-angle centroids (a sweep of cut distances), one mean per landmark, the full gallery
    (kNN) -- recall@FPR 1e-2 / 1e-3 (threshold from the distractors, as in training-time
    evaluation), P@1, exact-search time per query and the index file size. Also: a threshold
    calibrated on ``nonlandmarks.csv`` (1500 other non-landmark photos) at FPR 1e-3, and the FPR
    and recall it gives on the 5000 distractors; and how well the clusters match the world's true
    shooting angles (adjusted Rand index against ``view``).

``realphotos``  ``../shared/realphotos`` with offline ImageNet weights (``mobilenetv2_100``,
    ``tf_efficientnet_lite0``; 224 px unless ``--image-sizes``; ``--multi-scale`` adds the
    normalised sum of the sizes' unit descriptors). Per split seed, gallery = a seeded half of each
    landmark's photos (rounded up), queries = the rest + all 164 non-landmark photos (the
    protocol of ``datamodules.realphotos.split_realphotos``, shared with ``landmarks
    realphotos``): recall at FPR 1e-2 (and 5e-2) and P@1 per representation, mean ± std over seeds.

``latency``  Per-image time of ``Recognizer.recognize(paths)`` (decode in threads, transform,
    forward, search, decision) against the network's forward pass alone on the same images,
    already decoded and transformed (the floor any recogniser pays), same batch size; passes
    interleaved, medians reported.

    python bench/bench_recognition.py synthetic
    python bench/bench_recognition.py realphotos --seeds 0 1 2 3 4
    python bench/bench_recognition.py latency --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402

from datamodules.realphotos import DEFAULT_ROOT as REALPHOTOS  # noqa: E402
from datamodules.realphotos import read_realphotos, split_realphotos  # noqa: E402

CACHE = ROOT / "runs" / "embedding-cache"


def _machine() -> str:
    import faiss
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (f"{os.cpu_count()} CPU cores ({cpu}), python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), faiss {faiss.__version__}, load average {os.getloadavg()[0]:.1f}")


def _embed(model, paths, batch_size=128, workers=2):
    from retrieval.embed import embed_paths

    result = embed_paths(model, paths, batch_size=batch_size, num_workers=workers, accelerator="cpu",
                         cache_dir=CACHE, progress=False)
    if not result.valid.all():
        raise SystemExit(f"{int((~result.valid).sum())} unreadable images, e.g. {paths[int(np.argmin(result.valid))]}")
    return result.embeddings


def _representations(thresholds, min_sizes=(2,)):
    from recognition.centroids import CentroidParams

    out = [("all", "full gallery (kNN)", None), ("mean", "one mean per landmark", None),
           ("centroids", "**default** (`landmarks index`: clusters; < 15 photos: the photos)", CentroidParams()),
           ("centroids", "< 15 photos: photos + mean (the default before)", CentroidParams(few_photos_mean=True))]
    # Every landmark clustered (few_photos=0), at each cut: what the default falls back from.
    out += [("centroids", f"clusters, cut {t:g}, min size {m}",
             CentroidParams(distance_threshold=t, min_cluster_size=m, few_photos=0))
            for m in min_sizes for t in thresholds]
    return out


def _index(emb, ids, kind, params, identity):
    from recognition.artifact import LandmarkIndex
    from recognition.centroids import CentroidParams, build_representation

    reps = build_representation(emb, ids, kind, params or CentroidParams())
    model = {"identity": identity, "key": "bench", "source": {}}
    return LandmarkIndex.from_centroids(reps, model)


def _score(index, q_emb, q_ids, d_emb, alphas):
    """recall@FPR (threshold from the distractors), P@1 and per-query search time."""
    from retrieval.metrics import NONLANDMARK, recognition_at_fpr

    row_of = {lid: i for i, lid in enumerate(index.landmark_ids)}
    true = np.array([row_of.get(i, -2) for i in q_ids] + [NONLANDMARK] * len(d_emb), dtype=np.int64)
    emb = np.concatenate([q_emb, d_emb])
    score, pred = index.top1(emb)
    fpr = recognition_at_fpr(pred, score, true, alphas=alphas, user_prior=None)
    out = {f"recall@{a:g}": fpr[a]["recall"] for a in fpr}
    out["p@1"] = float((pred[: len(q_ids)] == true[: len(q_ids)]).mean())
    return out, score, pred


def _search_time(index, emb, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        index.top1(emb)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / len(emb)


def _index_bytes(index) -> int:
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index.faiss_index, str(Path(tmp) / "x.faiss"))
        return (Path(tmp) / "x.faiss").stat().st_size


def _view_agreement(emb, ids, views, threshold):
    """Mean adjusted Rand index between each landmark's clusters and its true shooting angles."""
    from sklearn.metrics import adjusted_rand_score

    from retrieval.clustering import agglomerative_clusters

    ids = np.asarray(ids)
    scores, n_clusters, n_views = [], [], []
    for lid in dict.fromkeys(ids):
        rows = np.flatnonzero(ids == lid)
        labels = agglomerative_clusters(emb[rows], threshold)
        sizes = np.bincount(labels)
        scores.append(adjusted_rand_score(views[rows], labels))
        n_clusters.append(int((sizes >= 2).sum()))
        n_views.append(len(set(views[rows])))
    return float(np.mean(scores)), float(np.mean(n_clusters)), float(np.mean(n_views))


# ---------------------------------------------------------------------------------------------


def run_synthetic(args) -> dict:
    import faiss

    from datamodules.manifest import read_manifest
    from recognition.calibration import calibrate_threshold
    from retrieval.decision import accepts
    from retrieval.embedding_model import load_embedding_model

    faiss.omp_set_num_threads(1)  # search time per query on one core: stable on a shared machine
    world = Path(args.world)
    model = load_embedding_model(checkpoint=args.checkpoint)
    db = read_manifest(world / "db.csv")
    queries = read_manifest(world / "queries.csv")
    distractors = read_manifest(world / "distractors.csv", "nonlandmark")
    calibration = read_manifest(world / "nonlandmarks.csv", "nonlandmark")
    t = time.perf_counter()
    db_emb = _embed(model, db.paths)
    q_emb = _embed(model, queries.paths)
    d_emb = _embed(model, distractors.paths)
    c_emb = _embed(model, calibration.paths)
    print(f"embedded (or read from the cache) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    clean = db.table["is_noise"].to_numpy() == "0"
    views = db.table["view"].to_numpy()  # text; empty for noise rows that show no landmark
    db_ids = np.asarray(db.landmark_ids)
    settings = {"oracle-clean DB": clean, "noisy DB": np.ones(len(clean), bool)}
    results = {"machine": _machine(), "checkpoint": args.checkpoint, "world": str(world),
               "n_queries": len(q_emb), "n_distractors": len(d_emb), "n_calibration": len(c_emb), "rows": []}
    q_and_d = np.concatenate([q_emb, d_emb])
    # Two halves of the distractors: calibrate on one, measure on the other (and the reverse).
    halves = np.random.default_rng(0).permutation(len(d_emb)) < len(d_emb) // 2
    for setting, keep in settings.items():
        for kind, label, params in _representations(args.thresholds, args.min_sizes):
            index = _index(db_emb[keep], db_ids[keep], kind, params, model.identity)
            metrics, _, _ = _score(index, q_emb, queries.landmark_ids, d_emb, (1e-2, 1e-3))
            score, pred = index.top1(q_and_d)
            q_score, q_pred, d_score = score[: len(q_emb)], pred[: len(q_emb)], score[len(q_emb):]
            row_of = {lid: i for i, lid in enumerate(index.landmark_ids)}
            correct = q_pred == np.array([row_of.get(i, -2) for i in queries.landmark_ids])
            # (a) calibrated on nonlandmarks.csv, the non-landmark photos the checkpoint trained on
            train_cal = calibrate_threshold(index.top1(c_emb)[0], 1e-3)
            # (b) calibrated on unseen non-landmarks: half of the distractors, measured on the other half
            held = []
            for cal_half in (halves, ~halves):
                t = calibrate_threshold(d_score[cal_half], 1e-3).threshold
                held.append((accepts(d_score[~cal_half], t).mean(), (accepts(q_score, t) & correct).mean()))
            row = {
                "setting": setting, "representation": label, "vectors": len(index),
                **metrics,
                "train_nonlandmark_threshold": train_cal.threshold,
                "distractor_fpr_at_train_calibrated": float(accepts(d_score, train_cal.threshold).mean()),
                "recall_at_train_calibrated": float((accepts(q_score, train_cal.threshold) & correct).mean()),
                "heldout_fpr_at_half_calibrated": float(np.mean([h[0] for h in held])),
                "recall_at_half_calibrated": float(np.mean([h[1] for h in held])),
                "search_us_per_query": 1e6 * _search_time(index, q_and_d, args.repeats),
                "index_bytes": _index_bytes(index),
            }
            if kind == "centroids":
                ari, n_clusters, n_views = _view_agreement(db_emb[keep], db_ids[keep], views[keep],
                                                           params.distance_threshold)
                row.update(view_ari=ari, clusters_per_landmark=n_clusters, views_per_landmark=n_views,
                           dropped_images=index.build["dropped_images"])
            results["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
    _print_synthetic(results)
    return results


def _print_synthetic(results):
    print(f"\nmachine: {results['machine']}\n")
    print("| gallery | representation | vectors | recall@FPR 1e-2 | recall@FPR 1e-3 | P@1 | search µs/query "
          "| index size | view ARI (clusters ≥ 2 / true views per landmark) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        ari = f"{r['view_ari']:.2f} ({r['clusters_per_landmark']:.1f} / {r['views_per_landmark']:.1f})" \
            if "view_ari" in r else "—"
        print(f"| {r['setting']} | {r['representation']} | {r['vectors']} | {r['recall@0.01']:.3f} | "
              f"{r['recall@0.001']:.3f} | {r['p@1']:.3f} | {r['search_us_per_query']:.1f} | "
              f"{r['index_bytes'] / 1024:.0f} KiB | {ari} |")
    print("\nThreshold calibrated to FPR 1e-3: (a) on nonlandmarks.csv (1500, the checkpoint's training "
          "non-landmarks), measured on the 5000 distractors; (b) on half of the distractors, measured on the "
          "other half (mean of both ways)\n")
    print("| gallery | representation | (a) FPR on distractors | (a) recall | (b) FPR on the other half | (b) recall |")
    print("|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['setting']} | {r['representation']} | {r['distractor_fpr_at_train_calibrated']:.4f} | "
              f"{r['recall_at_train_calibrated']:.3f} | {r['heldout_fpr_at_half_calibrated']:.4f} | "
              f"{r['recall_at_half_calibrated']:.3f} |")


# ---------------------------------------------------------------------------------------------


def run_realphotos(args) -> dict:
    from retrieval.embedding_model import load_embedding_model

    if not (REALPHOTOS / "MANIFEST.csv").is_file():
        raise SystemExit(f"{REALPHOTOS} is absent: nothing to measure")
    table = read_realphotos(REALPHOTOS)
    paths = table["path"].to_numpy()
    labels = table["label"].to_numpy()
    is_landmark = table["kind"].to_numpy() == "landmark"
    names = sorted(set(labels[is_landmark]))
    results = {"machine": _machine(), "seeds": args.seeds, "n_landmark_photos": int(is_landmark.sum()),
               "n_nonlandmark_photos": int((~is_landmark).sum()), "rows": []}
    variants = []
    for backbone in args.backbones:
        per_size = {}
        for size in args.image_sizes:
            model = load_embedding_model(backbone=backbone, image_size=size)
            emb = _embed(model, list(paths), batch_size=32)
            per_size[size] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            variants.append((backbone, f"{size}", per_size[size], model.identity))
            if args.scales:
                # The shipped multi-scale model (`landmarks index --scales`): the batch resized by each scale.
                multi = load_embedding_model(backbone=backbone, image_size=size, scales=args.scales)
                emb = _embed(multi, list(paths), batch_size=32)
                variants.append((backbone, f"{size} × ({'/'.join(f'{s:g}' for s in args.scales)})",
                                 emb / np.linalg.norm(emb, axis=1, keepdims=True), multi.identity))
        if args.multi_scale and len(per_size) > 1:
            # Multi-scale descriptor: the normalised sum of the unit descriptors at every size.
            total = sum(per_size.values())
            variants.append((backbone, "+".join(map(str, per_size)), total / np.linalg.norm(total, axis=1, keepdims=True),
                             model.identity))
    # Each seed's gallery rows, in file order (as this benchmark always indexed them).
    galleries = [np.isin(paths[is_landmark], split_realphotos(table, seed)["gallery"]["path"].to_numpy())
                 for seed in args.seeds]
    for backbone, size, emb, identity in variants:
        lm_emb, lm_ids, d_emb = emb[is_landmark], labels[is_landmark], emb[~is_landmark]
        for kind_, label, params in _representations(args.thresholds, args.min_sizes):
            row = {"backbone": backbone, "image_size": size, "representation": label}
            # "all": the 15 landmarks; with --halves also half A / B of them (even / odd positions of
            # the sorted names, as `alternate_split`), every distractor each time.
            for half in ("all", "A", "B") if args.halves else ("all",):
                in_half = np.isin(lm_ids, names if half == "all" else names[{"A": 0, "B": 1}[half]::2])
                per_seed = []
                for gallery in galleries:
                    g, q = gallery & in_half, ~gallery & in_half
                    index = _index(lm_emb[g], lm_ids[g], kind_, params, identity)
                    metrics, _, _ = _score(index, lm_emb[q], list(lm_ids[q]), d_emb, (5e-2, 1e-2))
                    per_seed.append({**metrics, "vectors": len(index)})
                prefix = "" if half == "all" else f"{half}_"
                for key in per_seed[0]:
                    values = [m[key] for m in per_seed]
                    row[prefix + key] = float(np.mean(values))
                    row[prefix + key + "_std"] = float(np.std(values))
            results["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"\nmachine: {results['machine']}; split seeds {args.seeds}\n")
    print("| backbone (ImageNet) | px | representation | vectors | recall@FPR 1e-2 | recall@FPR 5e-2 | P@1 |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['backbone']} | {r['image_size']} | {r['representation']} | {r['vectors']:.0f} | {r['recall@0.01']:.3f} ± "
              f"{r['recall@0.01_std']:.3f} | {r['recall@0.05']:.3f} ± {r['recall@0.05_std']:.3f} | "
              f"{r['p@1']:.3f} ± {r['p@1_std']:.3f} |")
    if args.halves:
        print("\n| backbone (ImageNet) | px | representation | half A: recall@FPR 1e-2 / P@1 | half B |")
        print("|---|---|---|---|---|")
        for r in results["rows"]:
            print(f"| {r['backbone']} | {r['image_size']} | {r['representation']} | {r['A_recall@0.01']:.3f} / "
                  f"{r['A_p@1']:.3f} | {r['B_recall@0.01']:.3f} / {r['B_p@1']:.3f} |")
    return results


# ---------------------------------------------------------------------------------------------


def run_latency(args) -> dict:
    import torch

    from datamodules.images import load_rgb
    from datamodules.manifest import read_manifest
    from datamodules.transforms import eval_transform
    from recognition.calibration import Calibration
    from recognition.recognizer import Recognizer
    from retrieval.embedding_model import MultiScaleNet, load_embedding_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = []
    world = Path(args.world)
    if Path(args.checkpoint).is_file():
        db = read_manifest(world / "db.csv")
        queries = read_manifest(world / "queries.csv")
        cases.append(("demo checkpoint (MobileNetV2, 96 px), synthetic 96 px JPEGs",
                      load_embedding_model(checkpoint=args.checkpoint), db, queries.paths))
    if (REALPHOTOS / "MANIFEST.csv").is_file():
        real = read_realphotos(REALPHOTOS)
        landmarks = real[real["kind"] == "landmark"]
        db = SimpleNamespace(paths=landmarks["path"].tolist(), landmark_ids=landmarks["label"].tolist())
        scales = f" at scales {'/'.join(f'{s:g}' for s in args.scales)}" if args.scales else ""
        cases.append((f"{args.real_backbone} ImageNet ({args.real_image_size} px{scales}), real photos ≤ 512 px",
                      load_embedding_model(backbone=args.real_backbone, image_size=args.real_image_size,
                                           scales=args.scales), db, real["path"].tolist()))
    results = {"machine": _machine(), "batch_size": args.batch_size, "workers": args.workers, "rows": []}
    for label, model, db, photos in cases:
        photos = list(photos)[: args.images]
        db_emb = _embed(model, db.paths)
        index = _index(db_emb, db.landmark_ids, "centroids", None, model.identity)
        index.calibration = Calibration.fixed(0.5)
        if args.verify:
            # What `landmarks index --verify [--verify-local cnn]` stores: local features of a few
            # photos per landmark.
            from recognition.verification import LocalFeatures, VerificationParams

            index.local_features = LocalFeatures.for_index(index, db_emb, db.landmark_ids, db.paths,
                                                           VerificationParams.for_local(args.verify_local),
                                                           net=model.net)
            label += f", with spatial verification ({args.verify_local})"
        recognizer = Recognizer(index, model, batch_size=args.batch_size, workers=args.workers)
        transform = eval_transform(model.image_size)
        tensors = torch.stack([transform(image=load_rgb(p, max_side=2 * model.image_size))["image"] for p in photos])
        # The baseline is one forward pass at the input size, also for a multi-scale model.
        net = (model.net.net if isinstance(model.net, MultiScaleNet) else model.net).eval()

        def forward_only(net=net, tensors=tensors):
            with torch.inference_mode():
                for s in range(0, len(tensors), args.batch_size):
                    net(tensors[s:s + args.batch_size])

        def end_to_end(recognizer=recognizer, photos=photos):
            out = recognizer.recognize(photos)
            assert len(out) == len(photos) and not any(r.error for r in out)

        forward_only(), end_to_end()  # warm-up (allocator, oneDNN primitives, page cache)
        times = {"forward": [], "recognizer": []}
        for _ in range(args.repeats):
            for name, fn in (("forward", forward_only), ("recognizer", end_to_end)):
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) / len(photos))
        row = {"case": label, "images": len(photos), "image_size": model.image_size,
               "forward_ms": 1e3 * statistics.median(times["forward"]),
               "recognizer_ms": 1e3 * statistics.median(times["recognizer"]),
               "forward_runs_ms": [round(1e3 * t, 3) for t in times["forward"]],
               "recognizer_runs_ms": [round(1e3 * t, 3) for t in times["recognizer"]]}
        row["ratio"] = row["recognizer_ms"] / row["forward_ms"]
        results["rows"].append(row)
        print(json.dumps(row), file=sys.stderr)
    print(f"\nmachine: {results['machine']}; batch {args.batch_size}, {args.workers} decode threads, "
          f"{args.repeats} interleaved passes\n")
    print("| case | images | forward alone, ms/image | Recognizer end to end, ms/image | ratio |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['case']} | {r['images']} | {r['forward_ms']:.2f} | {r['recognizer_ms']:.2f} | {r['ratio']:.2f}× |")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("synthetic", "realphotos", "latency"))
    parser.add_argument("--world", default=str(ROOT / "data" / "synthetic"))
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5],
                        help="centroid cut distances to compare")
    parser.add_argument("--min-sizes", type=int, nargs="+", default=[2, 3],
                        help="centroid min_cluster_size values to compare")
    parser.add_argument("--backbones", nargs="+", default=["mobilenetv2_100", "tf_efficientnet_lite0"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224], help="realphotos: input sizes")
    parser.add_argument("--halves", action="store_true",
                        help="realphotos: also score each half of the landmarks (choose on A, confirm on B)")
    parser.add_argument("--multi-scale", action="store_true",
                        help="realphotos: also the multi-scale descriptor over --image-sizes")
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="realphotos: also each size embedded at these scales (`landmarks index --scales`); "
                             "latency: the real photos' model embeds at them (the ratio is to one pass)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=256, help="latency: photos per pass")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="latency: the Recognizer's decoding threads")
    parser.add_argument("--threads", type=int, default=0, help="latency: torch intra-op threads (0: default)")
    parser.add_argument("--verify", action="store_true", help="latency: the index verifies (landmarks index --verify)")
    parser.add_argument("--verify-local", choices=("sift", "cnn"), default="sift",
                        help="latency: the verification's local features (--verify-local)")
    parser.add_argument("--real-backbone", default="mobilenetv2_100", help="latency: the real photos' backbone")
    parser.add_argument("--real-image-size", type=int, default=224,
                        help="latency: its input size (`landmarks index --backbone` now defaults to 320)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_recognition"))
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = {"synthetic": run_synthetic, "realphotos": run_realphotos, "latency": run_latency}[args.part](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.part}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
