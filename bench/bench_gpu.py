"""The paper recipe on one GPU: training throughput against a plain loop, a 100k-image evaluation, memory.

One prepared run for a lent GPU (issue #16 item 6); nothing in CI depends on it. Three parts, each
written to ``--out`` as JSON the moment it finishes, so a run cut short still reports what it did:

1. ``train_<backbone>.json``: :mod:`bench.bench_training` on the GPU with the paper's loss (center
   loss + softmax with the non-landmark modification) on both sides, bf16-mixed, channels-last,
   batches held on the device: the LandmarkModule under a Lightning Trainer against a plain
   PyTorch loop of the same network, loss and optimizer; img/s, the median ratio, peak memory.
2. ``world.json``: a synthetic world with a gallery (the landmark DB) of ``--landmarks`` ×
   ``--images-per-landmark`` photos at 224 px, generated on every CPU.
3. ``fit.json``: ``experiments/paper.yaml`` through LandmarkCLI on that world (the real data module:
   JPEG decode, albumentations, P×K batches from worker processes), ``--fit-steps`` steps, then one
   evaluation of the whole gallery + queries + distractors + calibration set by the
   RetrievalEvaluation callback with the centroid index on: training img/s end to end, the
   evaluation's seconds split into embedding (loader + forward pass) and the callback's
   FAISS/metrics/centroid work, and peak GPU memory of each.

    python bench/bench_gpu.py --out $OUT --scratch /tmp/gpu       # on the GPU machine
    python bench/bench_gpu.py --device cpu --tiny --out /tmp/gpu  # the same steps in miniature
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_training  # noqa: E402

from callbacks import RetrievalEvaluation  # noqa: E402
from cli.lightning_cli import LandmarkCLI  # noqa: E402
from datamodules.synth import SynthConfig, generate_world  # noqa: E402


def _write(out: Path, name: str, payload: dict) -> None:
    (out / name).write_text(json.dumps(payload, indent=1))
    print(f"== {name}: {json.dumps(payload)[:600]}", flush=True)


def _gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment() -> dict:
    info = {"torch": torch.__version__, "lightning": pl.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda_version=torch.version.cuda)
    return info


def train_throughput(args, backbone: str, batch: int) -> dict:
    ns = argparse.Namespace(
        backbone=backbone, image_size=args.image_size, batch=batch, classes=1000, steps=args.train_steps,
        warmup=args.train_warmup, repeats=args.repeats, device=args.device,
        precision="bf16" if args.device == "cuda" else "32", channels_last=True, loss="center", recipe="plain",
        mining_pool=0, epoch_steps=0,
    )
    result = bench_training.run(ns)
    result["inference_img_s"] = inference_throughput(ns)
    return result


def inference_throughput(ns: argparse.Namespace, batches: int = 20, batch: int = 256) -> float:
    """Images per second of the evaluation forward pass alone (eval mode, no grad), input on the device."""
    module = bench_training._module(ns).to(ns.device).eval()
    module.net.to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, ns.image_size, ns.image_size, device=ns.device).contiguous(
        memory_format=torch.channels_last)
    dtype = torch.bfloat16 if ns.device == "cuda" else torch.float32
    with torch.inference_mode(), torch.autocast(ns.device, dtype=dtype, enabled=ns.device == "cuda"):
        for step in range(batches + 3):
            if step == 3:
                if ns.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            module(images)
    if ns.device == "cuda":
        torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - start)


class _StepTimer(pl.Callback):
    """Wall time from training step ``warmup`` to the end of training (synchronised on a GPU)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()
        self.steps = batch_idx + 1

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()


def fit_and_evaluate(args, world: Path) -> dict:
    # paper.yaml's loggers include a WandbLogger, whose options jsonargparse can only check with
    # wandb installed; a copy without loggers keeps the GPU machine free of wandb.
    config = yaml.safe_load(Path("experiments/paper.yaml").read_text())
    config["trainer"].pop("logger", None)
    config_path = args.scratch / "paper_nologger.yaml"
    config_path.write_text(yaml.safe_dump(config))
    overrides = [
        "--config", str(config_path),
        f"--data.data_dir={world}", f"--data.image_size={args.image_size}",
        f"--data.num_workers={args.workers}", f"--data.eval_num_workers={args.workers}",
        "--data.check_files=false", "--data.calibration_manifest=calibration.csv",
        "--model.pretrained=false",  # no hub download: throughput does not depend on the start
        "--trainer.max_epochs=1", f"--trainer.limit_train_batches={args.fit_steps}",
        "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={args.scratch / 'run'}",
    ]
    if args.device == "cpu":
        overrides += ["--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    cli = LandmarkCLI(args=overrides, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    timer = _StepTimer(warmup=args.fit_warmup)
    trainer.callbacks.append(timer)
    _reset_peak()
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    batch = datamodule.hparams.classes_per_batch * datamodule.hparams.samples_per_class
    timed_steps = timer.steps - args.fit_warmup
    result = {
        "backbone": model.hparams.backbone, "image_size": args.image_size, "batch": batch,
        "precision": str(trainer.precision), "loader_workers": args.workers,
        "fit_steps": timer.steps, "fit_seconds_total": fit_seconds,
        "fit_img_s": timed_steps * batch / (timer.end - timer.start),
        "fit_peak_gib": _gib(),
    }
    _write(args.out, "fit.json", result)

    # One evaluation of the whole evaluation sets, as a fit's validation epoch does it.
    evaluation = RetrievalEvaluation(alphas=(1e-2, 1e-3, 1e-4), index="flat", memory_budget_mb=2048,
                                     centroid_index=True)
    compute_seconds = []
    original = evaluation._compute

    def timed_compute(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            compute_seconds.append(time.perf_counter() - t0)

    evaluation._compute = timed_compute
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, (RetrievalEvaluation, _StepTimer))]
    trainer.callbacks.append(evaluation)
    trainer.limit_val_batches = 1.0
    _reset_peak()
    start = time.perf_counter()
    trainer.validate(model, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - start
    sizes = {name: len(datamodule.eval_dataset(name)) for name in datamodule.eval_set_names}
    metrics = evaluation.last_metrics or {}
    result.update(
        eval_sizes=sizes, eval_images=sum(sizes.values()), eval_seconds=seconds,
        eval_compute_seconds=compute_seconds[0] if compute_seconds else None,
        eval_embed_seconds=seconds - (compute_seconds[0] if compute_seconds else 0.0),
        eval_embed_img_s=sum(sizes.values()) / (seconds - (compute_seconds[0] if compute_seconds else 0.0)),
        eval_peak_gib=_gib(),
        eval_metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    )
    _write(args.out, "fit.json", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="everything in miniature (a check of the script)")
    parser.add_argument("--parts", default="train,world,fit")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the world and the run's plots (default: --out); keep it out of --out "
                             "on the GPU machine, where only a few files come back")
    parser.add_argument("--landmarks", type=int, default=2500)
    parser.add_argument("--images-per-landmark", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--train-warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbones", default="wide_resnet50_2:128,mobilenetv2_100:256",
                        help="backbone:batch pairs for part 1")
    parser.add_argument("--fit-steps", type=int, default=200)
    parser.add_argument("--fit-warmup", type=int, default=20)
    args = parser.parse_args()
    if args.tiny:
        args.landmarks, args.images_per_landmark, args.image_size = 40, 8, 64
        args.train_steps, args.train_warmup, args.repeats = 3, 1, 1
        args.backbones, args.fit_steps, args.fit_warmup = "mobilenetv2_100:16", 6, 2
    args.scratch = args.scratch or args.out
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    _write(args.out, "environment.json", environment())

    if "train" in parts:
        for pair in args.backbones.split(","):
            backbone, batch = pair.split(":")
            _write(args.out, f"train_{backbone}.json", train_throughput(args, backbone, int(batch)))
            # The Trainer's reference cycles keep the last run's batches on the GPU until collected;
            # the next backbone's peak memory must not include them.
            gc.collect()
            _reset_peak()

    world = args.scratch / "world"
    if "world" in parts:
        config = SynthConfig(
            num_landmarks=args.landmarks, images_per_landmark=args.images_per_landmark,
            queries_per_landmark=2, nonlandmark_pool=2 * args.landmarks, distractors=4 * args.landmarks,
            calibration=args.landmarks // 2, collection=0, image_size=args.image_size,
            duplicate_landmarks=min(3, args.landmarks // 4),
        )
        start = time.perf_counter()
        generate_world(world, config, workers=os.cpu_count(), overwrite=True, progress=False)
        _write(args.out, "world.json", {"seconds": time.perf_counter() - start, "config": dataclasses.asdict(config),
                                        "images": sum(1 for _ in world.rglob("*.jpg"))})
    if "fit" in parts:
        fit_and_evaluate(args, world)


if __name__ == "__main__":
    main()
