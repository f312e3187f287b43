"""wandb conventions: identity from the config, what reaches the WandbLogger, and runs without wandb."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from jsonargparse import Namespace

from callbacks.wandb_conventions import (
    RunIdentity,
    WandbConventions,
    apply_wandb_conventions,
    run_identity,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def _config(loss="losses.CenterSoftmaxLoss", callbacks=(), oracle_clean=False, data_dir=".", db="db.csv",
            seed=0, data_seed=0, loss_args=None):
    stages = [{"epochs": 1, "class_share": 0.4}, {"class_share": 1.0}]
    return {
        "seed_everything": seed,
        "trainer": {"callbacks": [{"class_path": c, "init_args": {"stages": stages} if c.endswith("Curriculum") else {}}
                                  for c in callbacks]},
        "model": {"loss": {"class_path": loss, "init_args": loss_args or {}}},
        "data": {"oracle_clean": oracle_clean, "data_dir": str(data_dir), "db_manifest": db, "seed": data_seed},
    }


def test_identity_from_the_config(tmp_path):
    ident = run_identity(_config(callbacks=["callbacks.RetrievalEvaluation", "callbacks.curriculum.Curriculum"],
                                 oracle_clean=True, seed=3, data_seed=3))
    assert ident == RunIdentity(loss="center", curriculum=True, database="oracle-clean", seed=3, data_seed=3)
    assert ident.group == "center_curriculum_oracle-clean"
    assert ident.name == "center_curriculum_oracle-clean_seed3"
    assert ident.tags == ["center", "curriculum", "oracle-clean", "seed-3"]

    (tmp_path / "clean.csv").write_text("path,landmark_id,decision,reason\na.jpg,1,keep,\n")
    (tmp_path / "db.csv").write_text("path,landmark_id\na.jpg,1\n")
    cleaned = run_identity(_config(loss="losses.ArcFaceLoss", data_dir=tmp_path, db="clean.csv", seed=1, data_seed=0))
    assert cleaned.group == "arcface_no-curriculum_cleaned"
    assert cleaned.tags == ["arcface", "no-curriculum", "cleaned", "seed-1", "data-seed-0"]
    assert run_identity(_config(loss="losses.ContrastiveLoss", data_dir=tmp_path)).group == "contrastive_no-curriculum_raw-db"
    baseline = _config(callbacks=["callbacks.Curriculum"])
    baseline["trainer"]["callbacks"][0]["init_args"]["stages"] = [{"class_share": 1.0}]  # no_curriculum.yaml
    one_stage = run_identity(baseline)
    assert one_stage.curriculum is False and one_stage.one_stage is True
    # one stage imprints the classifier, no callback does not: different groups, not one
    assert one_stage.group == "center_one-stage_raw-db" and "one-stage" in one_stage.tags
    assert run_identity(_config()).group == "center_no-curriculum_raw-db"
    # The random-order control of a staged curriculum is a group of its own: `landmarks compare`
    # and wandb average over a group, and must not mix the control into the arm it controls.
    control = _config(callbacks=["callbacks.Curriculum"])
    control["trainer"]["callbacks"][0]["init_args"]["difficulty"] = "random"
    control_identity = run_identity(control)
    assert control_identity.curriculum and control_identity.random_order
    assert control_identity.group == "center_curriculum-random-order_raw-db"
    assert "curriculum-random-order" in control_identity.tags
    # Soft stages (classes drawn before they enter) are a group of their own too, as is their control.
    soft = _config(callbacks=["callbacks.Curriculum"])
    soft["trainer"]["callbacks"][0]["init_args"]["waiting_weight"] = 0.5
    assert run_identity(soft).group == "center_curriculum-soft_raw-db"
    soft["trainer"]["callbacks"][0]["init_args"]["difficulty"] = "random"
    assert run_identity(soft).group == "center_curriculum-soft-random-order_raw-db"
    soft["trainer"]["callbacks"][0]["init_args"]["waiting_weight"] = 0.0
    assert run_identity(soft).group == "center_curriculum-random-order_raw-db"
    # Stages whose classes swap places (curriculum_balanced.yaml) are not the soft stages' group.
    balanced = _config(callbacks=["callbacks.Curriculum"])
    balanced["trainer"]["callbacks"][0]["init_args"].update(
        waiting_weight=0.5, stages=[{"epochs": 1, "class_share": 0.5}, {"epochs": 1, "classes": "rest"}, {}])
    assert run_identity(balanced).group == "center_curriculum-soft-balanced_raw-db"
    one_stage_random = _config(callbacks=["callbacks.Curriculum"])
    one_stage_random["trainer"]["callbacks"][0]["init_args"].update(difficulty="random", stages=[{"class_share": 1.0}])
    assert run_identity(one_stage_random).group == "center_one-stage_raw-db"  # one stage has no order to control
    plain = run_identity(_config(loss_args={"nonlandmark_center": True}))
    assert plain.loss == "center-plain"
    no_loss = _config()
    del no_loss["model"]["loss"]
    assert run_identity(no_loss).loss == "arcface"  # LandmarkModule's default loss


def test_conventions_fill_a_wandb_logger_entry_and_keep_its_tags():
    entry = Namespace(class_path="pytorch_lightning.loggers.WandbLogger",
                      init_args=Namespace(project=None, group="demo", name=None, tags=["demo", "synthetic", "center"]))
    ident = RunIdentity(loss="center", curriculum=False, database="oracle-clean", seed=2)
    apply_wandb_conventions(entry, ident, sweep="ablation")
    assert entry.init_args.project == "landmark-recognition"
    assert entry.init_args.group == "center_no-curriculum_oracle-clean"
    assert entry.init_args.name == "center_no-curriculum_oracle-clean_seed2"
    assert entry.init_args.tags == ["center", "no-curriculum", "oracle-clean", "seed-2", "demo", "synthetic", "sweep-ablation"]
    named = Namespace(class_path="WandbLogger", init_args=Namespace(project="mine", name="my-run", tags=None, group=None))
    apply_wandb_conventions(named, ident)
    assert (named.init_args.project, named.init_args.name) == ("mine", "my-run")


def _small(world: Path) -> list[str]:
    return [f"--data.data_dir={world}", "--data.image_size=32", "--data.classes_per_batch=4",
            "--data.samples_per_class=2", "--data.eval_batch_size=64", "--data.num_workers=0",
            "--data.batches_per_epoch=2", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
            "--model.pretrained=false", "--model.backbone=resnet10t", "--trainer.enable_model_summary=false"]


@pytest.mark.slow
def test_fit_with_wandb_disabled_logs_identity_config_and_final_summary(tiny_world, tmp_path, monkeypatch):
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from callbacks import RetrievalEvaluation
    from cli.lightning_cli import LandmarkCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = LandmarkCLI(args=["fit", "--config", str(EXPERIMENTS / "demo.yaml"), "--config.loss",
                            str(EXPERIMENTS / "arcface.yaml"), "--seed_everything=5", *_small(tiny_world)])
    wandb_logger = next(lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger))
    run = wandb_logger.experiment
    assert run.group == "arcface_no-curriculum_raw-db"
    assert set(run.tags) >= {"arcface", "no-curriculum", "raw-db", "seed-5", "synthetic"}
    assert run.config["identity"]["loss"] == "arcface" and run.config["seed_everything"] == 5
    assert run.config["model"]["loss"]["class_path"] == "losses.ArcFaceLoss"
    assert set(run.config["git"]) == {"commit", "dirty"} and run.config["git"]["commit"]
    last = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RetrievalEvaluation)).last_metrics
    assert run.summary["val/p@1"] == last["p@1"] and run.summary["final/epoch"] == 0
    csv_logger = next(lg for lg in cli.trainer.loggers if isinstance(lg, CSVLogger))
    assert (Path(csv_logger.log_dir) / "metrics.csv").is_file()
    assert any(isinstance(cb, WandbConventions) for cb in cli.trainer.callbacks)


def test_fit_without_a_wandb_logger_works(tiny_world, tmp_path, monkeypatch):
    from cli.main import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(EXPERIMENTS / "demo.yaml"), *_small(tiny_world),
            "--trainer.logger=pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir=runs"]
    assert main(args) == 0
    assert next((tmp_path / "runs").rglob("metrics.csv")).is_file()
    assert not (tmp_path / "runs" / "wandb").exists()


def test_wandb_not_installed_leaves_the_wandb_logger_out(tiny_world, tmp_path, monkeypatch, caplog):
    from pytorch_lightning.loggers import CSVLogger

    from cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lightning_cli, "wandb_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        cli = lightning_cli.LandmarkCLI(args=["--config", str(EXPERIMENTS / "demo.yaml"), *_small(tiny_world)], run=False)
    assert [type(lg) for lg in cli.trainer.loggers] == [CSVLogger]
    assert not any(isinstance(cb, WandbConventions) for cb in cli.trainer.callbacks)
    assert "wandb is not installed: the WandbLogger is left out" in caplog.text


def test_wandb_only_logger_without_wandb_means_no_logger(tiny_world, tmp_path, monkeypatch):
    from cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lightning_cli, "wandb_available", lambda: False)
    cli = lightning_cli.LandmarkCLI(args=["--config", str(EXPERIMENTS / "demo.yaml"), *_small(tiny_world),
                                          "--trainer.logger=pytorch_lightning.loggers.WandbLogger"], run=False)
    assert cli.trainer.loggers == []
