"""Spatial verification of the global top-5 on the real photos: does it raise recall at low FPR?

Per photo: OpenCV SIFT (1,000 keypoints, longer side 640 px). Per query and each of its 5 nearest
gallery photos by the global embedding (offline ImageNet ``--backbone``, ``--image-size`` 224 px
by default (``landmarks index --backbone`` embeds at 320), GeM; the
embedding cache of ``bench_recognition.py``): Lowe's ratio test (0.8), a homography by
``cv2.USAC_MAGSAC`` (5 px), the inlier count and the inliers' convex-hull share of the query
image. Candidate scores combine the global cosine and the inliers; recall at FPR 1e-2 / 5e-2 is
set by the distractors' scores, as ``bench_recognition.py realphotos`` does, on the same splits.
The first row (global score only) is the control: it must equal kNN in that benchmark.

``--shipped`` measures what ``landmarks index --verify`` ships instead
(:mod:`recognition.verification`): the default centroid index, a few stored photos per landmark
(:func:`choose_photos`), each query's best 3 landmarks verified against those photos, the
candidate score ``cosine + weight × min(inliers, 50)`` for ``inliers ≥ min_inliers``; a sweep of
weight and ``min_inliers``, with the unverified index as the control.

``--local cnn`` replaces SIFT by DELF-style features (``landmarks index --verify-local cnn``):
the global backbone's own stride-16 feature map on the photo at ``--max-side``, its
``--features`` cells of largest norm, matched as mutual nearest neighbours, MAGSAC at one cell
(16 px).

    python bench/bench_verification.py --seeds 0 1 2
    python bench/bench_verification.py --local cnn --image-size 320 --max-side 480 --features 500 --seeds 0 1 2
    python bench/bench_verification.py --shipped --seeds 0 1 2 3 4
    python bench/bench_verification.py --shipped --local cnn --image-size 320 --max-side 480 --features 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_recognition as br  # noqa: E402

from datamodules.images import load_rgb  # noqa: E402
from datamodules.realphotos import DEFAULT_ROOT, read_realphotos, split_realphotos  # noqa: E402
from recognition.artifact import LandmarkIndex  # noqa: E402
from recognition.verification import (  # noqa: E402
    CNN_STRIDE,
    LocalFeatures,
    VerificationParams,
    extract,
    inlier_bonus,
    make_extractor,
    match_descriptors,
)
from retrieval.embedding_model import load_embedding_model  # noqa: E402
from retrieval.metrics import NONLANDMARK, recognition_at_fpr  # noqa: E402

TOP = 5


def sift_features(paths) -> list:
    sift = cv2.SIFT_create(nfeatures=1000)
    out = []
    for path in paths:
        grey = cv2.cvtColor(load_rgb(path, max_side=640), cv2.COLOR_RGB2GRAY)
        keypoints, descriptors = sift.detectAndCompute(grey, None)
        out.append((np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2), descriptors, grey.shape))
    return out


def cnn_features(paths, backbone: str, max_side: int, keep: int) -> list:
    """DELF-style features (``landmarks index --verify --verify-local cnn``: the offline ImageNet
    ``backbone``'s stride-16 cells of largest norm) in :func:`sift_features`' format."""
    from lightning_modules import EmbeddingNet

    net = EmbeddingNet(backbone, pretrained="offline", embedding_size=None).eval()
    extractor = make_extractor(VerificationParams.for_local("cnn", max_side=max_side, n_features=keep), net)
    out = []
    for path in paths:
        rgb = load_rgb(path, max_side=max_side)
        out.append((*extractor(rgb), rgb.shape[:2]))
    return out


def verify(a, b, params: VerificationParams) -> tuple[int, float]:
    """(MAGSAC homography inliers, their convex hull's share of image a) for a pair of photos;
    descriptors matched as ``landmarks index --verify`` matches them (``match_descriptors``: SIFT
    by Lowe's ratio test, CNN cells as mutual nearest neighbours), MAGSAC at ``params.ransac_px``."""
    (points_a, desc_a, shape_a), (points_b, desc_b, _) = a, b
    if desc_a is None or desc_b is None or len(desc_a) < 8 or len(desc_b) < 8:
        return 0, 0.0
    pairs = list(zip(*match_descriptors(desc_a, desc_b, params)))
    if len(pairs) < 8:
        return 0, 0.0
    src = points_a[[i for i, _ in pairs]]
    dst = points_b[[j for _, j in pairs]]
    _, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, params.ransac_px, maxIters=2000, confidence=0.999)
    if mask is None:
        return 0, 0.0
    inliers = mask.ravel().astype(bool)
    if inliers.sum() < 4:
        return int(inliers.sum()), 0.0
    return int(inliers.sum()), float(cv2.contourArea(cv2.convexHull(src[inliers])) / (shape_a[0] * shape_a[1]))


def shipped(args) -> None:
    """The sweep over what ``landmarks index --verify`` ships (see the module docstring)."""
    table = read_realphotos(DEFAULT_ROOT)
    paths, labels = table["path"].to_numpy(), table["label"].to_numpy()
    is_landmark = table["kind"].to_numpy() == "landmark"
    # Raw inlier counts; each config's min_inliers applies below.
    raw = VerificationParams.for_local(args.local, min_inliers=4, max_side=args.max_side, n_features=args.features)
    net = None
    if args.local == "cnn":
        net = load_embedding_model(backbone=args.backbone, image_size=args.image_size).net
    extractor = make_extractor(raw, net)
    start = time.perf_counter()
    features = {path: extract(path, raw, extractor) for path in paths}
    sift_s = time.perf_counter() - start
    emb = br._embed(load_embedding_model(backbone=args.backbone, image_size=args.image_size), list(paths), batch_size=32)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    landmark_rows, distractor_rows = np.flatnonzero(is_landmark), np.flatnonzero(~is_landmark)
    runs, match_s, n_verified = [], 0.0, 0
    for seed in args.seeds:
        in_gallery = set(split_realphotos(table, seed)["gallery"]["path"])
        gallery = np.array([i for i in landmark_rows if paths[i] in in_gallery])
        queries = np.array([i for i in landmark_rows if paths[i] not in in_gallery])
        photos = np.concatenate([queries, distractor_rows])
        # The index `landmarks index` builds by default, and the photos `--verify` stores.
        index = LandmarkIndex.from_embeddings(emb[gallery], list(labels[gallery]))
        local = LocalFeatures.for_index(index, emb[gallery], list(labels[gallery]), list(paths[gallery]), raw,
                                        cache=features, net=net)
        scores, rows = index.search(emb[photos], 5)
        start = time.perf_counter()
        inliers = np.stack([local.candidate_inliers(features[paths[p]], rows[j]) for j, p in enumerate(photos)])
        match_s += time.perf_counter() - start
        n_verified += len(photos)
        truth = np.array(list(labels[queries]) + [None] * len(distractor_rows), dtype=object)
        runs.append((scores, rows, inliers, truth, len(queries), np.array(index.landmark_ids, dtype=object)))
    what = "SIFT keypoints" if args.local == "sift" else f"CNN cells (stride {CNN_STRIDE})"
    print(f"\n{args.backbone} at {args.image_size} px, split seeds {args.seeds}; {args.features} {what} at ≤ {args.max_side} px: {1e3 * sift_s / len(paths):.0f} ms/photo, "
          f"matching {1e3 * match_s / n_verified:.0f} ms/photo (up to 3 landmarks × 5 photos)\n")
    print("| candidate score | recall@FPR 1e-2 (per seed) | recall@FPR 5e-2 | P@1 | photos verified at FPR 1e-2 |")
    print("|---|---|---|---|---|")
    configs = [("global cosine (control: the index without --verify)", None)]
    weights, minimums = ((0.001, 0.002, 0.005), (8, 15, 25)) if args.local == "sift" else ((0.002, 0.005, 0.01),
                                                                                           (10, 15, 20, 25))
    for weight in weights:
        for min_inliers in minimums:
            configs.append((f"+ {weight} × min(inliers, 50), inliers ≥ {min_inliers}",
                            VerificationParams.for_local(args.local, weight=weight, min_inliers=min_inliers)))
    for name, params in configs:
        results = []
        for scores, rows, inliers, truth, n_queries, ids in runs:
            verified = scores if params is None else scores + inlier_bonus(inliers, params)
            best = np.argmax(verified, axis=1)
            pred_rows = rows[np.arange(len(rows)), best]
            classes = {lm: i for i, lm in enumerate(ids)}
            truth_int = np.array([NONLANDMARK if t is None else classes[t] for t in truth])
            value = verified[np.arange(len(rows)), best].astype(float)
            at = recognition_at_fpr(pred_rows, value, truth_int, alphas=(1e-2, 5e-2), user_prior=None)
            p1 = float((pred_rows[:n_queries] == truth_int[:n_queries]).mean())
            # Photos the Recognizer verifies at that threshold: the others cannot reach it even
            # with the largest bonus and skip verification (Recognizer.verify).
            share = 0.0 if params is None else float(np.mean(scores[:, 0] + params.max_bonus >= at[1e-2]["threshold"]))
            results.append((at[1e-2]["recall"], at[5e-2]["recall"], p1, share))
        r = np.array(results)
        print(f"| {name} | {r[:, 0].mean():.3f} ({', '.join(f'{v:.3f}' for v in r[:, 0])}) | {r[:, 1].mean():.3f} | "
              f"{r[:, 2].mean():.3f} | {r[:, 3].mean():.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--shipped", action="store_true", help="the sweep over what `landmarks index --verify` ships")
    parser.add_argument("--image-size", type=int, default=224,
                        help="--shipped: the network's input (`landmarks index --backbone` embeds at 320)")
    parser.add_argument("--max-side", type=int, default=640, help="photo size for local features (the top-5 sweep's "
                        "SIFT is always 1,000 keypoints at 640 px)")
    parser.add_argument("--features", type=int, default=1000, help="SIFT keypoints / CNN cells per photo")
    parser.add_argument("--local", choices=("sift", "cnn"), default="sift",
                        help="local features: SIFT, or the global backbone's own stride-16 cells (DELF-style)")
    args = parser.parse_args()
    if args.shipped:
        return shipped(args)
    table = read_realphotos(DEFAULT_ROOT)
    paths, labels = table["path"].to_numpy(), table["label"].to_numpy()
    is_landmark = table["kind"].to_numpy() == "landmark"
    start = time.perf_counter()
    if args.local == "sift":
        features = sift_features(paths)
        described = "SIFT, 1,000 keypoints at 640 px, ratio test"
    else:
        features = cnn_features(paths, args.backbone, args.max_side, args.features)
        described = (f"CNN features (DELF-style): {args.backbone}'s stride-{CNN_STRIDE} cells, top {args.features} by "
                     f"norm at {args.max_side} px, mutual NN, MAGSAC at {CNN_STRIDE} px")
    per_photo = 1e3 * (time.perf_counter() - start) / len(paths)
    print(f"{described}: {per_photo:.0f} ms/photo")
    emb = br._embed(load_embedding_model(backbone=args.backbone, image_size=args.image_size), list(paths), batch_size=32)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    pair_params = VerificationParams.for_local(args.local)  # ratio 0.8 / mutual NN; MAGSAC 5 / 16 px
    landmark_rows, distractor_rows = np.flatnonzero(is_landmark), np.flatnonzero(~is_landmark)
    classes = {name: i for i, name in enumerate(sorted(set(labels[is_landmark])))}
    runs = []
    for seed in args.seeds:
        in_gallery = set(split_realphotos(table, seed)["gallery"]["path"])
        gallery = np.array([i for i in landmark_rows if paths[i] in in_gallery])
        queries = np.array([i for i in landmark_rows if paths[i] not in in_gallery])
        photos = np.concatenate([queries, distractor_rows])
        truth = np.array([classes[labels[i]] for i in queries] + [NONLANDMARK] * len(distractor_rows))
        sims = emb[photos] @ emb[gallery].T
        candidates = []  # per photo: (class, global cosine, inliers, spread) of its top-5 gallery photos
        for row, photo in enumerate(photos):
            top = np.argsort(-sims[row])[:TOP]
            candidates.append([(classes[labels[gallery[j]]], sims[row, j],
                                *verify(features[photo], features[gallery[j]], pair_params)) for j in top])
        runs.append((candidates, truth, len(queries)))

    def evaluate(name: str, score) -> None:
        results = []
        for candidates, truth, n_queries in runs:
            best = [max(((c[0], score(c)) for c in cands), key=lambda t: t[1]) for cands in candidates]
            pred, value = np.array([b[0] for b in best]), np.array([b[1] for b in best], float)
            at = recognition_at_fpr(pred, value, truth, alphas=(1e-2, 5e-2), user_prior=None)
            results.append((at[1e-2]["recall"], at[5e-2]["recall"], float((pred[:n_queries] == truth[:n_queries]).mean())))
        r = np.array(results)
        print(f"| {name} | {r[:, 0].mean():.3f} ({', '.join(f'{v:.3f}' for v in r[:, 0])}) | {r[:, 1].mean():.3f} | "
              f"{r[:, 2].mean():.3f} |")

    print(f"\n{args.backbone} at {args.image_size} px, split seeds {args.seeds}; {described}\n")
    print("| candidate score | recall@FPR 1e-2 (per seed) | recall@FPR 5e-2 | P@1 |")
    print("|---|---|---|---|")
    evaluate("global cosine (control: kNN)", lambda c: c[1])
    evaluate("inliers only", lambda c: c[2])
    for w in (0.002, 0.005, 0.01):
        evaluate(f"cosine + {w} × min(inliers, 50)", lambda c, w=w: c[1] + w * min(c[2], 50))
        evaluate(f"cosine + {w} × min(inliers, 50) if hull > 5 %", lambda c, w=w: c[1] + w * min(c[2], 50) * (c[3] > 0.05))


if __name__ == "__main__":
    main()
