"""Every experiment file runs (fast_dev_run), composes, and a 2-process CPU DDP fit works.

Like lightning-hydra-template's sweep tests: the YAML files users start from are executed, not
just parsed. Overrides only shrink the data and move GPU settings to the CPU.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ddp_runs import run_ranks

from cli.main import main
from datamodules.synth import SynthConfig, generate_world

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
LOSS_FILES = ["arcface.yaml", "center.yaml", "center_plain.yaml", "contrastive.yaml"]
ARCFACE_RECIPES = ["param_groups", "lr_warmup", "freeze_backbone", "margin_warmup", "subcenter", "dynamic_margins",
                   "nonlandmark_push", "hard_nonlandmarks", "cosine_decay", "mild_augmentation", "longer_fit",
                   "frozen_stages"]
LANDMARKS = str(Path(sys.executable).parent / "landmarks")


def _small(world: Path) -> list[str]:
    return [
        f"--data.data_dir={world}",
        "--data.image_size=32",
        "--data.classes_per_batch=4",
        "--data.samples_per_class=2",
        "--data.eval_batch_size=16",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
    ]


def _experiment_args():
    cases = [["demo.yaml"], *[["demo.yaml", f] for f in LOSS_FILES], ["paper.yaml"],
             ["demo.yaml", "curriculum.yaml"], ["demo.yaml", "arcface.yaml", "curriculum.yaml"],
             ["demo.yaml", "no_curriculum.yaml"], ["demo.yaml", "curriculum_random_order.yaml"],
             ["demo.yaml", "curriculum_soft.yaml"], ["demo.yaml", "curriculum_balanced.yaml"],
             ["paper.yaml", "gldv2_paper.yaml"],
             # Every recipe ingredient at once, on the loss it belongs to (mining from epoch 0 is
             # covered in tests/test_recipes.py; fast_dev_run is a single epoch).
             ["demo.yaml", "arcface.yaml", *(f"recipes/{r}.yaml" for r in ARCFACE_RECIPES), "bf16_inference.yaml"],
             # sub-centres for the landmarks and extra background centres exclude each other
             ["demo.yaml", "arcface.yaml", "recipes/background_class.yaml", "recipes/nonlandmark_push.yaml"],
             ["demo.yaml", "center.yaml", "recipes/param_groups.yaml", "recipes/lr_warmup.yaml",
              "recipes/hard_nonlandmarks.yaml", "recipes/l2sp.yaml"],
             ["demo.yaml", "contrastive.yaml", "recipes/xbm.yaml", "recipes/hard_nonlandmarks.yaml",
              "recipes/nonlandmark_push.yaml"]]
    # The demo file alone stays in the fast tier; the compositions run in the full suite (CI).
    return [pytest.param(c, id="+".join(c), marks=() if c == ["demo.yaml"] else pytest.mark.slow) for c in cases]


def test_every_experiment_file_is_covered():
    files = {p.name for p in EXPERIMENTS.glob("*.yaml")} | {f"recipes/{p.name}" for p in EXPERIMENTS.glob("recipes/*.yaml")}
    covered = {f for case in _experiment_args() for f in case.values[0]}
    assert files == covered, f"experiment files without a fast_dev_run test: {files - covered}"


@pytest.mark.parametrize("configs", _experiment_args())
def test_fast_dev_run(configs, tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit"] + [a for c in configs for a in ("--config", str(EXPERIMENTS / c))] + _small(tiny_world)
    args += ["--trainer.fast_dev_run=true", "--model.pretrained=false"]
    assert main(args) == 0


def test_print_config_composes_files_and_links_num_classes(tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(EXPERIMENTS / "demo.yaml"), "--config", str(EXPERIMENTS / "center.yaml"),
            f"--data.data_dir={tiny_world}", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["loss"]["class_path"] == "losses.CenterSoftmaxLoss"
    assert config["trainer"]["logger"][0]["init_args"]["name"] == "center"
    # The class count is linked from the data module, never part of the config.
    assert "num_classes" not in config["model"]
    # omegaconf+ interpolation resolved after merging: the scheduler follows max_epochs.
    assert config["model"]["lr_scheduler"]["init_args"]["T_max"] == config["trainer"]["max_epochs"]


def _metrics(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    merged = {}
    for row in rows:
        merged.update({k: float(v) for k, v in row.items() if v not in ("", None) and k.startswith("val/")})
    return merged


@pytest.mark.slow
def test_ddp_fit_on_two_cpu_processes_and_metrics_equal_single_process(tmp_path):
    # 200 distractors, so that FPR 1e-2 is resolvable and its threshold is compared too.
    world = tmp_path / "world"
    generate_world(world, dataclasses.replace(SynthConfig.tiny(seed=1), distractors=200), workers=1, progress=False)
    # tests/ on the path: the subprocesses load tests/eval_probes.py by class_path.
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    common = ["--config", str(EXPERIMENTS / "demo.yaml"), *_small(world)]

    def csv_logger(name):
        return ["--trainer.logger=pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir=runs",
                f"--trainer.logger.name={name}"]

    def run(*args):
        done = run_ranks([LANDMARKS, *args], cwd=tmp_path, env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        return done

    run("fit", *common, "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=2",
        *csv_logger("ddp"))
    checkpoint = next((tmp_path / "runs" / "ddp").rglob("last.ckpt"))
    ddp_run = next((tmp_path / "runs" / "ddp").glob("version_*"))
    ddp_fit = _metrics(ddp_run)
    assert "val/recall@fpr=1e-02" in ddp_fit and "val/p@1" in ddp_fit
    assert {p.name for p in (ddp_run / "plots").glob("*.png")} == {
        "val_epoch001_precision_fpr.png", "val_epoch001_score_histograms.png"}
    assert (ddp_run / "plots" / "val_epoch001_hardest_distractors.jpg").is_file()

    for devices in (1, 2):
        run("validate", *common, f"--trainer.devices={devices}", "--trainer.strategy=ddp" if devices == 2 else "--trainer.strategy=auto",
            *csv_logger(f"validate{devices}"), f"--ckpt_path={checkpoint}",
            "--trainer.callbacks+=eval_probes.EvalShardRecorder", f"--trainer.callbacks.out_dir={tmp_path / f'shards{devices}'}")
    single = _metrics(next((tmp_path / "runs" / "validate1").glob("version_*")))
    double = _metrics(next((tmp_path / "runs" / "validate2").glob("version_*")))
    assert single.keys() == double.keys() and "val/n_gallery" in single
    for key in single:
        assert single[key] == pytest.approx(double[key], abs=1e-6), key

    # What each rank embedded (the rows validation_step handed to the evaluation callback).
    one = json.loads((tmp_path / "shards1" / "validate_rank0.json").read_text())
    ranks = [json.loads((tmp_path / "shards2" / f"validate_rank{r}.json").read_text()) for r in (0, 1)]
    assert one["world"] == 1 and [r["world"] for r in ranks] == [2, 2]
    assert set(one["sets"]) == set(ranks[0]["sets"]) == set(ranks[1]["sets"]) == {"gallery", "queries", "distractors"}
    assert one["sets"]["distractors"]["size"] == 200
    for name, entry in one["sets"].items():
        n = entry["size"]
        assert sorted(entry["indices"]) == list(range(n)), name  # one process: the whole set, once
        assert single[f"val/n_{name}"] == n
        shares = [r["sets"][name]["indices"] for r in ranks]
        half = -(-n // 2)  # DistributedSampler: ceil(n / 2) per rank, the shorter shard padded
        assert [len(s) for s in shares] == [half, half], name  # each rank embeds about half, not all n
        assert all(len(set(s)) == len(s) for s in shares), name
        assert set(shares[0]) | set(shares[1]) == set(range(n)), name  # together: the whole set
        # Disjoint but for the padding: n odd → exactly one index embedded on both ranks.
        assert len(set(shares[0]) & set(shares[1])) == 2 * half - n, name


@pytest.mark.slow
def test_monitoring_an_unresolvable_fpr_fails_before_training(tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(EXPERIMENTS / "paper.yaml"), *_small(tiny_world), "--model.pretrained=false",
            "--model.backbone=resnet10t", "--trainer.max_epochs=1"]
    assert main(args) == 2  # a configuration mistake: one line, before any training step
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("landmarks fit: error: ModelCheckpoint monitors 'val/recall@fpr=1e-03', "
                                               "but 60 distractors cannot resolve FPR 0.001"), err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_integer_limit_val_batches_is_a_partial_evaluation(tiny_world, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    # 2, not 1: through LightningCLI "--trainer.limit_val_batches=1" arrives as the float 1.0 (the
    # whole set), "2" stays the integer 2 (a batch count).
    args = ["validate", "--config", str(EXPERIMENTS / "demo.yaml"), *_small(tiny_world),
            "--trainer.limit_val_batches=2", "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
            "--trainer.logger.save_dir=runs", "--trainer.logger.name=partial"]
    with caplog.at_level(logging.WARNING, logger="callbacks.retrieval_evaluation"):
        assert main(args) == 0
    warnings = [r for r in caplog.records
                if r.name == "callbacks.retrieval_evaluation" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "RetrievalEvaluation: val sees only part of the evaluation sets; metrics are partial"
    ]
    # And it is partial: 2 batches of 16 per set. The tiny world has 43 gallery images (oracle-clean),
    # 14 queries and 60 distractors → 32, 14 and 32 are evaluated, without the exact-count check failing.
    rows = list(csv.DictReader(next((tmp_path / "runs" / "partial").rglob("metrics.csv")).open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}
    assert (logged["val/n_gallery"], logged["val/n_queries"], logged["val/n_distractors"]) == (32, 14, 32)


def test_console_script_help_lists_every_command():
    done = subprocess.run([LANDMARKS, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("fit", "validate", "test", "predict", "synth", "demo"):
        assert f"  {command} " in done.stdout
