"""bfloat16 inference on the CPU: faster embedding, at what cost to the shipped decision?

CPUs with AVX-512 BF16 (e.g. AMD Zen 4, Intel Sapphire Rapids) run convolutions under
``torch.autocast("cpu", dtype=torch.bfloat16)`` much faster than in float32. This bench embeds a
finished demo chain's evaluation photos (its cleaned DB, queries, distractors, calibration photos
and training non-landmarks) with the chain's checkpoint twice, in float32 (the control) and under
bf16 autocast (the embedding head stays float32 either way: ``EmbeddingNet``), and scores the
shipped decision of each (:func:`recognition.evaluation.evaluate_centroid_index`: centroids, the
non-landmark penalty, the threshold calibrated at FPR 1e-3 on the calibration photos, the FPR
measured on the distractors). Time is the whole pass (decoding included), one pass each.

    landmarks demo --seed N        # the chains first (runs/demo/chain-seedN)
    python bench/bench_bf16_inference.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.embedding import embed_dataset  # noqa: E402
from datamodules.datasets import manifest_dataset  # noqa: E402
from datamodules.manifest import merged_id_aliases, read_manifest  # noqa: E402
from datamodules.transforms import eval_transform  # noqa: E402
from recognition.evaluation import evaluate_centroid_index  # noqa: E402
from retrieval.embedding_model import load_embedding_model  # noqa: E402

PRECISIONS = {"float32": contextlib.nullcontext, "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU bf16 support: {torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print("\n| seed | precision | seconds | recall (calibrated, FPR 1e-3) | achieved FPR | recall@FPR 1e-2 | P@1 | "
          "min cosine to float32 |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        chain = args.runs / f"chain-seed{seed}"
        world = args.data / ("synthetic" if seed == 0 else f"synthetic-seed{seed}")
        summary = json.loads((chain / "summary.json").read_text())
        # the chain's own scales (its index's model; one scale for chains made before the demo had them)
        scales = summary.get("index", {}).get("scales")
        # float32 as loaded: the contexts below choose the precision (a checkpoint may record bf16)
        model = load_embedding_model(checkpoint=summary["checkpoint"], scales=scales, inference_precision="32")
        net = model.net.to(memory_format=torch.channels_last)
        clean = read_manifest(summary["cleaning"]["manifest"], "landmark", extra_columns="ignore")
        aliases = merged_id_aliases(clean)
        sets = {"gallery": clean.subset(clean.table["decision"].str.strip().ne("remove").to_numpy())}
        for name, kind in (("queries", "landmark"), ("distractors", "nonlandmark"), ("calibration", "nonlandmark"),
                           ("nonlandmarks", "nonlandmark")):
            sets[name] = read_manifest(world / f"{name}.csv", kind, extra_columns="ignore")
        code = {lid: i for i, lid in enumerate(sorted(set(sets["gallery"].landmark_ids)))}
        gallery_labels = np.array([code[i] for i in sets["gallery"].landmark_ids])
        query_labels = np.array([code.get(aliases.get(i, i), -2) for i in sets["queries"].landmark_ids])
        reference = None
        for precision, context in PRECISIONS.items():
            started, emb = time.perf_counter(), {}
            for name, manifest in sets.items():
                dataset = manifest_dataset(manifest, np.zeros(len(manifest), np.int64), eval_transform(model.image_size),
                                           model.image_size)
                vectors, extras = embed_dataset(net, dataset, batch_size=256, forward_context=context)
                valid = np.asarray(extras["valid"]).astype(bool)
                if not valid.all():
                    raise SystemExit(f"{manifest.source}: {int((~valid).sum())} unreadable image(s); this bench "
                                     "compares whole sets")
                emb[name] = np.asarray(vectors)
            seconds = time.perf_counter() - started
            m = evaluate_centroid_index(emb["gallery"], gallery_labels, emb["queries"], query_labels, emb["distractors"],
                                        alphas=(1e-2, 1e-3), calibration_emb=emb["calibration"],
                                        penalty_pool_emb=emb["nonlandmarks"])
            reference = reference or emb
            cosine = min(float((reference[n] * emb[n]).sum(1).min()) for n in sets)
            print(f"| {seed} | {precision} | {seconds:.0f} | {m['recall@fpr=1e-03']:.3f} | "
                  f"{m['actual_fpr@fpr=1e-03']:.4f} | {m['recall@fpr=1e-02']:.3f} | {m['p@1']:.3f} | {cosine:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
