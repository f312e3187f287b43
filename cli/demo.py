"""The main job: the paper's whole system, end to end, on the noisy synthetic world.

``landmarks demo`` runs, in order, each stage through the project's own commands' functions:

1. ``world``     — the synthetic world (generated on first use; a half-written or stale one is
                   moved aside and generated again, never read);
2. ``warmup``    — the first ``--warmup-epochs`` of the fit, on the noisy ``db.csv``: the
                   ImageNet start is too weak to clean with (measured on the seed-0 world:
                   nearest-neighbour label agreement 0.42 on the DB, below the cleaning's floor
                   of 0.6; forced, it removes noise at precision 0.81 / recall 0.08), and so is
                   a one-epoch model (agreement 0.48; forced: precision 0.45 / recall 0.85);
3. ``clean``     — ``landmarks clean`` of the noisy ``db.csv`` with the warm-up model;
4. ``untrained`` — the kNN and shipped-decision figures of the ImageNet start (the backbone's
                   GeM features), the baseline training must beat;
5. ``fit``       — ``landmarks fit --config experiments/demo.yaml --config experiments/arcface.yaml``
                   plus ``experiments/recipes/{lr_warmup,nonlandmark_push,hard_nonlandmarks,mild_augmentation,longer_fit}.yaml``
                   (the recipe that measured best here: 8 epochs in all) and
                   ``experiments/bf16_inference.yaml`` (every embedding pass in bf16, which pays
                   for the longer fit) on the cleaned DB, starting from the
                   warm-up's network with the class weights imprinted from the cleaned DB's class
                   means, for the rest of ``trainer.max_epochs`` (with ``--oracle-clean``, which
                   has no warm-up: all of them from the ImageNet start, class weights at random;
                   imprinting them there by a one-stage curriculum measured level, EXPERIMENTS.md); its
                   evaluation also scores the shipped decision (centroid index + non-landmark
                   penalty + threshold calibrated on ``calibration.csv``) under ``val/centroid/*``,
                   and the same index without the penalty under ``val/centroid/no_penalty/*``;
6. ``index``     — ``landmarks index`` of the cleaned DB with centroids and the non-landmark
                   penalty (``--nonlandmark-pool nonlandmarks.csv``, the non-landmarks the model
                   trained on), the threshold calibrated at ``--target-fpr`` on ``calibration.csv``
                   (non-landmarks never trained on and disjoint from the distractors), and a second
                   one for photos with a position (``--gps-radius-km``, on its ``lat,lon``);
7. ``recognize`` — ``landmarks recognize`` over the held-out queries and the distractors: the
                   figures of the recogniser that ships; then again with each photo's position
                   (``--gps-radius-km``; the index's threshold calibrated with the GPS filter);
8. ``albums``    — ``landmarks albums`` over the world's user collection (a landmark photo in
                   ~67, GPS in the EXIF of 60 %: those photos decided with the GPS filter and the
                   index's GPS threshold), an HTML page.

Every stage writes its outputs atomically and, last, ``<out>/<stage>/stage.json``. Run again, the
same command skips the finished stages (an interrupted fit resumes from its last epoch's
checkpoint); ``--fresh`` starts over, and so do changed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from callbacks import RetrievalEvaluation
from cli.argtypes import positive_float, positive_int, rate
from core.atomic import write_json_atomic
from core.errors import UserError
from core.labels import NONLANDMARK
from recognition.artifact import PenaltyParams
from recognition.calibration import CALIBRATION_RULES, Calibration
from recognition.centroids import CentroidParams

log = logging.getLogger(__name__)

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
STAGES = ("warmup", "clean", "untrained", "fit", "index", "recognize", "albums")
CHAIN_FORMAT = "landmark-demo-chain/1"
#: Radius of the GPS filter (the index's GPS threshold, the recognize stage's GPS arm, the albums):
#: the world's cities are far apart, its landmarks within ~5 km of their centre.
GPS_RADIUS_KM = 50.0

# Rows of the printed kNN table: (metric key, label); FPR rows appear only if resolvable.
SUMMARY_ROWS = [
    ("recall@fpr=1e-02", "recall    @ FPR 1e-2"),
    ("recall@fpr=1e-03", "recall    @ FPR 1e-3"),
    ("recall@fpr=1e-04", "recall    @ FPR 1e-4"),
    ("precision@fpr=1e-02", "precision @ FPR 1e-2 (test mix)"),
    ("precision@fpr=1e-03", "precision @ FPR 1e-3 (test mix)"),
    ("precision@fpr=1e-03,prior=0.01", "precision @ FPR 1e-3 (1 landmark photo in 100)"),
    ("p@1", "P@1 (landmark queries)"),
    ("map@10", "mAP@10"),
    ("gap", "GAP (distractors included)"),
]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", action="append", default=None,
        help="LightningCLI config file(s) of the fit; default experiments/demo.yaml + experiments/arcface.yaml + "
        "experiments/recipes/{lr_warmup,nonlandmark_push,hard_nonlandmarks,mild_augmentation,longer_fit}.yaml + "
        "experiments/bf16_inference.yaml (measured best). Repeat to compose, "
        "e.g. --config experiments/demo.yaml --config experiments/center.yaml",
    )
    parser.add_argument("--out", default=None, help="folder of the chain's stages (default runs/demo/chain-seed<N>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of the fit (default 0)")
    parser.add_argument("--world", default=None,
                        help="world folder (default data/synthetic, data/synthetic-seed<N> for other seeds)")
    parser.add_argument("--tiny", action="store_true", help="a miniature world and fit (a smoke test, ~1 min)")
    parser.add_argument("--target-fpr", type=rate, default=1e-3, help="false-positive rate the threshold is "
                        "calibrated for (default 1e-3)")
    parser.add_argument("--calibration-rule", choices=CALIBRATION_RULES, default=DEMO_CALIBRATION_RULE,
                        help="how the threshold reads --target-fpr: empirical (default), at most that share of "
                             "calibration.csv; conformal, at most that rate of new photos in expectation, for less "
                             "recall (`landmarks index --calibration-rule`; EXPERIMENTS.md)")
    parser.add_argument("--warmup-epochs", type=positive_int, default=3,
                        help="epochs on the noisy DB before cleaning, counted in trainer.max_epochs (default 3)")
    parser.add_argument("--no-imprint", dest="imprint", action="store_false",
                        help="start the main fit's class weights at random, not at the cleaned DB's class means under "
                             "the warm-up's network (--oracle-clean has no warm-up: its fit starts them at random)")
    parser.add_argument("--oracle-clean", action="store_true",
                        help="skip cleaning and drop the noise by the world's ground truth (an upper bound)")
    parser.add_argument("--no-penalty", dest="penalty", action="store_false",
                        help="index without the non-landmark penalty (the control; it is on by default: "
                             "EXPERIMENTS.md, 'non-landmark penalty')")
    parser.add_argument("--scales", type=positive_float, nargs="+", default=None, metavar="S",
                        help="scales (multiples of the 96 px input) the fit's evaluation and the shipped index embed "
                             "at; default 1.25, measured best on this chain (EXPERIMENTS.md); "
                             "`--scales 1`: the input size, `--scales 1 1.414`: landmarks index's default")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming finished stages")
    # Any further arguments (e.g. --trainer.max_epochs=2) are passed on to LightningCLI.


# ---- the stages' bookkeeping ---------------------------------------------------------------------


class Chain:
    """The chain's folder: one sub-folder per stage, ``stage.json`` written last marks it done."""

    def __init__(self, out: Path, fingerprint: str, fresh: bool):
        self.out = out
        chain_file = out / "chain.json"
        previous = json.loads(chain_file.read_text()) if chain_file.is_file() else None
        if fresh or (previous is not None and previous.get("fingerprint") != fingerprint):
            if previous is not None and not fresh:
                print(f"landmarks demo: the arguments changed since {out} was written; starting over")
            for stage in STAGES:
                shutil.rmtree(out / stage, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(chain_file, {"format": CHAIN_FORMAT, "fingerprint": fingerprint})
        self.seconds: dict[str, float] = {}

    def folder(self, stage: str) -> Path:
        return self.out / stage

    def done(self, stage: str) -> dict | None:
        marker = self.folder(stage) / "stage.json"
        if not marker.is_file():
            return None
        record = json.loads(marker.read_text())
        self.seconds[stage] = record.get("seconds", 0.0)
        return record["result"]

    def finish(self, stage: str, result: dict, started: float) -> dict:
        self.seconds[stage] = round(time.time() - started, 1)
        self.folder(stage).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder(stage) / "stage.json",
                          {"stage": stage, "seconds": self.seconds[stage], "result": result},
                          newline=False, default=float, allow_nan=True)
        return result


def _announce(stage: str, what: str) -> None:
    """One line per stage as it starts: the chain's progress, between the progress bars."""
    print(f"landmarks demo [{STAGES.index(stage) + 1}/{len(STAGES)}] {stage}: {what}", flush=True)


def _fingerprint(config_files: list[str], overrides: list[str], settings: dict) -> str:
    digest = hashlib.sha256()
    for config in config_files:
        digest.update(Path(config).read_bytes())
    digest.update(json.dumps({"overrides": list(overrides), **settings}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _absolute(path) -> str:
    return str(Path(path).resolve())


def _shown(path: str) -> str:
    """A recorded path as a person reads it: relative to the current folder when it lies inside it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---- stages -------------------------------------------------------------------------------------


def _stage_warmup(chain: Chain, cli, total_epochs: int) -> dict:
    """The first epochs of the fit on the noisy DB, without evaluation: a model to clean with.
    ``total_epochs`` (the configuration's ``trainer.max_epochs``) is recorded: the main fit runs
    the rest of it."""
    _announce("warmup", f"{cli.trainer.max_epochs} epoch(s) of the fit on the noisy db.csv, a model to clean with")
    started = time.time()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = cli.trainer.checkpoint_callback.last_model_path
    return chain.finish("warmup", {"checkpoint": _absolute(checkpoint), "epochs": cli.trainer.current_epoch,
                                   "total_epochs": total_epochs, "run_dir": _absolute(cli.trainer.log_dir)}, started)


def _stage_clean(chain: Chain, world: Path, checkpoint: str) -> dict:
    from cleaning.algorithm import CleaningParams
    from cleaning.command import clean_manifest

    _announce("clean", "landmarks clean of db.csv with the warm-up model")
    started, out = time.time(), chain.folder("clean")
    # The evidence rule: with the warm-up model on the seed-0 world it removes the noise at
    # precision 0.72 / recall 0.96 (0.99 of the non-landmark rows, which are what attracts
    # distractors in a gallery), the cluster rule at 0.73 / 0.90 (0.89).
    result = clean_manifest(world / "db.csv", out, checkpoint=checkpoint, params=CleaningParams(image_rule="evidence"),
                            nonlandmarks=str(world / "nonlandmarks.csv"), cache_dir=chain.out / "cache",
                            num_workers=0, report_landmarks=60)
    summary = json.loads((out / "summary.json").read_text())
    truth = summary["ground_truth"]["removal"]
    return chain.finish("clean", {
        "model": "the warm-up model", "manifest": str(out / "clean.csv"), "applied": result.applied,
        "rows": int(len(result.keep)), "removed": int((~result.keep).sum()),
        "removed_by_reason": result.counts()["removed_by_reason"],
        "duplicate_groups": len(result.duplicate_groups), "label_agreement": result.separability["label_agreement"],
        "removal_precision": truth["precision"], "removal_recall": truth["recall"],
        "duplicates": summary["ground_truth"].get("duplicates"), "report": str(out / "report.html"),
    }, started)


def _stage_oracle_clean(chain: Chain, world: Path) -> dict:
    """The upper bound: the world's ground truth removes exactly its noisy rows (``--oracle-clean``)."""
    _announce("clean", "the world's ground truth removes its noisy rows (--oracle-clean)")
    from datamodules.manifest import read_manifest, write_manifest

    started, out = time.time(), chain.folder("clean")
    data = read_manifest(world / "db.csv", kind="landmark", extra_columns="ignore")
    table = data.table.copy()
    noise = table["is_noise"].str.strip().eq("1").to_numpy()
    table["path"] = [os.path.relpath(os.path.abspath(p), out.resolve()) for p in data.paths]
    table["decision"] = np.where(noise, "remove", "keep")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(table, out / "clean.csv")
    return chain.finish("clean", {
        "model": "oracle (the world's ground truth)", "manifest": str(out / "clean.csv"), "applied": True,
        "rows": len(table), "removed": int(noise.sum()), "removed_by_reason": {"oracle": int(noise.sum())},
        "duplicate_groups": 0, "label_agreement": None, "removal_precision": 1.0, "removal_recall": 1.0,
        "duplicates": None, "report": None,
    }, started)


def _eval_sets(datamodule) -> dict[str, tuple[list[str], np.ndarray]]:
    return {name: (datamodule.eval_dataset(name).paths, datamodule.eval_dataset(name).labels)
            for name in datamodule.eval_set_names}


def _evaluate_embeddings(embedded: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                         evaluation: RetrievalEvaluation) -> dict:
    """The callback's figures (kNN + shipped decision) from embeddings computed outside Lightning."""
    from recognition.evaluation import evaluate_centroid_index
    from retrieval.metrics import evaluate_recognition

    d = embedded["gallery"].shape[1]
    sets = dict(gallery_emb=embedded["gallery"], gallery_labels=labels["gallery"], query_emb=embedded["queries"],
                query_labels=labels["queries"], distractor_emb=embedded.get("distractors", np.zeros((0, d), np.float32)),
                alphas=evaluation.alphas, user_prior=evaluation.user_prior)
    metrics = dict(evaluate_recognition(**sets, k=evaluation.top_k,
                                        interval_resamples=evaluation.recall_interval_resamples).metrics)
    penalty = {} if evaluation.nonlandmark_penalty is None else dict(
        penalty_pool_emb=embedded["nonlandmark_pool"], penalty=evaluation.nonlandmark_penalty)
    shipped = evaluate_centroid_index(**sets, calibration_emb=embedded.get("calibration"),
                                      params=evaluation.centroid_params, **penalty)
    metrics.update({f"centroid/{k}": v for k, v in shipped.items()})
    return metrics


def _stage_untrained(chain: Chain, datamodule, evaluation, hparams, image_size: int) -> dict:
    from retrieval.embed import embed_paths
    from retrieval.embedding_model import load_embedding_model

    _announce("untrained", f"the ImageNet start ({hparams.backbone}) on the evaluation sets: the baseline")
    started = time.time()
    backbone = hparams.backbone
    model = load_embedding_model(backbone=backbone, image_size=image_size, pretrained=hparams.pretrained,
                                 pooling=hparams.pooling, inference_precision=hparams.inference_precision)
    embedded, labels = {}, {}
    for name, (paths, set_labels) in _eval_sets(datamodule).items():
        result = embed_paths(model, paths, batch_size=128, num_workers=0, accelerator="cpu",
                             cache_dir=chain.out / "cache", progress=True)
        embedded[name], labels[name] = result.embeddings[result.valid], set_labels[result.valid]
    metrics = _evaluate_embeddings(embedded, labels, evaluation)
    return chain.finish("untrained", {"model": f"{backbone} (ImageNet start, GeM)", **metrics}, started)


def _warm_start(chain: Chain, model, datamodule, checkpoint: str, imprint: bool) -> None:
    """The warm-up's embedding network (backbone, pooling, head) into ``model``, and the loss's
    class weights (and centers) imprinted from the class means of the cleaned DB under that
    network, rather than random: cleaning changes the classes (merged duplicates, dropped
    landmarks), so the warm-up's own class weights do not carry over. The means come from the
    embeddings the cleaning computed (the cache), not from a new pass."""
    import torch

    from lightning_modules.landmark_module import read_checkpoint
    from retrieval.embed import embed_paths
    from retrieval.embedding_model import load_embedding_model

    state = read_checkpoint(checkpoint)["state_dict"]
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    model.net.load_state_dict(net, strict=True)
    if not imprint:
        return
    gallery = datamodule.eval_dataset("gallery")
    embedded = embed_paths(load_embedding_model(checkpoint=checkpoint), gallery.paths, batch_size=128,
                           accelerator="cpu", cache_dir=chain.out / "cache", progress=False)
    labels = gallery.labels[embedded.valid]
    sums = np.zeros((datamodule.num_classes, embedded.embeddings.shape[1]), np.float64)
    np.add.at(sums, labels, embedded.embeddings[embedded.valid])
    present = np.flatnonzero(np.bincount(labels, minlength=datamodule.num_classes))
    model.loss.imprint(torch.as_tensor(present), torch.as_tensor(sums[present], dtype=torch.float32))


def _stage_fit(chain: Chain, cli, warm_start: str | None, imprint: bool, scales: list[float]) -> dict:
    import pytorch_lightning as pl

    _announce("fit", f"{cli.trainer.max_epochs} epoch(s) on the cleaned DB, then the evaluation")
    started = time.time()
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    evaluation = _evaluation_of(trainer)
    state_file = chain.folder("fit") / "state.json"
    state_file.parent.mkdir(parents=True, exist_ok=True)
    # Every attempt's checkpoint folder: a rerun resumes from the newest last.ckpt among them
    # (an attempt killed before its first epoch ended leaves none, and the one before still counts).
    folders = json.loads(state_file.read_text())["checkpoint_dirs"] if state_file.is_file() else []
    saved = sorted((p for p in (Path(f) / "last.ckpt" for f in folders) if p.is_file()), key=lambda p: p.stat().st_mtime)
    resume = str(saved[-1]) if saved else None
    if resume:
        print(f"landmarks demo: resuming the fit from {resume}")
    checkpoint_dir = Path(trainer.checkpoint_callback.dirpath or Path(trainer.log_dir) / "checkpoints")
    write_json_atomic(state_file, {"checkpoint_dirs": folders + [_absolute(checkpoint_dir)]})
    pl.seed_everything(cli.config.get("seed_everything", 0), workers=True, verbose=False)
    if resume is None and warm_start is not None:
        _warm_start(chain, model, datamodule, warm_start, imprint)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    last = evaluation.history[-1] if evaluation.history else None
    if last is None or last["epoch"] != trainer.current_epoch - 1:
        trainer.validate(model, datamodule=datamodule, verbose=False)  # the last epoch did not evaluate
    checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    metrics = {k: v for k, v in evaluation.last_metrics.items() if k not in ("stage", "step")}
    reused = _cache_evaluation_embeddings(chain, datamodule, evaluation, checkpoint, scales)
    return chain.finish("fit", {"run_dir": _absolute(trainer.log_dir), "checkpoint": _absolute(checkpoint), **metrics,
                                "embeddings_reused": reused}, started)


def _cache_evaluation_embeddings(chain: Chain, datamodule, evaluation, checkpoint: str, scales: list[float]) -> int:
    """The last evaluation embedded the gallery, queries, distractors, calibration photos and the
    non-landmark pool with the checkpoint's very weights, at the index's ``scales``
    (``model.eval_scales``): put them in the embedding cache, so that ``index`` and
    ``recognize`` do not embed them again. Checked first on a few photos embedded afresh; on a
    mismatch nothing is cached (and the stages embed everything themselves)."""
    from retrieval.embed import embed_paths, store_embeddings
    from retrieval.embedding_model import load_embedding_model

    model = load_embedding_model(checkpoint=checkpoint, scales=scales)
    sets = {name: (datamodule.eval_dataset(name).paths, *evaluation.last_embeddings[name])
            for name in datamodule.eval_set_names if name in evaluation.last_embeddings}
    if any(len(paths) != len(emb) for paths, emb, _ in sets.values()):
        log.warning("the evaluation's embeddings do not match its sets; not reused")
        return 0
    paths, emb, valid = sets["gallery"]
    probe = embed_paths(model, paths[:8], batch_size=8, accelerator="cpu", cache_dir=None, progress=False)
    # The same weights give rows at cosine 1 - 1e-6 in float32, and at 0.9997 in bf16 (measured on
    # the tiny chain's 32-d rows: the fit embeds channels-last at another batch size, so other
    # kernels round differently).
    if not (probe.embeddings[probe.valid] * emb[:8][probe.valid]).sum(axis=1).min(initial=1.0) >= 0.999:
        log.warning("the evaluation's embeddings differ from the checkpoint's; not reused")
        return 0
    return sum(store_embeddings(chain.out / "cache", model, p, e, v) for p, e, v in sets.values())


def _stage_index(chain: Chain, world: Path, clean_manifest: str, checkpoint: str, target_fpr: float,
                 penalty: PenaltyParams | None, scales: list[float], calibration_rule: str) -> dict:
    from cli.recognition import write_hardest_sheet
    from recognition.indexing import build_landmark_index

    _announce("index", f"landmarks index of the cleaned DB, threshold calibrated at FPR {target_fpr:g}")
    started = time.time()
    pool = {} if penalty is None else dict(nonlandmark_pool=world / "nonlandmarks.csv", penalty=penalty)
    index, path = build_landmark_index(
        clean_manifest, chain.folder("index") / "index", checkpoint=checkpoint, scales=scales,
        nonlandmarks=world / "calibration.csv", target_fpr=target_fpr, calibration_rule=calibration_rule,
        landmarks_csv=world / "landmarks.csv",
        num_workers=0, accelerator="cpu", cache_dir=chain.out / "cache", **pool,
        # a second threshold for photos with a position (calibration.csv says where each was taken)
        gps_radius_km=GPS_RADIUS_KM, use_exif_gps=False,
    )
    described = None if index.penalty is None else {
        "weight": index.penalty["weight"], "k": index.penalty["k"], "pool": len(index.penalty["pool"])}
    cal = index.calibration
    expected, under = cal.new_photo_fpr()
    # The calibration photos that set the threshold, each above its landmark's nearest DB photo.
    sheet = write_hardest_sheet(index, path)
    return chain.finish("index", {"path": str(path), "hardest_sheet": str(sheet), "scales": scales, "vectors": len(index),
                                  "landmarks": len(index.landmark_ids),
                                  "threshold": index.threshold, "calibration": cal.to_json(),
                                  # what the threshold promises about new photos (the draw of calibration.csv)
                                  "new_photo_fpr": {"expected": expected, "under_95": under,
                                                    "chance_above_2x_target": cal.chance_above(2 * target_fpr)},
                                  "nonlandmark_penalty": described,
                                  "gps_calibration": index.gps_calibration.to_json()}, started)


def _stage_recognize(chain: Chain, world: Path, datamodule, index_path: str, target_fpr: float,
                     user_prior: float) -> dict:
    from recognition.gps import read_gps_csv
    from recognition.recognizer import Recognizer
    from retrieval.metrics import score_decisions

    _announce("recognize", "landmarks recognize over the queries and the distractors")
    started, out = time.time(), chain.folder("recognize")
    queries, distractors = datamodule.eval_dataset("queries"), datamodule.eval_dataset("distractors")
    query_ids = list(datamodule.query_landmark_ids)  # also those whose landmark the cleaning removed
    paths = list(queries.paths) + list(distractors.paths)
    truth = query_ids + [None] * len(distractors)
    out.mkdir(parents=True, exist_ok=True)

    def scored(results, threshold: float) -> dict:
        code = {lid: i for i, lid in enumerate(sorted({r.landmark_id for r in results if r.landmark_id} | set(query_ids)))}
        pred = np.array([code.get(r.landmark_id, NONLANDMARK) for r in results], dtype=np.int64)
        true = np.array([NONLANDMARK if t is None else code[t] for t in truth], dtype=np.int64)
        accepted = np.array([r.accepted for r in results], dtype=bool)
        row = score_decisions(pred, accepted, true, threshold, user_prior)
        is_query = true != NONLANDMARK
        return {
            "target_fpr": target_fpr, "achieved_fpr": row["fpr"], "recall": row["recall"], "precision": row["precision"],
            f"precision_prior_{user_prior:g}": row.get("precision_at_prior"),
            "p_at_1": float((pred[is_query] == true[is_query]).mean()) if is_query.any() else float("nan"),
            "threshold": threshold, "queries": int(is_query.sum()), "distractors": int((~is_query).sum()),
            "false_positives": int((accepted & ~is_query).sum()),
        }

    recognizer = Recognizer(index_path, use_exif_gps=False, cache_dir=chain.out / "cache")
    results = recognizer.recognize(paths, progress=True)
    _write_results(out / "results.csv", results, truth)
    figures = {**scored(results, recognizer.threshold), "results": str(out / "results.csv")}
    # The same photos where each one's position is known (the queries at their landmark, the
    # distractors in a city of the world): the GPS filter and the index's GPS threshold.
    where = {**read_gps_csv(world / "queries.csv"), **read_gps_csv(world / "distractors.csv")}
    placed = Recognizer(index_path, gps_radius_km=GPS_RADIUS_KM, gps=where, use_exif_gps=False,
                        cache_dir=chain.out / "cache")
    results = placed.recognize(paths, progress=True)
    _write_results(out / "results_gps.csv", results, truth)
    gps = placed.gps_calibration
    threshold = placed.threshold if gps is None else gps.calibration.threshold
    figures["with_gps"] = {**scored(results, threshold), "results": str(out / "results_gps.csv"),
                           "radius_km": GPS_RADIUS_KM, "with_position": sum(os.path.abspath(p) in where for p in paths)}
    return chain.finish("recognize", figures, started)


def _write_results(path: Path, results, truth) -> None:
    import csv

    from core.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "true_landmark_id", "landmark_id", "score", "accepted"])
        for r, t in zip(results, truth):
            writer.writerow([r.path, t or "", r.landmark_id or "", "" if r.score is None else f"{r.score:.6f}",
                             int(r.accepted)])


def _stage_albums(chain: Chain, world: Path, index_path: str) -> dict:
    import pandas as pd

    from recognition.albums import group_albums, write_albums
    from recognition.recognizer import Recognizer

    _announce("albums", "landmarks albums over the user collection (EXIF GPS filter)")
    started, out = time.time(), chain.folder("albums")
    collection = pd.read_csv(world / "collection.csv", dtype=str, keep_default_na=False)
    paths = [str(world / p) for p in collection["path"]]
    truth = dict(zip((os.path.abspath(p) for p in paths), collection["landmark_id"]))
    recognizer = Recognizer(index_path, gps_radius_km=GPS_RADIUS_KM, use_exif_gps=True,
                            cache_dir=chain.out / "cache")
    results = recognizer.recognize(paths, progress=True)
    albums = group_albums(results)
    written = write_albums(albums, out, title="Your landmark albums (synthetic collection)")
    in_albums = [(os.path.abspath(p["path"]), a["landmark_id"]) for a in albums["albums"] for p in a["photos"]]
    correct = sum(1 for p, lid in in_albums if truth.get(p) == lid)
    # Photos whose best candidate passed the threshold but stands farther than the radius from
    # the photo's GPS: acceptances the filter stopped (right ones, if the truth is that landmark).
    stopped = [r for r in results if r.candidates and r.candidates[0]["landmark_id"] in r.gps_rejected
               and r.candidates[0]["score"] >= recognizer.threshold]
    landmark_photos = sum(1 for t in truth.values() if t)
    return chain.finish("albums", {
        "page": str(written["html"]), "photos": len(paths), "landmark_photos": landmark_photos,
        "with_gps": int((collection["lat"] != "").sum()), "in_albums": len(in_albums), "correct": correct,
        "wrong_landmark": sum(1 for p, lid in in_albums if truth.get(p) and truth[p] != lid),
        "non_landmarks_in_albums": sum(1 for p, _ in in_albums if not truth.get(p)),
        "landmark_photos_missed": landmark_photos - correct,
        "gps_stopped": len(stopped),
        "gps_stopped_wrong": sum(1 for r in stopped if truth.get(os.path.abspath(r.path)) != r.candidates[0]["landmark_id"]),
        "albums": albums["counts"]["albums"],
    }, started)


# ---- the chain ----------------------------------------------------------------------------------


def _evaluation_of(trainer) -> RetrievalEvaluation:
    evaluation = next((cb for cb in trainer.callbacks if isinstance(cb, RetrievalEvaluation)), None)
    if evaluation is None:
        raise UserError("the demo needs a callbacks.RetrievalEvaluation callback in the configuration")
    return evaluation


def _tiny_overrides() -> list[str]:
    return ["--trainer.max_epochs=4", "--data.classes_per_batch=4", "--data.samples_per_class=2",
            "--data.batches_per_epoch=3", "--data.eval_batch_size=32", "--data.num_workers=0",
            "--data.image_size=64", "--model.embedding_size=32"]


def _precision_overrides() -> list[str]:
    """Float32 embedding on a CPU without bf16 arithmetic, where the default bf16 passes would be
    slower, not faster (the demo's figures were measured with bf16; expect them to move a little)."""
    from core.embedding import bf16_is_fast

    if bf16_is_fast("cpu"):
        return []
    print("landmarks demo: this CPU has no bfloat16 instructions (AVX-512 BF16, AMX or Arm BF16); embedding in "
          "float32", flush=True)
    return ["--model.inference_precision=32"]


def run_demo(config_files: list[str], overrides: list[str] = (), *, seed: int = 0, out: str | None = None,
             world: str | None = None, tiny: bool = False, target_fpr: float = 1e-3, warmup_epochs: int = 3,
             imprint: bool = True, oracle_clean: bool = False, penalty: bool = True, fresh: bool = False,
             scales=None, calibration_rule: str | None = None) -> dict:
    from cli.lightning_cli import LandmarkCLI
    from core.embedding import scale_factors
    from datamodules.synth import SynthConfig, ensure_world
    from retrieval.metrics import format_alpha

    try:
        # The fit's evaluation embeds at the index's scales, so that it scores the shipped decision.
        scales = list(scale_factors(DEMO_SCALES if scales is None else scales) or [1.0])
    except ValueError as err:
        raise UserError(f"--scales: {err}") from None

    calibration_rule = calibration_rule or DEMO_CALIBRATION_RULE
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    start = time.time()
    config = SynthConfig.tiny(seed=seed) if tiny else SynthConfig(seed=seed)
    # Absolute from here on: every path the stages record (stage.json, summary.json) then names the
    # same file whichever folder the chain is resumed or read from.
    world_dir = Path(world or ("data/synthetic" if seed == 0 and not tiny else
                               f"data/synthetic{'-tiny' if tiny else ''}-seed{seed}")).resolve()
    out_dir = Path(out or f"runs/demo/chain{'-tiny' if tiny else ''}-seed{seed}").resolve()
    overrides = (_tiny_overrides() if tiny else []) + _precision_overrides() + list(overrides)
    settings = {"seed": seed, "world": str(world_dir), "tiny": tiny, "target_fpr": target_fpr,
                "warmup_epochs": warmup_epochs, "imprint": imprint, "oracle_clean": oracle_clean, "penalty": penalty,
                "scales": scales, "calibration_rule": calibration_rule, "synthetic": config.__dict__,
                # the index's and the evaluation's centroid settings (their defaults): a change redoes the chain
                "centroids": dataclasses.asdict(CentroidParams()), "gps_radius_km": GPS_RADIUS_KM}
    chain = Chain(out_dir, _fingerprint(config_files, overrides, settings), fresh)

    # The shipped index's non-landmark penalty, the same in the evaluation and in `landmarks index`.
    shipped_penalty = PenaltyParams() if penalty else None
    mark = time.time()
    ensure_world(world_dir, config, match_config=True)
    chain.seconds["world"] = round(time.time() - mark, 1)

    def make_cli(db_manifest: str, stage: str, *extra: str):
        args = [a for c in config_files for a in ("--config", c)] + [
            f"--trainer.default_root_dir={chain.folder(stage)}",
            # The sampler's plan and the augmentations follow data.seed: the seed varies them too.
            f"--seed_everything={seed}", f"--data.seed={seed}", f"--data.data_dir={world_dir}",
            f"--data.db_manifest={db_manifest}",
            "--data.calibration_manifest=calibration.csv", f"--data.synthetic.seed={seed}",
            "--data.oracle_clean=false", f"--data.evaluate_nonlandmark_pool={str(penalty).lower()}",
            f"--model.eval_scales={'null' if scales == [1.0] else json.dumps(scales)}",
        ] + overrides + list(extra)
        cli = LandmarkCLI(args=args, run=False)
        evaluation = _evaluation_of(cli.trainer)
        evaluation.centroid_index = True  # the shipped decision, every evaluation, at the shipped FPR too
        evaluation.alphas = tuple(sorted({*map(float, evaluation.alphas), float(target_fpr)}, reverse=True))
        evaluation.nonlandmark_penalty = shipped_penalty
        evaluation.calibration_rule = calibration_rule
        return cli

    warmup = None
    if oracle_clean:
        cleaning = chain.done("clean") or _stage_oracle_clean(chain, world_dir)
    else:
        warmup = chain.done("warmup")
        if warmup is None:
            probe = make_cli(str((world_dir / "db.csv").resolve()), "warmup")
            total = probe.trainer.max_epochs
            if not 0 < warmup_epochs < total:
                raise UserError(f"--warmup-epochs must be between 1 and trainer.max_epochs - 1 = {total - 1}")
            warmup = _stage_warmup(chain, make_cli(str((world_dir / "db.csv").resolve()), "warmup",
                                                   f"--trainer.max_epochs={warmup_epochs}",
                                                   "--trainer.limit_val_batches=0"), total)
        cleaning = chain.done("clean") or _stage_clean(chain, world_dir, warmup["checkpoint"])
    # The warm-up's epochs count in the training budget: the main fit runs the rest.
    rest = [] if warmup is None else [f"--trainer.max_epochs={warmup['total_epochs'] - warmup['epochs']}"]
    cli = make_cli(str(Path(cleaning["manifest"]).resolve()), "fit", *rest)
    evaluation = _evaluation_of(cli.trainer)
    untrained = chain.done("untrained") or _stage_untrained(chain, cli.datamodule, evaluation, cli.model.hparams,
                                                            cli.datamodule.hparams.image_size)
    trained = chain.done("fit") or _stage_fit(chain, cli, warmup["checkpoint"] if warmup else None, imprint, scales)
    indexed = chain.done("index") or _stage_index(chain, world_dir, cleaning["manifest"], trained["checkpoint"],
                                                  target_fpr, shipped_penalty, scales, calibration_rule)
    recognized = chain.done("recognize") or _stage_recognize(chain, world_dir, cli.datamodule, indexed["path"],
                                                             target_fpr, evaluation.user_prior)
    albums = chain.done("albums") or _stage_albums(chain, world_dir, indexed["path"])

    strip = ("run_dir", "checkpoint", "model", "epoch")
    # The shipped decision's control, from the fit's evaluation: the same index without the penalty.
    a = format_alpha(target_fpr)
    if f"centroid/no_penalty/recall@fpr={a}" in trained:
        recognized = {**recognized, "without_penalty": {
            "recall": trained[f"centroid/no_penalty/recall@fpr={a}"],
            "achieved_fpr": trained[f"centroid/no_penalty/actual_fpr@fpr={a}"],
            "precision": trained[f"centroid/no_penalty/precision@fpr={a}"]}}
    summary = {
        "format": CHAIN_FORMAT, "world": str(world_dir), "seed": seed, "out": str(out_dir),
        "cleaning": cleaning,
        "training": {"untrained": {k: v for k, v in untrained.items() if k not in strip},
                     "trained": {k: v for k, v in trained.items() if k not in strip},
                     "untrained_model": untrained["model"]},
        "index": indexed, "recognizer": recognized, "albums": albums,
        # The keys of the demo before the chain, so older runs still compare.
        "untrained": {k: v for k, v in untrained.items() if k != "model"},
        "trained": {k: v for k, v in trained.items() if k not in ("run_dir", "checkpoint")},
        "run_dir": trained["run_dir"], "checkpoint": trained["checkpoint"], "configs": list(config_files),
        "overrides": list(overrides), "seconds": round(time.time() - start, 1), "phases_seconds": dict(chain.seconds),
    }
    write_json_atomic(out_dir / "summary.json", summary, newline=False, default=float, allow_nan=True)
    print(format_summary(summary))
    return summary


# ---- what a person reads -------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_summary(s: dict) -> str:
    from retrieval.metrics import saturation_warning

    c, r, a, i = s["cleaning"], s["recognizer"], s["albums"], s["index"]
    before, after = s["training"]["untrained"], s["training"]["trained"]
    pad = " " * 12
    lines = ["", "=" * 78, "Landmark recognition demo: the whole system on the noisy synthetic world", "=" * 78]
    if c.get("removal_precision") is not None or c.get("removed"):
        lines.append(f"1 clean     {c['removed']} of {c['rows']} DB rows removed by {c['model']}, "
                     f"{c['duplicate_groups']} duplicate group(s) merged"
                     + ("" if c["applied"] else " (model too weak: nothing applied)"))
        lines.append(f"{pad}against the world's noise: precision {_fmt(c['removal_precision'])}, "
                     f"recall {_fmt(c['removal_recall'])}")
    else:
        lines.append(f"1 clean     {c['removed']} rows removed by {c['model']}")
    scales = s["index"].get("scales") or [1.0]
    at = f"{' and '.join(f'{x:g}' for x in scales)} × the input size"
    lines.append(f"2 train     kNN over every DB photo: {s['training']['untrained_model']} → trained")
    if scales != [1.0]:
        lines.append(f"{pad}(untrained: one scale; trained: at {at}, as the index)")
    lines.append(f"{pad}{'metric':<48}{'untrained':>9}{'trained':>9}")
    for key, label in SUMMARY_ROWS:
        if key in after or key in before:
            lines.append(f"{pad}{label:<48}{_fmt(before.get(key)):>9}{_fmt(after.get(key)):>9}")
    # How far the trained recall would move with another draw of the same-sized query and distractor
    # sets: at 1e-3 a few distractors set the threshold (docs/metrics.md).
    alphas = [k.removeprefix("recall_low@fpr=") for k in after if k.startswith("recall_low@fpr=")]
    intervals = [f"{_fmt(after[f'recall_low@fpr={a}'])}–{_fmt(after[f'recall_high@fpr={a}'])} @ FPR {a.replace('e-0', 'e-')}"
                 for a in alphas]
    if intervals:
        lines.append(f"{pad}trained recall, 95 % bootstrap interval: {', '.join(intervals)}")
    for name, metrics in (("untrained", before), ("trained", after)):
        warning = saturation_warning(metrics)
        if warning:
            lines.append(f"{pad}warning ({name}): {warning}")
    lines.append(f"3 index     {i['vectors']} centroids of {i['landmarks']} landmarks; threshold {_fmt(i['threshold'])} "
                 f"calibrated at FPR {r['target_fpr']:g}"
                 + (f" ({i['calibration'].get('rule', 'empirical')} rule)" if i.get("calibration") else ""))
    lines.append(f"{pad}on calibration.csv (non-landmarks the model never saw)")
    if i.get("calibration"):  # from the counts, so older summaries print it too
        lines += [f"{pad}{line}" for line in Calibration.from_json(i["calibration"]).new_photo_lines()]
    if scales != [1.0]:
        lines.append(f"{pad}every photo embedded at {at}" + (", the embeddings summed" if len(scales) > 1 else ""))
    penalty = i.get("nonlandmark_penalty")
    if penalty:
        nearest = "the nearest" if penalty["k"] == 1 else f"the mean of the {penalty['k']} nearest"
        lines.append(f"{pad}scores lowered by {penalty['weight']:g} × the cosine to {nearest} of {penalty['pool']} "
                     f"training non-landmarks")
    lines.append(f"4 recognize recall {_fmt(r['recall'])} at achieved FPR {_fmt(r['achieved_fpr'], 4)} "
                 f"(target {r['target_fpr']:g}), precision {_fmt(r['precision'])}, P@1 {_fmt(r['p_at_1'])}")
    control = r.get("without_penalty")
    if penalty and control is not None:
        lines.append(f"{pad}without the penalty (same model and index, the control): recall {_fmt(control['recall'])} "
                     f"at achieved FPR {_fmt(control['achieved_fpr'], 4)}")
    lines.append(f"{pad}({r['queries']} queries, {r['distractors']} unseen distractors; precision at 1 landmark "
                 f"photo in 100: {_fmt(r.get('precision_prior_0.01'))})")
    gps = r.get("with_gps")
    if gps:
        lines.append(f"{pad}with each photo's position: recall {_fmt(gps['recall'])} at achieved FPR "
                     f"{_fmt(gps['achieved_fpr'], 4)}, P@1 {_fmt(gps['p_at_1'])}")
        lines.append(f"{pad}(GPS filter {gps['radius_km']:g} km; threshold {_fmt(gps['threshold'])}, calibrated with "
                     "the filter on calibration.csv's positions)")
    lines.append(f"5 albums    {a['photos']} photos ({a['landmark_photos']} of landmarks, {a['with_gps']} with GPS): "
                 f"{a['in_albums']} in {a['albums']} album(s)")
    lines.append(f"{pad}{a['correct']} correct, {a['wrong_landmark']} wrong landmark, {a['non_landmarks_in_albums']} "
                 f"non-landmark(s); GPS filter stopped {a['gps_stopped']} ({a['gps_stopped_wrong']} wrong)")
    lines.append(f"{pad}page: {_shown(a['page'])}")
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in s["phases_seconds"].items())
    lines += [f"stages:     {_shown(s['out'])}/<stage>/, summary.json; fit run {_shown(s['run_dir'])}",
              f"wall time:  {s['seconds'] / 60:.1f} min", f"{pad}({phases})", _wandb_line(s["run_dir"]), "=" * 78]
    return "\n".join(lines)


def _wandb_line(run_dir: str) -> str:
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return "wandb:      disabled (WANDB_MODE=disabled)"
    if mode == "offline":
        return "wandb:      offline in runs/wandb/; upload: `wandb login`, `wandb sync runs/wandb/offline-run-*`"
    return "wandb:      online; the run's URL is printed above by wandb"


#: The scales the fit's evaluation and the shipped index embed at: 1.25 × the 96 px input, one pass.
#: The model trains on random-resized crops, which show objects larger than a full 96 px view, so it
#: recognises them better at a larger test size (FixRes). On the 8-epoch chains (5 seeds; the same
#: index rebuilt at each scale) recall at exactly FPR 1e-3 of the 7,000 unseen non-landmarks was
#: 0.707 at 1.25, against 0.652 at 1.414 (the scale before, measured with full-strength
#: augmentations, whose crops are smaller), 0.679 at 1.15, 0.692 at 1.2 and 0.688 at 1.33. One pass
#: at 1.25 embeds 1.56x the pixels of 96 px, 1.414 2x (EXPERIMENTS.md, "The main job").
DEMO_SCALES = (1.25,)

#: How the shipped threshold reads the target FPR (recognition.calibration). ``empirical`` admits 3
#: of the world's 3,500 calibration photos at 1e-3; a new photo passes with probability 4/3501, and
#: more than 2e-3 of them in 8 % of calibration draws (``Calibration.new_photo_fpr``). Over 500
#: redrawn sets of 3,500 from each 8-epoch chain's unseen photos (5 seeds, at 1.25, the old centroids): FPR
#: 0.0011 on average, recall 0.688. ``conformal`` admits 2: FPR 0.0008, recall 0.646. The issue
#: allows 2x the target, so the higher recall stays the default; `--calibration-rule conformal`
#: keeps the promise in expectation (EXPERIMENTS.md).
DEMO_CALIBRATION_RULE = "empirical"

#: The fit's recipe: ArcFace measured better than the paper's center loss in the chain (seed-0 world,
#: same cleaning and budget: the shipped recogniser's recall at FPR 1e-3 0.340 vs 0.136), and ArcFace
#: with LR warm-up, the non-landmark push and hard non-landmark mining better than plain ArcFace in
#: every seed (0.452/0.526/0.433 vs 0.431/0.423/0.297; EXPERIMENTS.md, "The main job"); half-strength
#: augmentations better than full strength at a fixed FPR 1e-3 (0.620 vs 0.610, 2e-3: 0.683 vs 0.660),
#: in P@1 and in cleaning precision in every seed; 8 epochs instead of 5, with every embedding pass in
#: bf16, better in every seed at a fixed FPR 1e-3 (0.653 vs 0.620) in 0.95x the time.
DEFAULT_CONFIGS = ("demo.yaml", "arcface.yaml", "recipes/lr_warmup.yaml", "recipes/nonlandmark_push.yaml",
                   "recipes/hard_nonlandmarks.yaml", "recipes/mild_augmentation.yaml", "recipes/longer_fit.yaml",
                   "bf16_inference.yaml")


def run_demo_command(args: argparse.Namespace) -> int:
    from cli import logs

    configs = args.config or [str(EXPERIMENTS / name) for name in DEFAULT_CONFIGS]
    # The stages' own INFO lines (embedding counts, cleaning steps) only with -v: the chain
    # announces each stage, and the summary says what came out.
    with logs.quieter("cleaning", "datamodules", "recognition", "retrieval", "landmarks", verbose=logs.VERBOSE):
            run_demo(configs, args.overrides, seed=args.seed, out=args.out, world=args.world, tiny=args.tiny,
                 target_fpr=args.target_fpr, warmup_epochs=args.warmup_epochs, imprint=args.imprint,
                 oracle_clean=args.oracle_clean, penalty=args.penalty, fresh=args.fresh, scales=args.scales,
                 calibration_rule=args.calibration_rule)
    return 0
