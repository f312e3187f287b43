"""``landmarks compare``: mean ± 95 % confidence interval over seeds, from the runs' CSV logs.

Reads each run's Lightning ``metrics.csv`` (no wandb needed): the last logged value of every
``<stage>/<metric>`` column is the run's final evaluation. Runs are grouped into configurations
by their parameters minus the seed parameters (``seed_everything`` and any ``*.seed``); for a
``landmarks sweep`` run the parameters come from its ``run.json``, for any other LightningCLI run
folder from its ``config.yaml`` (grouped by the wandb group of :mod:`callbacks.wandb_conventions`).

A run's other settings may differ within its configuration (a data folder, a callback's argument):
those differences are listed in ``summary.md`` and logged, never averaged over in silence, and
``group_by`` (``--group-by KEY``, a dotted key or section of ``config.yaml``) splits the runs by it.

Per configuration and metric: the mean over its runs and the half-width of the two-sided 95 %
Student-t interval, ``t(0.975, n-1) · s / √n`` with ``s`` the sample standard deviation; one
run gives the mean and no interval.

Against a control configuration (``control``, ``--control LABEL``): each run is paired with the
control's run of the same seeds (every seed parameter equal), and per configuration and metric
the mean of the paired differences gets the same Student-t interval over the pairs, with the count
of pairs above and below the control. Pairing takes out what runs of one seed share (their random
draws: initial weights, data order, augmentations); an interval that excludes 0 says the difference is larger
than the seeds' spread. Pairs where either run's metric is undefined (NaN) are left out; runs
without a partner are listed. Runs of one configuration with the same seeds are reruns: listed, and
an error under a control. Written to the output folder:

* ``summary.md`` — the table, the runs, what was excluded and why;
* ``summary.csv`` — one row per configuration (``<metric> mean``, ``<metric> ci95``, ``<metric> std``);
* ``runs.csv`` — one row per run;
* ``paired.csv`` — with a control: one row per configuration and metric (mean difference, ci95,
  pairs, higher, lower);
* ``summary.png`` — the chosen metric per configuration (mean, 95 % CI, each run), and, where
  the evaluation callback saved the curve (``plots/*_precision_fpr.csv``), recall and precision
  against the distractor FPR, averaged over each configuration's runs.

Skip policy: runs whose ``run.json`` status is not ``ok`` (failed, interrupted, not run yet) are
left out, counted in the log and listed in ``summary.md``. A run folder without a metrics file,
or without a requested metric, is an error naming the folder; a metrics file that is not UTF-8,
whose last line is incomplete (a run still writing, or killed mid-write) or whose final evaluation
has an infinite value is an error naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from core.atomic import atomic_path, write_text_atomic
from core.errors import UserError
from sweeps.runner import PREVIOUS_ATTEMPTS, read_run_json
from sweeps.spec import _short, is_seed_key, short_key

log = logging.getLogger(__name__)

DEFAULT_METRICS = (
    "recall@fpr=1e-03", "recall@fpr=1e-02", "precision@fpr=1e-03", "precision@fpr=1e-03,prior=0.01",
    "p@1", "map@10", "gap",
)
_CURVE = re.compile(r"^(?P<tag>[a-z]+)_epoch(?P<epoch>\d+)_precision_fpr\.csv$")


class CompareError(UserError):
    """Run folders that cannot be compared; the message names the folder or file."""


@dataclass
class RunRecord:
    name: str
    path: Path
    parameters: dict[str, Any]
    metrics: dict[str, float]
    metrics_file: Path
    epoch: int | None
    curve_file: Path | None = None
    status: str | None = None
    # The run's config.yaml as dotted leaves, less its seeds and what only names or displays the
    # run (see ``_RUN_ONLY``); None when the run folder has no config.yaml.
    settings: dict[str, Any] | None = None

    @property
    def seed_parameters(self) -> dict[str, Any]:
        return {k: v for k, v in self.parameters.items() if is_seed_key(k)}

    @property
    def config_parameters(self) -> dict[str, Any]:
        return {k: v for k, v in self.parameters.items() if not is_seed_key(k)}

    @property
    def config_key(self) -> str:
        return json.dumps(self.config_parameters, sort_keys=True)


@dataclass
class Configuration:
    label: str
    parameters: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)
    # settings of config.yaml that differ between this configuration's runs: {key: distinct values}
    differences: dict[str, list[Any]] = field(default_factory=dict)

    def repeated_seeds(self) -> list[list[RunRecord]]:
        """Runs of this configuration that share their seeds: reruns, which are not independent replicates."""
        by_seeds: dict[str, list[RunRecord]] = {}
        for run in self.runs:
            by_seeds.setdefault(_seed_key(run), []).append(run)
        return [same for same in by_seeds.values() if len(same) > 1]


@dataclass
class PairedDifference:
    """One configuration against the control on one metric, over the seeds both ran."""

    mean: float
    half_width: float | None
    pairs: int
    higher: int
    lower: int


# ---- reading ------------------------------------------------------------------------------------


def find_metrics_file(run_dir: Path) -> Path:
    if (run_dir / "metrics.csv").is_file():
        return run_dir / "metrics.csv"
    found = sorted(p for p in run_dir.rglob("metrics.csv")
                   if not any(part.startswith(".") for part in p.relative_to(run_dir).parts))
    if not found:
        raise CompareError(f"{run_dir}: no metrics.csv below this folder (is a pytorch_lightning.loggers.CSVLogger "
                           "configured, and did the run evaluate?)")
    if len(found) > 1:
        listing = ", ".join(str(p.relative_to(run_dir)) for p in found)
        raise CompareError(f"{run_dir}: several metrics.csv files ({listing}); pass the version folder you mean")
    return found[0]


def read_final_metrics(metrics_file: Path, stage: str = "val") -> tuple[dict[str, float], int | None]:
    """Every ``<stage>/...`` value of the last evaluation (the rows of the last step that logged
    one), and its epoch. Only that evaluation: a metric it did not log (a precision with nothing
    accepted) must not be filled in from an earlier evaluation."""
    prefix = f"{stage}/"
    final: dict[str, float] = {}
    where: dict[str, tuple[int, str]] = {}  # metric -> (line, column) of its final value
    epoch = None
    final_step = None
    # Read here rather than with core.tables.read_text_csv: the checks below need the raw text (its
    # last newline) and the line of every value, which a DataFrame does not keep.
    try:
        text = metrics_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CompareError(f"{metrics_file}: not a UTF-8 text file (byte {err.object[err.start]:#04x} at offset "
                           f"{err.start}); is it a Lightning metrics.csv?") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    while rows and not rows[-1]:  # blank lines at the end
        rows.pop()
    header = rows[0] if rows else []
    # Lightning writes whole lines; a last one without its newline or short of fields was cut off
    # mid-write, and its half-written number (0.9 → "0.") would be read as a real value.
    if rows and (not text.endswith(("\n", "\r")) or len(rows[-1]) < len(header)):
        raise CompareError(f"{metrics_file}: the last line is incomplete (no newline at its end, or fewer fields "
                           "than the header): the run may still be running, or was killed while writing it")
    columns = [(i, c) for i, c in enumerate(header) if c.startswith(prefix)]
    step_at = header.index("step") if "step" in header else None
    epoch_at = header.index("epoch") if "epoch" in header else None
    for line, row in enumerate(rows[1:], start=2):
        if len(row) > len(header):  # a value under no column: the file is not what Lightning writes
            raise CompareError(f"{metrics_file}: line {line} has {len(row)} fields, the header {len(header)} "
                               "(an unquoted comma, or lines of two files mixed?)")
        values = {}
        for i, column in columns:
            cell = (row[i] if i < len(row) else "").strip()
            if not cell:
                continue
            try:
                values[column[len(prefix):]] = float(cell)
            except ValueError:
                raise CompareError(f"{metrics_file}: line {line}, column {column}: {cell!r} is not a number") from None
        if not values:
            continue
        step = row[step_at].strip() if step_at is not None and step_at < len(row) else ""
        if step != final_step:  # a later evaluation replaces the earlier one's values
            final, where, final_step = {}, {}, step
        final.update(values)
        where.update({name: (line, prefix + name) for name in values})
        if epoch_at is not None and epoch_at < len(row) and row[epoch_at].strip():
            epoch = int(float(row[epoch_at]))
    # NaN is a metric left undefined (reported as such); an infinite value has no mean to take.
    for name, value in final.items():
        if math.isinf(value):
            line, column = where[name]
            raise CompareError(f"{metrics_file}: line {line}, column {column}: {value} is not a finite number")
    return final, epoch


# Settings that name, place or display a run rather than configure it: they differ between any two
# runs, so they are neither differences within a configuration nor a key to group by.
_RUN_ONLY = re.compile(r"^(trainer\.default_root_dir|trainer\.enable_progress_bar|ckpt_path|trainer\.logger([.\[].*)?)$")
_ABSENT = "(absent)"


def flatten_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted.key: leaf}``; list items are ``key[i]``, an empty dict or list a leaf."""
    if isinstance(config, dict) and config:
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(flatten_settings(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(config, list) and config:
        out = {}
        for i, value in enumerate(config):
            out.update(flatten_settings(value, f"{prefix}[{i}]"))
        return out
    return {prefix: config}


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CompareError(f"{config_file}: cannot read it as YAML ({err})") from None
    if not isinstance(config, dict):
        raise CompareError(f"{config_file}: not a LightningCLI config (a mapping at the top)")
    return config


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten_settings(config).items() if not (_RUN_ONLY.match(k) or is_seed_key(k))}


def _parameters_from_config(config: dict[str, Any]) -> dict[str, Any]:
    from callbacks.wandb_conventions import run_identity

    identity = run_identity(config)
    parameters = {"group": identity.group, "seed_everything": identity.seed}
    if identity.data_seed is not None:  # the sampler's seed: runs pair only when both seeds match
        parameters["data.seed"] = identity.data_seed
    return parameters


def find_curve_file(log_dir: Path, stage: str) -> Path | None:
    """The precision–FPR curve of the run's last evaluation at this stage, if the callback saved one."""
    tags = {stage: 1} if stage != "val" else {"val": 1, "validate": 0}  # the fit's own evaluation first
    best, best_key = None, None
    for path in (log_dir / "plots").glob("*_precision_fpr.csv"):
        m = _CURVE.match(path.name)
        if m and m["tag"] in tags:
            key = (int(m["epoch"]), tags[m["tag"]])
            if best_key is None or key > best_key:
                best, best_key = path, key
    return best


def load_run(run_dir: str | Path, stage: str = "val") -> RunRecord:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CompareError(f"{run_dir}: not a folder")
    record = read_run_json(run_dir)
    metrics_file = find_metrics_file(run_dir)
    config_file = metrics_file.parent / "config.yaml"
    config = _read_config(config_file) if config_file.is_file() else None
    if record is not None:
        parameters = dict(record.get("parameters") or {})
    elif config is not None:
        parameters = _parameters_from_config(config)
    else:
        raise CompareError(f"{run_dir}: no run.json (from landmarks sweep) and no config.yaml next to "
                           f"{metrics_file.name}: the run's parameters are unknown")
    metrics, epoch = read_final_metrics(metrics_file, stage)
    if not metrics:
        raise CompareError(f"{metrics_file}: no '{stage}/' metrics logged (did the run reach an evaluation?)")
    settings = _settings(config) if config is not None else None
    return RunRecord(name=run_dir.name, path=run_dir, parameters=parameters, metrics=metrics,
                     metrics_file=metrics_file, epoch=epoch, curve_file=find_curve_file(metrics_file.parent, stage),
                     status=(record or {}).get("status"), settings=settings)


def add_group_keys(runs: list[RunRecord], keys: Sequence[str]) -> None:
    """Make each ``config.yaml`` key of ``keys`` a parameter of every run, so that it splits configurations."""
    for key in keys:
        if is_seed_key(key) or _RUN_ONLY.match(key):
            raise CompareError(f"--group-by {key}: a seed or a run's own name/folder cannot define a configuration")
        without = [r for r in runs if r.settings is None]
        if without:
            raise CompareError(f"--group-by {key}: {without[0].metrics_file.parent} has no config.yaml to read it from")
        values = [_value_at(r.settings, key) for r in runs]
        if all(v == _ABSENT for v in values):
            example = sorted(runs[0].settings)[:8]
            raise CompareError(f"--group-by {key}: no run's config.yaml has this key (keys look like: {', '.join(example)})")
        for run, value in zip(runs, values):
            # a section's value is its leaves, keyed by the rest of their path
            run.parameters[key] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


def _differences(runs: list[RunRecord], ignore: set[str]) -> dict[str, list[Any]]:
    keys = sorted({k for r in runs for k in r.settings} - ignore)
    differing = {key for key in keys
                 if len({json.dumps(r.settings.get(key, _ABSENT), sort_keys=True) for r in runs}) > 1}
    # A section set in some runs only (``data.synthetic: null`` beside its fields) is one difference,
    # reported at the section with each run's whole value there.
    differing |= {parent for key in differing for parent in _parents(key) if any(parent in r.settings for r in runs)}
    found = {}
    for key in sorted(differing):
        if not any(parent in differing for parent in _parents(key)):
            values = dict.fromkeys(json.dumps(_value_at(r.settings, key), sort_keys=True) for r in runs)
            found[key] = [json.loads(v) for v in values]
    return found


def _value_at(settings: dict[str, Any], key: str) -> Any:
    """A run's value at ``key``: the leaf, or the leaves below it keyed by the rest of their path."""
    if key in settings:
        return settings[key]
    below = {k[len(key):].lstrip("."): v for k, v in settings.items() if k.startswith((key + ".", key + "["))}
    return below or _ABSENT


def _parents(key: str) -> list[str]:
    """``a.b[2].c`` -> ``a``, ``a.b``, ``a.b[2]``."""
    cuts = [m.start() for m in re.finditer(r"[.\[]", key)]
    return [key[:i] for i in cuts]


def sweep_run_dirs(sweep_dir: Path) -> tuple[list[Path], list[str]]:
    """The run folders of a sweep (from sweep.json when present) and the names of runs never started."""
    manifest = sweep_dir / "sweep.json"
    if manifest.is_file():
        names = [r["name"] for r in json.loads(manifest.read_text())["runs"]]
    else:
        names = sorted(p.name for p in sweep_dir.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and (p / "run.json").is_file())
    if not names:
        raise CompareError(f"{sweep_dir}: no runs (no sweep.json, and no subfolder with a run.json)")
    present = [sweep_dir / n for n in names if (sweep_dir / n).is_dir()]
    missing = [n for n in names if not (sweep_dir / n).is_dir()]
    return present, missing


# ---- statistics ---------------------------------------------------------------------------------


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, half-width of the two-sided Student-t interval, sample std); no interval for n = 1."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    std = float(x.std(ddof=1))
    t = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1))
    return mean, t * std / math.sqrt(x.size), std


# ---- grouping -----------------------------------------------------------------------------------


def group_runs(runs: list[RunRecord]) -> tuple[list[Configuration], list[str], dict[str, Any]]:
    """Configurations in first-seen order, the parameters that vary, and those common to all runs."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config_parameters))
    varying = [k for k in keys if len({json.dumps(r.config_parameters.get(k), sort_keys=True) for r in runs}) > 1]
    common = {k: runs[0].config_parameters.get(k) for k in keys if k not in varying}
    configs: dict[str, Configuration] = {}
    for run in runs:
        if run.config_key not in configs:
            label = ", ".join(f"{short_key(k)}={_short(run.config_parameters.get(k))}" for k in varying) or "all runs"
            configs[run.config_key] = Configuration(label=label, parameters=run.config_parameters)
        configs[run.config_key].runs.append(run)
    labels = [c.label for c in configs.values()]
    if len(set(labels)) != len(labels):  # short forms collided: fall back to the full values
        for c in configs.values():
            c.label = ", ".join(f"{k}={json.dumps(c.parameters.get(k))}" for k in varying)
    for c in configs.values():
        if all(r.settings is not None for r in c.runs):  # without every run's config.yaml a difference cannot be told
            c.differences = _differences(c.runs, ignore=set(c.parameters))
    return list(configs.values()), varying, common


def undefined_in(run: RunRecord, metric: str) -> bool:
    """Precision at an FPR is undefined when the run accepted no photo there (0 / 0), and the
    evaluation does not log it; the run did evaluate at that FPR when it logged the recall."""
    head, found, tail = metric.partition("precision@fpr=")
    if not found or (head and not head.endswith("/")):  # also centroid/precision@fpr=..., not e.g. mean_precision
        return False
    return metric not in run.metrics and f"{head}recall@fpr={tail.split(',')[0]}" in run.metrics


def with_undefined(runs: list[RunRecord], metric: str) -> list[RunRecord]:
    """The runs lacking ``metric`` only because it is undefined for them: NaN is recorded there."""
    undefined = [r for r in runs if undefined_in(r, metric)]
    for run in undefined:
        run.metrics[metric] = float("nan")
    if undefined:
        log.warning("compare: %s is undefined (nothing accepted at that FPR) in %d run(s), e.g. %s; "
                    "its mean is over the other runs", metric, len(undefined), undefined[0].name)
    return undefined


def choose_metrics(runs: list[RunRecord], requested: Sequence[str] | None) -> list[str]:
    if requested:
        for metric in requested:
            with_undefined(runs, metric)
            lacking = [r for r in runs if metric not in r.metrics]
            if lacking:
                raise CompareError(
                    f"metric {metric!r} is missing in {len(lacking)} run(s), e.g. {lacking[0].metrics_file} "
                    f"(it has: {', '.join(sorted(lacking[0].metrics))})")
        return list(requested)
    chosen = []
    for metric in DEFAULT_METRICS:
        if any(metric in r.metrics for r in runs):
            with_undefined(runs, metric)
        have = [r for r in runs if metric in r.metrics]
        if len(have) == len(runs):
            chosen.append(metric)
        elif have:
            lacking = [r for r in runs if metric not in r.metrics]
            raise CompareError(f"metric {metric!r} is logged by some runs but not by {lacking[0].metrics_file} "
                               f"(and {len(lacking) - 1} more); these runs did not evaluate alike")
        else:
            log.info("compare: %s is logged by no run; left out", metric)
    if not chosen:
        raise CompareError(f"none of the default metrics ({', '.join(DEFAULT_METRICS)}) is logged by these runs; "
                           "name some with --metric")
    return chosen


# ---- writing ------------------------------------------------------------------------------------


def _fmt(mean: float, half: float | None, n: int, n_all: int | None = None) -> str:
    if n == 0:
        return "undefined"
    undefined = "" if n_all in (None, n) else f" ({n} of {n_all} runs; undefined in the others)"
    return (f"{mean:.3f} ± {half:.3f}" if half is not None else f"{mean:.3f} (n={n}, no CI)") + undefined


def _seed_text(run: RunRecord) -> str:
    return ", ".join(f"{short_key(k)}={v}" for k, v in run.seed_parameters.items()) or "-"


@dataclass
class Comparison:
    configurations: list[Configuration]
    metrics: list[str]
    varying: list[str]
    common: dict[str, Any]
    excluded: list[tuple[str, str]]
    stage: str
    control: Configuration | None = None
    # (configuration label, metric) -> the paired difference against the control; None: no pair
    paired: dict[tuple[str, str], PairedDifference | None] = field(default_factory=dict)
    unpaired: list[str] = field(default_factory=list)  # runs with no control run of the same seeds

    def values(self, config: Configuration, metric: str) -> list[float]:
        """The metric's values over the configuration's runs, leaving out runs where it is undefined (NaN)."""
        return [r.metrics[metric] for r in config.runs if not math.isnan(r.metrics[metric])]

    def stats(self, config: Configuration, metric: str) -> tuple[float, float | None, float | None]:
        values = self.values(config, metric)
        return mean_ci(values) if values else (float("nan"), None, None)


# ---- against a control, paired by seed ----------------------------------------------------------


def find_control(configurations: list[Configuration], wanted: str) -> Configuration:
    """The configuration whose label is ``wanted``, or the only one whose label contains it."""
    if len(configurations) < 2:
        raise CompareError(f"--control {wanted!r}: these runs form one configuration ({configurations[0].label!r}), "
                           "so there is nothing to compare with it")
    exact = [c for c in configurations if c.label == wanted]
    if exact:
        return exact[0]
    partial = [c for c in configurations if wanted in c.label]
    if len(partial) == 1:
        return partial[0]
    listed = "; ".join(repr(c.label) for c in (partial or configurations))
    if not partial:
        raise CompareError(f"--control {wanted!r} names no configuration (they are: {listed})")
    raise CompareError(f"--control {wanted!r} matches {len(partial)} configurations ({listed}); give more of the label")


def _seed_key(run: RunRecord) -> str:
    return json.dumps(run.seed_parameters, sort_keys=True)


def _by_seeds(config: Configuration) -> dict[str, RunRecord]:
    for first, second, *_ in config.repeated_seeds():
        raise CompareError(f"runs {first.path} and {second.path} of {config.label!r} have the same seeds "
                           f"({_seed_text(first)}): which one pairs with the control is ambiguous; compare one of them")
    return {_seed_key(run): run for run in config.runs}


def paired_difference(values: Sequence[float], control_values: Sequence[float]) -> PairedDifference | None:
    """Mean of ``values[i] - control_values[i]`` with its 95 % Student-t half-width over the pairs;
    pairs where either value is NaN (undefined) are left out; None when no pair is left."""
    x, c = np.asarray(values, dtype=np.float64), np.asarray(control_values, dtype=np.float64)
    if x.shape != c.shape:
        raise ValueError(f"need one control value per value, got {x.shape} and {c.shape}")
    d = (x - c)[np.isfinite(x) & np.isfinite(c)]
    if d.size == 0:
        return None
    mean, half, _ = mean_ci(d)
    return PairedDifference(mean, half, int(d.size), int((d > 0).sum()), int((d < 0).sum()))


def pair_with_control(comparison: Comparison, control: Configuration) -> None:
    """Fill ``comparison.paired`` and ``comparison.unpaired`` against ``control``."""
    comparison.control = control
    control_runs = _by_seeds(control)
    paired_seeds: set[str] = set()
    for config in comparison.configurations:
        if config is control:
            continue
        runs = _by_seeds(config)
        paired_seeds |= runs.keys()
        matched = [key for key in runs if key in control_runs]
        comparison.unpaired += [f"{runs[key].name} ({config.label}; {_seed_text(runs[key])})"
                                for key in runs if key not in control_runs]
        for metric in comparison.metrics:
            comparison.paired[(config.label, metric)] = paired_difference(
                [runs[k].metrics[metric] for k in matched], [control_runs[k].metrics[metric] for k in matched])
    comparison.unpaired += [f"{run.name} (control; {_seed_text(run)})" for key, run in control_runs.items()
                            if key not in paired_seeds]
    if comparison.unpaired:
        log.warning("compare: %d run(s) have no partner of the same seeds and are left out of the paired "
                    "differences: %s", len(comparison.unpaired), ", ".join(comparison.unpaired))


def _fmt_paired(d: PairedDifference | None, row_pairs: int) -> str:
    if d is None:
        return "no pair"
    counts = f"{d.higher} higher, {d.lower} lower"
    if d.pairs < row_pairs:  # pairs where the metric is undefined (NaN) in a run were left out
        counts = f"{d.pairs} pairs, {counts}"
    mean = d.mean if round(d.mean, 3) != 0 else 0.0  # no "-0.000" for a difference that rounds to nothing
    if d.half_width is None:
        return f"{mean:+.3f} (1 pair, no CI; {counts})"
    # Where the mean and the half-width round alike, a fourth digit shows which side of 0 the interval is.
    digits = 4 if f"{abs(mean):.3f}" == f"{d.half_width:.3f}" else 3
    text = f"{mean:+.{digits}f} ± {d.half_width:.{digits}f}"
    decisive = abs(d.mean) > d.half_width
    return (f"**{text}**" if decisive else text) + f" ({counts})"


def paired_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["configuration", "control", "metric", "pairs", "mean_difference", "ci95", "higher", "lower"])
    for config in comparison.configurations:
        if config is comparison.control:
            continue
        for metric in comparison.metrics:
            d = comparison.paired[(config.label, metric)]
            writer.writerow([config.label, comparison.control.label, metric, 0 if d is None else d.pairs,
                             "" if d is None else repr(d.mean), "" if d is None or d.half_width is None else repr(d.half_width),
                             "" if d is None else d.higher, "" if d is None else d.lower])
    return buffer.getvalue()


def summary_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["configuration", *comparison.varying, "n", "seeds"]
    for metric in comparison.metrics:
        header += [f"{metric} mean", f"{metric} ci95", f"{metric} std"]
    writer.writerow(header)
    for config in comparison.configurations:
        row: list[Any] = [config.label, *[json.dumps(config.parameters.get(k)) if not isinstance(config.parameters.get(k), str)
                                         else config.parameters.get(k) for k in comparison.varying],
                          len(config.runs), "; ".join(_seed_text(r) for r in config.runs)]
        for metric in comparison.metrics:
            mean, half, std = comparison.stats(config, metric)
            row += [repr(mean), "" if half is None else repr(half), "" if std is None else repr(std)]
        writer.writerow(row)
    return buffer.getvalue()


def runs_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "configuration", "seeds", "epoch", *comparison.metrics, "metrics_file"])
    for config in comparison.configurations:
        for run in config.runs:
            writer.writerow([run.name, config.label, _seed_text(run), run.epoch,
                             *[repr(run.metrics[m]) for m in comparison.metrics], str(run.metrics_file)])
    return buffer.getvalue()


def _difference_text(value: Any, limit: int = 80) -> str:
    """A setting's value as listed under the table: strings and sections as they are, cut at ``limit``."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (dict, list)) or value is None:
        text = json.dumps(value)
    else:
        text = _short(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary_markdown(comparison: Comparison, source: str, plot_name: str | None) -> str:
    n_runs = sum(len(c.runs) for c in comparison.configurations)
    lines = [f"# Comparison of {source}", ""]
    lines.append(f"{n_runs} runs in {len(comparison.configurations)} configurations; the last `{comparison.stage}/` "
                 "evaluation of each run. Cells: mean ± half-width of the two-sided 95 % confidence interval over "
                 "the configuration's runs (seeds), Student t with n − 1 degrees of freedom; with n = 1 only the "
                 "mean is given (no interval can be computed from one run).")
    lines.append("")
    if comparison.common:
        lines.append("Common to all runs: " + ", ".join(f"`{k}={_short(v)}`" for k, v in comparison.common.items()) + ".")
    seed_keys = sorted({k for c in comparison.configurations for r in c.runs for k in r.seed_parameters})
    lines.append(f"Averaged over: {', '.join(f'`{k}`' for k in seed_keys) or 'nothing (no seed parameter)'}.")
    lines.append("")
    lines.append("| configuration | n | " + " | ".join(comparison.metrics) + " |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in comparison.metrics) + " |")
    for config in comparison.configurations:
        cells = [_fmt(*comparison.stats(config, m)[:2], len(comparison.values(config, m)), len(config.runs))
                 for m in comparison.metrics]
        lines.append(f"| {config.label} | {len(config.runs)} | " + " | ".join(cells) + " |")
    lines.append("")
    if comparison.control is not None:
        lines += [f"## Against the control: {comparison.control.label}", "",
                  "Paired by seed: each cell is the mean over the seeds both ran of (the run − the control's run "
                  "of the same seeds) ± the half-width of its two-sided 95 % Student-t interval over those pairs, "
                  "then how many pairs are above and below the control. **Bold**: the interval excludes 0, so "
                  "the difference is larger than the seeds' spread.", "",
                  "| configuration | pairs | " + " | ".join(comparison.metrics) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in comparison.metrics) + " |"]
        for config in comparison.configurations:
            if config is comparison.control:
                continue
            cells = [comparison.paired[(config.label, m)] for m in comparison.metrics]
            pairs = max((d.pairs for d in cells if d is not None), default=0)
            lines.append(f"| {config.label} | {pairs} | " + " | ".join(_fmt_paired(d, pairs) for d in cells) + " |")
        lines.append("")
        if comparison.unpaired:
            lines += [f"Without a partner of the same seeds, left out of the differences ({len(comparison.unpaired)}): "
                      + "; ".join(comparison.unpaired) + ".", ""]
    repeated = [(c, same) for c in comparison.configurations for same in c.repeated_seeds()]
    if repeated:
        lines += ["## Runs with the same seeds", "",
                  "These runs repeat one another's seeds: reruns, not independent replicates. The interval "
                  "above counts them as replicates, so it is narrower than independent seeds would give.", ""]
        lines += [f"- {c.label}: {', '.join(r.name for r in same)} ({_seed_text(same[0])})" for c, same in repeated]
        lines.append("")
    differing = [c for c in comparison.configurations if c.differences]
    if differing:
        lines += ["## Runs averaged together that differ in other settings", "",
                  "These runs share a configuration above but their `config.yaml` differs; their mean mixes "
                  "the settings below. If a setting matters, split the runs with `--group-by KEY`.", ""]
        for config in differing:
            listed = "; ".join(f"`{k}`: {', '.join(_difference_text(v) for v in values)}"
                               for k, values in config.differences.items())
            lines.append(f"- {config.label}: {listed}")
        lines.append("")
    if plot_name:
        lines += [f"![{plot_name}]({plot_name})", ""]
    lines += ["## Runs", "", "| run | configuration | seeds | epoch | " + " | ".join(comparison.metrics) + " |",
              "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in comparison.metrics) + " |"]
    for config in comparison.configurations:
        for run in config.runs:
            lines.append(f"| {run.name} | {config.label} | {_seed_text(run)} | {run.epoch} | "
                         + " | ".join(f"{run.metrics[m]:.3f}" for m in comparison.metrics) + " |")
    lines.append("")
    if comparison.excluded:
        lines += [f"Excluded ({len(comparison.excluded)}):", ""]
        lines += [f"- {name}: {why}" for name, why in comparison.excluded]
        lines.append("")
    return "\n".join(lines)


def _curve_on_grid(path: Path, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision at each FPR of ``grid``: the operating point with the largest FPR ≤ it."""
    data = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64)
    data = np.atleast_1d(data)
    fpr, recall, precision = data["fpr"], data["recall"], data["precision"]
    ok = np.isfinite(fpr)
    fpr, recall, precision = fpr[ok], recall[ok], precision[ok]
    idx = np.searchsorted(fpr, grid, side="right") - 1
    r = np.where(idx >= 0, recall[np.clip(idx, 0, None)], 0.0) if fpr.size else np.zeros_like(grid)
    p = np.where(idx >= 0, precision[np.clip(idx, 0, None)], np.nan) if fpr.size else np.full_like(grid, np.nan)
    return r, p


def _style(i: int, n: int) -> tuple[object, str]:
    """Colour and line style of configuration ``i`` of ``n``: distinct for up to 20 configurations
    (tab10, then tab20), and the line style changes for each further 20."""
    from matplotlib import colormaps

    colours = [f"C{k}" for k in range(10)] if n <= 10 else [tuple(colormaps["tab20"](k)) for k in range(20)]
    return colours[i % len(colours)], ("-", "--", ":", "-.")[(i // len(colours)) % 4]


def plot_comparison(comparison: Comparison, metric: str, target: Path):
    """The metric per configuration (mean, 95 % CI, each run) and, where every run logged its
    curve, recall and precision against FPR. One colour per configuration in every panel, and a
    legend of its own below the curves, so that long configuration names cover no data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    configs = comparison.configurations
    n = len(configs)
    have_curves = all(r.curve_file is not None for c in configs for r in c.runs)
    label_width = max((len(c.label) for c in configs), default=10)
    # the metric panel grows with its labels; the legend under the curves with the configurations
    panels_height, legend_height = max(3.2, 0.42 * n + 1.8), (0.16 * n + 0.6 if have_curves else 0.0)
    width = 3.5 + 0.065 * label_width + (10.0 if have_curves else 0.0)
    fig = Figure(figsize=(width, panels_height + legend_height), layout="constrained")
    FigureCanvasAgg(fig)
    if have_curves:
        grid = fig.add_gridspec(2, 3, height_ratios=[panels_height, legend_height])
        axes = [fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[0, 2])]
        legend_ax = fig.add_subplot(grid[1, 1:])
        legend_ax.axis("off")
    else:
        axes = [fig.add_subplot(1, 1, 1)]
    ax = axes[0]
    y = np.arange(n)[::-1]
    for yi, (i, config) in zip(y, enumerate(configs)):
        values = comparison.values(config, metric)
        if not values:
            continue  # undefined in every run of this configuration
        mean, half, _ = mean_ci(values)
        color, _ = _style(i, n)
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.plot(values, yi + jitter, "o", color=color, alpha=0.35, ms=4)
        ax.errorbar([mean], [yi], xerr=None if half is None else [[half], [half]], fmt="D", color=color, capsize=4, ms=6)
    ax.set_yticks(y, [c.label for c in configs], fontsize=8)
    ax.set_xlabel(f"{comparison.stage}/{metric}")
    ax.set_title("mean, 95 % CI (Student t), each run", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    if have_curves:
        n_d = min(r.metrics.get("n_distractors", np.nan) for c in configs for r in c.runs)
        lo = 1.0 / n_d if np.isfinite(n_d) and n_d > 0 else 1e-4
        fpr_grid = np.logspace(np.log10(lo), 0, 200)
        lines = []
        for i, config in enumerate(configs):
            curves = [_curve_on_grid(r.curve_file, fpr_grid) for r in config.runs]
            recall = np.mean([c[0] for c in curves], axis=0)
            with np.errstate(invalid="ignore"):
                precision = np.nanmean(np.array([c[1] for c in curves]), axis=0) if curves else None
            color, style = _style(i, n)
            lines += axes[1].step(fpr_grid, recall, where="post", color=color, linestyle=style, label=config.label)
            axes[2].step(fpr_grid, precision, where="post", color=color, linestyle=style)
        for a, name in ((axes[1], "recall"), (axes[2], "precision")):
            a.set_xscale("log")
            a.set_xlim(lo, 1.0)
            a.set_ylim(-0.02, 1.02)
            a.set_xlabel("false-positive rate on distractors")
            a.set_ylabel(name)
            a.set_title(f"{name} vs FPR, mean of each configuration's runs", fontsize=10)
            a.grid(True, which="both", alpha=0.3)
        legend_ax.legend(handles=lines, loc="upper left", fontsize=7, ncols=1 if label_width > 60 else 2,
                         frameon=False, borderaxespad=0.0)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=110)
    return fig


def compare(run_dirs: Sequence[str | Path] = (), sweep: str | Path | None = None, out: str | Path | None = None,
            metrics: Sequence[str] | None = None, stage: str = "val", plot_metric: str | None = None,
            plot: bool = True, control: str | None = None, group_by: Sequence[str] = ()) -> Comparison:
    """Read, group, summarise and write; returns the comparison (see the module docstring)."""
    excluded: list[tuple[str, str]] = []
    dirs = [Path(d) for d in run_dirs]
    if sweep is not None:
        sweep = Path(sweep)
        if not sweep.is_dir():
            raise CompareError(f"{sweep}: no such sweep folder")
        present, missing = sweep_run_dirs(sweep)
        dirs += present
        excluded += [(name, "not run yet (no folder)") for name in missing]
    if not dirs:
        raise CompareError("nothing to compare: give run folders or --sweep DIR")
    if out is None:
        if sweep is None:
            raise CompareError("give --out DIR when comparing run folders (with --sweep the summary goes into the sweep)")
        out = sweep
    out = Path(out)
    if out.exists() and not out.is_dir():  # before any reading: the summary could not be written
        raise CompareError(f"--out {out}: exists and is not a folder")

    runs: list[RunRecord] = []
    for d in dirs:
        if d.name == PREVIOUS_ATTEMPTS:
            continue
        record = read_run_json(d) if d.is_dir() else None
        if record is not None and record.get("status") != "ok":
            excluded.append((d.name, f"status {record.get('status')!r}, exit code {record.get('exit_code')}"))
            continue
        runs.append(load_run(d, stage))
    seen: dict[Path, RunRecord] = {}
    for run in runs:  # one folder given twice, or a run and its own version folder: n would count it twice
        first = seen.setdefault(run.metrics_file.resolve(), run)
        if first is not run:
            raise CompareError(f"{first.path} and {run.path} are the same run (both read {run.metrics_file}); "
                               "give each run once")
    if excluded:
        log.warning("compare: %d run(s) left out (not finished ok): %s", len(excluded), ", ".join(n for n, _ in excluded))
    if not runs:
        raise CompareError(f"no finished run to compare ({len(excluded)} left out: "
                           + "; ".join(f"{n}: {w}" for n, w in excluded) + ")")
    chosen = choose_metrics(runs, metrics)
    add_group_keys(runs, group_by)
    configurations, varying, common = group_runs(runs)
    comparison = Comparison(configurations, chosen, varying, common, excluded, stage)
    for config in configurations:
        if config.differences:
            log.warning("compare: the runs of %r differ in %s; their mean mixes these settings (--group-by KEY splits them)",
                        config.label, ", ".join(config.differences))
        for same in config.repeated_seeds():
            log.warning("compare: runs %s of %r have the same seeds (%s): reruns, counted as replicates",
                        ", ".join(r.name for r in same), config.label, _seed_text(same[0]))
    control_config = find_control(configurations, control) if control is not None else None

    out.mkdir(parents=True, exist_ok=True)
    plot_name = None
    if plot:
        plot_metric = plot_metric or chosen[0]
        if plot_metric not in chosen:
            choose_metrics(runs, [plot_metric])  # a clear error if a run lacks it
            comparison.metrics = chosen + [plot_metric]
        plot_name = "summary.png"
        plot_comparison(comparison, plot_metric, out / plot_name)
    if control_config is not None:  # after the plot metric joined the metrics: every metric gets its pairs
        pair_with_control(comparison, control_config)
    source = str(sweep) if sweep is not None else f"{len(dirs)} run folders"
    write_text_atomic(out / "summary.csv", summary_csv(comparison))
    write_text_atomic(out / "runs.csv", runs_csv(comparison))
    if comparison.control is not None:
        write_text_atomic(out / "paired.csv", paired_csv(comparison))
    write_text_atomic(out / "summary.md", summary_markdown(comparison, source, plot_name))
    return comparison
