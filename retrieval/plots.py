"""Figures for a :class:`retrieval.metrics.RecognitionResult`.

Figures are built as ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot: no GUI
backend is touched, nothing global is switched, and figures are freed with their last reference
(pyplot would keep them alive in its registry during a long training run). Save with
``fig.savefig(path)`` or hand them to a logger.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retrieval.decision import accepts
from retrieval.metrics import RecognitionResult, format_alpha, threshold_at_fpr

__all__ = ["plot_hardest_distractors", "plot_precision_fpr", "plot_score_histograms"]


def _figure(figsize=(6.4, 4.2)) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_precision_fpr(result: RecognitionResult) -> Figure:
    """Precision and recall vs distractor FPR (log x), with the requested alphas marked."""
    fig = _figure()
    ax = fig.add_subplot()
    curve = result.curve()
    n_d = len(result.distractor_scores)
    # log-x cannot show FPR = 0 (thresholds above every distractor): those points are dropped;
    # the leftmost visible point is FPR = 1/n_distractors, the finest rate the data resolves.
    visible = np.isfinite(curve.fpr) & (curve.fpr > 0)
    if n_d == 0 or not visible.any():
        ax.text(0.5, 0.5, "no distractor accepted at any threshold\n(or no distractors)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    ax.step(curve.fpr[visible], curve.precision[visible], where="post", label="precision")
    ax.step(curve.fpr[visible], curve.recall[visible], where="post", label="recall")
    for alpha in result.alphas:
        if alpha in result.unresolved_alphas:
            continue
        a = format_alpha(alpha)
        recall = result.metrics.get(f"recall@fpr={a}")
        ax.axvline(alpha, color="grey", lw=0.8, ls=":")
        if recall is not None:
            ax.plot([alpha], [recall], "o", color="C1", ms=4)
            ax.annotate(f"R={recall:.3f}", (alpha, recall), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(0.5 / n_d, 1.0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"false-positive rate on {n_d} distractors")
    ax.set_ylabel("precision / recall")
    ax.set_title("Recognition: precision and recall vs FPR")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def plot_score_histograms(result: RecognitionResult, bins: int = 100) -> Figure:
    """Top-1 score histograms: landmark-correct, landmark-wrong and distractor queries.

    Densities on a log-y axis, because at the operating points that matter the distractor tail
    holds a handful of photos out of thousands. Dashed lines: thresholds for the resolvable
    alphas.
    """
    fig = _figure()
    ax = fig.add_subplot()
    lm = np.asarray(result.landmark_scores, dtype=np.float64)
    ok = np.asarray(result.landmark_correct, dtype=bool)
    ds = np.asarray(result.distractor_scores, dtype=np.float64)
    groups = [
        ("landmark, correct top-1", lm[ok & np.isfinite(lm)], "C2"),
        ("landmark, wrong top-1", lm[~ok & np.isfinite(lm)], "C1"),
        ("distractor", ds[np.isfinite(ds)], "C3"),
    ]
    finite = np.concatenate([g[1] for g in groups])
    if finite.size == 0:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    lo, hi = float(finite.min()), float(finite.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    for label, values, color in groups:
        if values.size:
            ax.hist(values, bins=edges, density=True, histtype="step", lw=1.4, color=color,
                    label=f"{label} (n={values.size})")
    for alpha in result.alphas:
        t = threshold_at_fpr(ds, alpha) if ds.size else None
        if t is not None and np.isfinite(t):
            ax.axvline(t, color="grey", ls="--", lw=0.8)
            ax.text(t, 1.0, f" fpr={format_alpha(alpha)}", rotation=90, va="top", fontsize=7,
                    transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    ax.set_xlabel("top-1 cosine similarity")
    ax.set_ylabel("density")
    ax.set_title("Top-1 score distributions")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_hardest_distractors(
    pairs,
    thresholds: dict[str, float],
    rows: tuple[str, str] = ("distractor", "its top-1\ngallery photo"),
    title: str = "Distractors with the highest top-1 scores (they set the low-FPR thresholds)",
    score_name: str = "cos",
) -> Figure:
    """The distractors that decide the thresholds, each above the gallery photo it matched.

    ``pairs``: ``(distractor_image, matched_image, score, matched_label)`` per distractor, hardest
    first; images are ``[H, W, 3]`` uint8 arrays, or ``None`` when unreadable or absent (drawn as a
    blank tile). ``thresholds``: ``{"1e-03": t, ...}``; a distractor's title lists the FPRs whose
    threshold it reaches, i.e. the operating points it counts as a false positive at. ``rows``:
    the two rows' names; ``title``: the sheet's; ``score_name``: what a score is called (``landmarks
    index`` shows its calibration photos, whose scores are cosines only without penalty or verification).
    """
    n = max(1, len(pairs))
    fig = _figure(figsize=(max(4.0, 1.45 * n), 3.9))
    if not pairs:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no distractors", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    axes = fig.subplots(2, n, squeeze=False)
    for column, (distractor, matched, score, label) in enumerate(pairs):
        reached = [a for a, t in thresholds.items() if t is not None and accepts(score, t)]
        top, bottom = axes[0, column], axes[1, column]
        for ax, image in ((top, distractor), (bottom, matched)):
            ax.imshow(image if image is not None else np.full((8, 8, 3), 255, np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
        accepted = f"accepted at FPR\n{', '.join(reached)}" if reached else "not accepted at\nany FPR shown"
        top.set_title(f"#{column + 1}  {score_name} {score:.3f}\n{accepted}", fontsize=7)
        bottom.set_title(f"landmark {label}", fontsize=7)
    axes[0, 0].set_ylabel(rows[0], fontsize=8)
    axes[1, 0].set_ylabel(rows[1], fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig
