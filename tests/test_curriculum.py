"""Curriculum: difficulty ranking, loss masking, resumable batches, imprinting, DDP agreement, SIGKILL resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from callbacks.curriculum import Curriculum, Stage, class_accuracy_scores, order_by_scores, read_difficulty_file
from core.labels import NONLANDMARK
from datamodules import LandmarkDataModule
from datamodules.sampler import LandmarkBatchSampler, ResumableLoader
from lightning_modules import LandmarkModule
from losses import ArcFaceLoss, CenterSoftmaxLoss

ROOT = Path(__file__).resolve().parents[1]
LANDMARKS = str(Path(sys.executable).parent / "landmarks")


# ---- pure parts ------------------------------------------------------------------------------


def test_class_accuracy_scores_hand_computed():
    # Unit vectors at angles 0°, 10° (class 0) and -15°, -40° (class 1). Nearest other image:
    # 0°→10° (right), 10°→0° (right), -15°→0° (wrong: 15° < 25°), -40°→-15° (right).
    angles = np.radians([0.0, 10.0, -15.0, -40.0])
    e = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 1, 1])
    accuracy, compactness = class_accuracy_scores(e, labels, num_classes=3)
    assert accuracy[:2].tolist() == [1.0, 0.5]
    assert np.isnan(accuracy[2]) and np.isnan(compactness[2])
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    c1 = unit[2:].sum(0) / np.linalg.norm(unit[2:].sum(0))
    assert compactness[1] == pytest.approx(float((unit[2:] @ c1).mean()), abs=1e-6)


def test_order_by_scores_breaks_ties_and_puts_unknown_last():
    assert order_by_scores([0.5, 1.0, 0.5, np.nan], [0.1, 0.0, 0.2, 9.0]) == [1, 2, 0, 3]
    assert order_by_scores([3, 3, 1]) == [0, 1, 2]


def test_difficulty_file_errors_name_line_and_id(tmp_path):
    ids = ["a", "b", "c"]
    good = tmp_path / "d.csv"
    good.write_text("landmark_id,difficulty\nb,0\na,2\nc,1\n")
    assert read_difficulty_file(good, ids).tolist() == [2.0, 0.0, 1.0]
    bad = tmp_path / "bad.csv"
    bad.write_text("landmark_id,difficulty\na,0\nzz,1\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 3: landmark_id 'zz'"):
        read_difficulty_file(bad, ids)
    bad.write_text("landmark_id,difficulty\na,0\nb,x\n")
    with pytest.raises(ValueError, match=r"line 3: difficulty 'x' is not a number"):
        read_difficulty_file(bad, ids)
    bad.write_text("landmark_id,difficulty\na,0\nb,1\n")
    with pytest.raises(ValueError, match=r"1 classes have no difficulty, e.g. \['c'\]"):
        read_difficulty_file(bad, ids)


def test_stage_validation():
    with pytest.raises(ValueError, match="only the last stage"):
        Curriculum([Stage(class_share=0.5), Stage()])
    with pytest.raises(ValueError, match="epochs or steps, not both"):
        Curriculum([Stage(epochs=1, steps=3), Stage()])
    with pytest.raises(ValueError, match="difficulty_file"):
        Curriculum([Stage()], difficulty="file")
    with pytest.raises(ValueError, match="lr must be"):
        Curriculum([Stage(lr=-1.0)])


# ---- losses: inactive classes take no part -------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: CenterSoftmaxLoss(5, 8, center_weight=0.0, nonlandmark_margin=None, nonlandmark_class=True),
    lambda: ArcFaceLoss(5, 8, margin=0.0, scale=10.0),
], ids=["center", "arcface"])
def test_inactive_classes_are_out_of_the_softmax(make):
    torch.manual_seed(0)
    loss = make()
    x = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    y = torch.tensor([0, 0, 2, 2, 3, NONLANDMARK])
    active = [0, 2, 3]
    loss.set_active_classes(torch.tensor(active))
    value = loss(x, y)
    value.backward()
    weight = loss.weight if isinstance(loss, CenterSoftmaxLoss) else loss.arcface.W.t()
    # Hand computation: cosine softmax over the active columns (+ non-landmark class) only.
    w = F.normalize(weight.detach(), dim=1)
    if isinstance(loss, CenterSoftmaxLoss):
        cols, scale = active + [5], loss.softmax_scale
        targets = torch.tensor([0, 0, 1, 1, 2, 3])
        rows = x.detach()
    else:
        cols, scale = active, 10.0
        targets = torch.tensor([0, 0, 1, 1, 2])
        rows = x.detach()[:5]  # ArcFace ignores non-landmarks by default
    expected = F.cross_entropy(scale * rows @ w[cols].t(), targets)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    grad = weight.grad if isinstance(loss, CenterSoftmaxLoss) else loss.arcface.W.grad.t()
    assert torch.all(grad[[1, 4]] == 0), "inactive classes must get no gradient"
    assert grad[active].abs().sum() > 0
    loss.set_active_classes(None)
    assert bool(loss.class_active.all())


# ---- the sampler resumes mid-epoch exactly ----------------------------------------------------


def _sampler(**kw):
    classes = np.repeat(np.arange(10), 5)
    return LandmarkBatchSampler(classes, num_nonlandmarks=7, classes_per_batch=3, samples_per_class=2,
                                nonlandmarks_per_batch=2, seed=3, **kw)


def test_resumable_loader_continues_with_the_undelivered_batches():
    reference = _sampler()
    reference.set_epoch(2)
    full = list(reference)
    loader = ResumableLoader(list(range(57)), _sampler(), collate_fn=lambda b: b)
    loader.batch_sampler.set_epoch(2)
    iterator = iter(loader)
    seen = [next(iterator) for _ in range(4)]
    assert seen == full[:4]
    state = loader.state_dict()
    assert state["skip"] == 4 and state["epoch"] == 2
    fresh = ResumableLoader(list(range(57)), _sampler(), collate_fn=lambda b: b)
    fresh.load_state_dict(state)
    assert list(fresh) == full[4:]
    # The epoch after the resumed one starts from its own beginning.
    fresh.batch_sampler.set_epoch(3)
    reference.set_epoch(3)
    assert list(fresh) == list(reference)


def test_state_saved_after_the_last_batch_resumes_at_the_next_epoch():
    loader = ResumableLoader(list(range(57)), _sampler(), collate_fn=lambda b: b)
    batches = list(loader)
    state = loader.state_dict()
    assert state["skip"] == len(batches)
    fresh = ResumableLoader(list(range(57)), _sampler(), collate_fn=lambda b: b)
    fresh.load_state_dict(state)
    expected = _sampler()
    expected.set_epoch(1)
    assert list(fresh) == list(expected)


def test_set_classes_restricts_batches_and_keeps_epoch_length():
    sampler = _sampler()
    n = len(sampler)
    sampler.set_classes([1, 4, 6, 8], nonlandmarks_per_batch=0)
    assert len(sampler) == n
    labels = np.repeat(np.arange(10), 5)
    for batch in sampler:
        assert set(labels[batch].tolist()) <= {1, 4, 6, 8} and len(batch) == 6
    with pytest.raises(ValueError, match="only 2 are active"):
        sampler.set_classes([1, 2])


# ---- imprinting, in a real fit -----------------------------------------------------------------


def _curriculum_of(trainer: pl.Trainer) -> Curriculum:
    return next(cb for cb in trainer.callbacks if isinstance(cb, Curriculum))


class _ImprintProbe(pl.Callback):
    """After the curriculum switched stage, recompute the class means by hand and compare."""

    def __init__(self):
        self.checked = []
        self.before = None

    def on_train_epoch_end(self, trainer, pl_module):
        self.before = pl_module.loss.class_weight_matrix().clone()
        self.active_before = list(_curriculum_of(trainer).active)
        self.optimizer_steps = {id(p): int(s["step"]) for p, s in trainer.optimizers[0].state.items()}

    def on_train_epoch_start(self, trainer, pl_module):
        curriculum = _curriculum_of(trainer)
        if self.before is None or curriculum.active == self.active_before:
            return
        new = sorted(set(curriculum.active) - set(self.active_before))
        dataset = trainer.datamodule.eval_dataset("gallery")
        pl_module.eval()
        with torch.no_grad():
            means = []
            for c in new:
                images = torch.stack([dataset[i]["image"] for i in np.flatnonzero(dataset.labels == c)])
                means.append(F.normalize(pl_module(images).mean(0), dim=0))
        pl_module.train()
        weights = pl_module.loss.class_weight_matrix()
        for c, mean in zip(new, means):
            assert torch.allclose(weights[c], mean, atol=1e-5), f"class {c} not imprinted at its mean"
            assert pl_module.loss.centers[c].allclose(mean, atol=1e-5)
        untouched = self.active_before
        assert torch.equal(weights[untouched], self.before[untouched]), "imprinting must leave active classes alone"
        # The optimizer was not rebuilt: its per-parameter state (step counts) carries on.
        state = trainer.optimizers[0].state
        assert self.optimizer_steps and all(int(state[p]["step"]) == n for p, n in
                                            ((p, self.optimizer_steps[id(p)]) for p in state))
        self.checked.append(new)


@pytest.mark.slow
def test_stage_switch_imprints_new_classes_at_their_mean_and_keeps_optimizer_state(tiny_world, tmp_path):
    pl.seed_everything(0)
    data = LandmarkDataModule(data_dir=str(tiny_world), image_size=32, classes_per_batch=2, samples_per_class=2,
                              eval_batch_size=16, num_workers=0, nonlandmark_share=0.2)
    model = LandmarkModule(data.num_classes, backbone="resnet18", embedding_size=16,
                           loss=lambda n, d: CenterSoftmaxLoss(n, d, center_lr=0.5))
    curriculum = Curriculum([Stage(epochs=1, class_count=3, nonlandmark_share=0.0), Stage(class_share=1.0)],
                            difficulty="size", images_per_class=100)
    probe = _ImprintProbe()
    seen_labels = []

    class Labels(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_labels.append((trainer.current_epoch, set(batch["label"].tolist())))

    trainer = pl.Trainer(max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[curriculum, probe, Labels()], default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert len(probe.checked) == 1 and len(probe.checked[0]) == data.num_classes - 3
    first_stage = set().union(*(labels for epoch, labels in seen_labels if epoch == 0))
    assert first_stage <= set(curriculum.order[:3])  # the 3 easiest classes, and no non-landmarks
    assert NONLANDMARK in set().union(*(labels for epoch, labels in seen_labels if epoch == 1))
    sizes = np.bincount(data.db_labels)
    assert sorted(sizes[curriculum.order[:3]], reverse=True) == sorted(sizes, reverse=True)[:3]
    assert [h["active_classes"] for h in curriculum.history] == [3, data.num_classes]


# ---- multi-process: DDP agreement and SIGKILL resume -----------------------------------------


def _fit_args(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "experiments" / "demo.yaml"),
        f"--data.data_dir={world}", "--data.image_size=32", "--data.classes_per_batch=2",
        "--data.samples_per_class=2", "--data.eval_batch_size=16", "--data.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
        "--model.pretrained=false", "--model.backbone=resnet18", "--model.embedding_size=32",
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.save_dir={out}",
        "--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=100",
        "--trainer.callbacks+=callbacks.Curriculum",
        "--trainer.callbacks.difficulty=accuracy",
        '--trainer.callbacks.stages=[{"epochs": 2, "class_count": 4, "nonlandmark_share": 0.0}, '
        '{"class_share": 1.0, "lr": 0.5}]',
        "--trainer.callbacks+=curriculum_probes.StepRecorder", f"--trainer.callbacks.out_dir={out / 'steps'}",
        *extra,
    ]


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([LANDMARKS, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_stage_and_resume_continues_the_same_stage_and_batches(tiny_world, tmp_path):
    reference = tmp_path / "reference"
    _run(_fit_args(tiny_world, reference), tmp_path)
    ref = _records(reference / "steps" / "rank0.jsonl")
    steps_per_epoch = sum(r["epoch"] == 0 for r in ref)
    kill_step = steps_per_epoch + steps_per_epoch // 2 + 1  # inside epoch 1, i.e. mid stage 0
    assert ref[kill_step]["stage"] == 0 and ref[-1]["stage"] == 1

    killed = tmp_path / "killed"
    checkpoints = tmp_path / "ckpt"
    ckpt_args = ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
                 f"--trainer.callbacks.dirpath={checkpoints}", "--trainer.callbacks.every_n_train_steps=2",
                 "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=0"]
    done = _run(_fit_args(tiny_world, killed, *ckpt_args, "--trainer.callbacks+=curriculum_probes.KillAtStep",
                          f"--trainer.callbacks.step={kill_step}"), tmp_path, check=False)
    assert done.returncode == -9, "the run should have been SIGKILLed"
    last = checkpoints / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    resume_step = saved["global_step"]
    assert steps_per_epoch < resume_step < 2 * steps_per_epoch  # the checkpoint is mid-epoch, mid-stage
    state = next(v for k, v in saved["callbacks"].items() if k == "Curriculum")
    assert state["stage_index"] == 0 and state["active"] == ref[0]["active"]

    resumed = tmp_path / "resumed"
    _run(_fit_args(tiny_world, resumed, *ckpt_args, f"--ckpt_path={last}"), tmp_path)
    after = _records(resumed / "steps" / "rank0.jsonl")
    assert after[0]["step"] == resume_step
    expected = ref[resume_step:]
    assert len(after) == len(expected)
    for got, want in zip(after, expected):
        # Until the stage ends everything matches. The next stage re-ranks classes with the model,
        # whose weights differ after a resume (augmentation RNG state is not checkpointed), so
        # from there on only what the sampler decides (all classes are active) must match.
        keys = ("step", "epoch", "stage", "active", "order", "index", "label") if want["stage"] == 0 else (
            "step", "epoch", "stage", "active", "index", "label")
        for key in keys:
            assert got[key] == want[key], (key, got["step"])
    assert {r["stage"] for r in after} == {0, 1}


@pytest.mark.slow
def test_ddp_ranks_agree_on_stage_classes_and_imprinted_weights(tiny_world, tmp_path):
    out = tmp_path / "ddp"
    _run(_fit_args(tiny_world, out, "--trainer.devices=2", "--trainer.strategy=ddp"), tmp_path)
    rank0, rank1 = (_records(out / "steps" / f"rank{r}.jsonl") for r in (0, 1))
    assert len(rank0) == len(rank1) > 0
    assert {r["stage"] for r in rank0} == {0, 1}
    for a, b in zip(rank0, rank1):
        for key in ("step", "stage", "active", "order", "weights_sha", "lr"):
            assert a[key] == b[key], (key, a["step"])
    first_switch = next(r for r in rank0 if r["stage"] == 1)
    assert len(first_switch["active"]) == 8 and first_switch["lr"] == pytest.approx(0.5e-3)


def test_step_lengths_switch_at_the_first_epoch_boundary_after_them_and_warmup_ramps_lr():
    from types import SimpleNamespace

    curriculum = Curriculum([Stage(steps=5), Stage(lr=0.5, warmup_steps=4)])
    curriculum.stage_index, curriculum.base_lrs = 0, [0.1]
    group = {"lr": 0.1}
    trainer = SimpleNamespace(current_epoch=1, global_step=3, optimizers=[SimpleNamespace(param_groups=[group])])
    assert not curriculum._stage_over(trainer)  # 3 steps done: the next epoch is still stage 0
    trainer.global_step = 6
    assert curriculum._stage_over(trainer)
    curriculum.stage_index, curriculum.stage_start_step = 1, 6
    lrs = []
    for step in range(6, 12):
        trainer.global_step = step
        curriculum.on_train_batch_start(trainer, None, None, 0)
        lrs.append(group["lr"])
    assert lrs == pytest.approx([0.0125, 0.025, 0.0375, 0.05, 0.05, 0.05])
