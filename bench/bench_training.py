"""Training throughput: LandmarkModule under a Lightning Trainer vs a plain PyTorch loop.

Both train the same network (timm backbone → GeM → FC+BN → L2 norm), the same ArcFace loss, the
same AdamW, on the same in-memory batches, so the ratio measures what the framework costs.
Runs alternate (plain, lightning, plain, ...) to spread machine noise evenly; medians and the
median ratio are reported.

``--recipe`` puts the training recipes' mechanics on the Lightning side only, so the ratio is
their cost plus the framework's against the plain loop with the plain loss:
``arcface``: optimizer parameter groups (backbone / head / loss), LR warm-up, ArcFace with margin
warm-up, dynamic per-class margins and the non-landmark push (a fifth of each batch non-landmark);
``xbm``: contrastive loss with a multi-similarity miner over a 1,024-embedding cross-batch memory.
Hard non-landmark mining costs no step time; it embeds ``--mining-pool`` pool images once per
mining round, reported as a share of an epoch of ``--epoch-steps`` steps.

    python bench/bench_training.py --backbone resnet18 --image-size 96 --batch 64
    python bench/bench_training.py --backbone mobilenetv2_100 --channels-last --recipe arcface --mining-pool 2048
    python bench/bench_training.py --device cuda --precision bf16 --channels-last \
        --backbone wide_resnet50_2 --image-size 224 --batch 128
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from core.embedding import embed_batch
from core.labels import NONLANDMARK
from lightning_modules import LandmarkModule
from losses import ArcFaceLoss, CenterSoftmaxLoss, ContrastiveLoss


class FixedBatches(Dataset):
    """``steps`` ready-made batches (dicts as the data module yields them), served in order."""

    def __init__(self, steps: int, batch: int, image_size: int, num_classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(steps, batch, 3, image_size, image_size, generator=g)
        self.labels = torch.randint(0, num_classes, (steps, batch), generator=g)
        self.labels[:, batch - batch // 5 :] = NONLANDMARK  # the data module's 20 % non-landmarks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        n = self.images.shape[1]
        return {"image": self.images[i], "label": self.labels[i], "index": torch.arange(n),
                "valid": torch.ones(n, dtype=torch.bool)}


def _loader(data: FixedBatches) -> DataLoader:
    # batch_size=None: each dataset item already is a batch; no worker processes on either side.
    return DataLoader(data, batch_size=None, shuffle=False, num_workers=0)


def _plain_loss(args):
    if args.loss == "center":
        # The paper's loss as experiments/paper.yaml configures it: softmax + center loss, the
        # non-landmarks a softmax class without a center, pushed from every landmark center.
        return lambda c, d: CenterSoftmaxLoss(c, d, center_weight=0.01, center_lr=0.5, softmax_scale=16.0,  # noqa: E731
                                              nonlandmark_class=True, nonlandmark_margin=0.5)
    return lambda c, d: ArcFaceLoss(c, d, scale=30.0)  # noqa: E731


def _module(args, recipe: str = "plain") -> LandmarkModule:
    torch.manual_seed(0)
    if recipe == "plain":
        return LandmarkModule(
            num_classes=args.classes, backbone=args.backbone, embedding_size=512,
            loss=_plain_loss(args), channels_last=args.channels_last,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        )
    if recipe == "arcface":
        loss = lambda c, d: ArcFaceLoss(  # noqa: E731
            c, d, scale=30.0, margin_warmup_steps=60, dynamic_margins=True, margin_min=11.5,
            nonlandmark_max_cosine=0.3, nonlandmark_push_weight=2.0,
        )
    else:
        loss = lambda c, d: ContrastiveLoss(c, d, miner="multi_similarity", memory_size=1024)  # noqa: E731
    module = LandmarkModule(
        num_classes=args.classes, backbone=args.backbone, embedding_size=512, loss=loss,
        channels_last=args.channels_last, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        param_groups={"backbone": {"lr": 5e-4}, "head": {"lr": 1e-3}, "loss": {"lr": 1e-2, "weight_decay": 0.0}},
        warmup_steps=20,
    )
    module.loss.set_class_sizes(torch.randint(1, 50, (args.classes,), generator=torch.Generator().manual_seed(0)))
    return module


def mining_round_seconds(args) -> float:
    """Seconds to embed ``--mining-pool`` images in eval batches (one hard-mining round)."""
    module = _module(args).to(args.device)
    if args.channels_last:
        module.net.to(memory_format=torch.channels_last)
    images = torch.rand(256, 3, args.image_size, args.image_size)
    embed_batch(module, images[:16], device=args.device)  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    done = 0
    while done < args.mining_pool:
        n = min(256, args.mining_pool - done)
        embed_batch(module, images[:n], device=args.device)
        done += n
    _sync(args.device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak_memory(device: str) -> None:
    if device == "cuda":
        gc.collect()  # the last run's module and optimizer state, held by reference cycles
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> float | None:
    """GiB of GPU memory the run allocated at its peak (None on CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def plain_loop(args, data: FixedBatches) -> tuple[float, float | None]:
    _reset_peak_memory(args.device)
    module = _module(args).to(args.device)
    if args.channels_last:
        module.net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    start = None
    for step, batch in enumerate(_loader(data)):
        if step == args.warmup:
            _sync(args.device)
            start = time.perf_counter()
        images = batch["image"].to(args.device, non_blocking=True)
        labels = batch["label"].to(args.device, non_blocking=True)
        with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
            loss = module.loss(module(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(args.device)
    return (len(data) - args.warmup) * args.batch / (time.perf_counter() - start), _peak_memory(args.device)


class _Timer(pl.Callback):
    def __init__(self, warmup: int, device: str):
        self.warmup, self.device = warmup, device
        self.start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        _sync(self.device)
        self.end = time.perf_counter()


def lightning_loop(args, data: FixedBatches) -> tuple[float, float | None]:
    _reset_peak_memory(args.device)
    module = _module(args, args.recipe)
    timer = _Timer(args.warmup, args.device)
    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=precision,
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], log_every_n_steps=50,
    )
    trainer.fit(module, train_dataloaders=_loader(data))
    return (len(data) - args.warmup) * args.batch / (timer.end - timer.start), _peak_memory(args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--loss", default="arcface", choices=["arcface", "center"],
                        help="the loss of both sides (center: the paper's center loss + softmax)")
    parser.add_argument("--recipe", default="plain", choices=["plain", "arcface", "xbm"],
                        help="the Lightning side's mechanics (the plain loop always trains the plain --loss)")
    parser.add_argument("--mining-pool", type=int, default=0, help="also time one hard-mining round of N images")
    parser.add_argument("--epoch-steps", type=int, default=43, help="steps per epoch, for the mining share")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    result = run(args)
    shown = ["plain_median", "lightning_median", "ratio_median"]
    if args.mining_pool:
        rounds = [mining_round_seconds(args) for _ in range(args.repeats)]
        epoch_s = args.epoch_steps * args.batch / result["lightning_median"]
        result.update(mining_round_s=rounds, mining_round_median_s=statistics.median(rounds),
                      mining_share_of_epoch=statistics.median(rounds) / epoch_s)
        shown += ["mining_round_median_s", "mining_share_of_epoch"]
    print(json.dumps({k: result[k] for k in shown}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def run(args) -> dict:
    """Alternate plain and Lightning runs ``args.repeats`` times; img/s, medians, the median ratio."""
    data = FixedBatches(args.steps + args.warmup, args.batch, args.image_size, args.classes)
    if args.device == "cuda":
        # On a GPU, a host-to-device copy per step would be part of both loops' time; the batches
        # live on the device instead, so the ratio compares the training steps alone.
        data.images, data.labels = data.images.to("cuda"), data.labels.to("cuda")
    held = (data.images.nbytes + data.labels.nbytes) / 2**30 if args.device == "cuda" else 0.0
    plain, lightning, plain_mem, lightning_mem = [], [], [], []
    for _ in range(args.repeats):
        speed, mem = plain_loop(args, data)
        plain.append(speed)
        plain_mem.append(mem)
        speed, mem = lightning_loop(args, data)
        lightning.append(speed)
        lightning_mem.append(mem)
        print(f"plain {plain[-1]:8.1f} img/s   lightning {lightning[-1]:8.1f} img/s", flush=True)
    ratios = [lit / p for lit, p in zip(lightning, plain)]
    return {
        "machine": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "plain_img_s": plain, "lightning_img_s": lightning,
        "plain_median": statistics.median(plain), "lightning_median": statistics.median(lightning),
        "ratio_median": statistics.median(ratios),
        # Peak GPU memory of the training itself: the batches held on the device are left out.
        "plain_peak_gib": max(plain_mem) - held if args.device == "cuda" else None,
        "lightning_peak_gib": max(lightning_mem) - held if args.device == "cuda" else None,
    }


if __name__ == "__main__":
    main()
