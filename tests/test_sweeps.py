"""Sweep files, the local runner (end to end, resume, parallel threads) and `landmarks compare`."""

from __future__ import annotations

import csv
import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli.lightning_cli import expand_config_arguments
from sweeps.compare import (
    CompareError,
    PairedDifference,
    _fmt_paired,
    compare,
    mean_ci,
    paired_difference,
    plot_comparison,
)
from sweeps.runner import SweepRunner, available_cores
from sweeps.spec import SweepError, load_sweep, parse_sweep

ROOT = Path(__file__).resolve().parents[1]
# Two-sided 95 % Student-t quantiles t(0.975, df), from a t table.
T975 = {1: 12.706204736174698, 2: 4.302652729749464}


# ---- sweep files --------------------------------------------------------------------------------


def test_grid_is_the_product_in_file_order_and_count_caps_it():
    spec = parse_sweep({"method": "grid", "command": ["prog", "${args}"], "parameters": {
        "a": {"values": [1, 2]}, "b": {"value": "x"}, "c": {"values": [True, False]}}})
    runs = spec.expand()
    assert [r.parameters for r in runs] == [
        {"a": 1, "b": "x", "c": True}, {"a": 1, "b": "x", "c": False},
        {"a": 2, "b": "x", "c": True}, {"a": 2, "b": "x", "c": False}]
    assert len({r.name for r in runs}) == 4 and runs[0].name.startswith("a=1-c=True-")
    assert [r.parameters for r in spec.expand(count=3)] == [r.parameters for r in runs[:3]]


def test_random_search_is_deterministic_for_a_seed_and_respects_the_distributions():
    raw = {"method": "random", "count": 50, "command": ["prog", "${args}"], "parameters": {
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "epochs": {"min": 2, "max": 5},  # inferred int_uniform
        "drop": {"min": 0.0, "max": 0.5},  # inferred uniform
        "width": {"distribution": "q_uniform", "min": 0, "max": 100, "q": 10},
        "loss": {"values": ["a", "b"], "probabilities": [0.9, 0.1]},
        "seed_everything": {"value": 7}}}
    spec = parse_sweep(raw)
    first, again, other = spec.expand(sample_seed=0), spec.expand(sample_seed=0), spec.expand(sample_seed=1)
    assert [r.parameters for r in first] == [r.parameters for r in again]
    assert [r.name for r in first] == [r.name for r in again]
    assert [r.parameters for r in first] != [r.parameters for r in other]
    for run in first:
        p = run.parameters
        assert 1e-4 <= p["lr"] <= 1e-1 and isinstance(p["epochs"], int) and 2 <= p["epochs"] <= 5
        assert 0.0 <= p["drop"] <= 0.5 and p["width"] % 10 == 0 and isinstance(p["width"], int)
        assert p["seed_everything"] == 7
    assert 35 <= sum(r.parameters["loss"] == "a" for r in first) <= 50  # 0.9 of 50 draws
    assert len(spec.expand(count=5)) == 5
    with pytest.raises(SweepError, match="method random needs a run count"):
        parse_sweep({k: v for k, v in raw.items() if k != "count"}).expand()


@pytest.mark.parametrize("raw, message", [
    ({"method": "bayes", "parameters": {"a": {"values": [1]}}}, r"method must be grid or random, got 'bayes' \(bayes needs the wandb server"),
    ({"method": "grid", "parameters": {"lr": {"min": 0.1, "max": 1.0}}}, r"grid search needs 'values' or 'value'.*parameters.lr \(uniform\)"),
    ({"method": "grid", "parameters": {"a": {"vaules": [1, 2]}}}, r"parameters.a: needs 'value', 'values', 'min'\+'max'"),
    ({"method": "grid", "parameters": {"a": {"values": [1], "step": 2}}}, r"parameters.a: unknown or unused key\(s\) step"),
    ({"method": "grid", "parameters": {"a": {"values": []}}}, r"parameters.a: 'values' must be a non-empty list"),
    ({"method": "grid", "parameters": {"a": {"distribution": "beta", "min": 0, "max": 1}}}, r"parameters.a: distribution 'beta' is not supported"),
    ({"method": "random", "parameters": {"a": {"values": [1, 2], "probabilities": [0.5, 0.6]}}}, r"parameters.a: 'probabilities' must be 2 non-negative numbers summing to 1"),
    ({"method": "grid", "parameters": {"a": {"parameters": {"b": {"value": 1}}}}}, r"parameters.a: nested parameters are not supported"),
    ({"method": "grid", "paramters": {"a": {"value": 1}}}, r"unknown top-level key\(s\) paramters"),
    ({"method": "grid", "parameters": {"a": {"value": 1}}}, r"command uses \$\{program\} \(the wandb default command does\) but 'program' is missing"),
    ({"method": "grid", "command": ["x", "${argz}"], "parameters": {"a": {"value": 1}}}, r"command: unknown macro \$\{argz\}"),
    ({"method": "grid", "command": ["x"], "count": 2, "run_cap": 3, "parameters": {"a": {"value": 1}}}, r"count \(2\) and run_cap \(3\) disagree"),
    ({"method": "grid", "command": ["x"], "parameters": {"a b": {"value": 1}}}, r"parameter name 'a b' must be an option name"),
    (["method", "grid"], r"a sweep file is a YAML mapping"),
    ({"method": "grid", "command": ["x"], "parameters": {"a": {"values": [1, 2, 1]}}},
     r"parameters.a: the value 1 is listed twice; a grid runs each value once"),
    ({"method": "grid", "command": ["x"], "parameters": {"a": {"values": [[1.25], [1.25]]}}},
     r"parameters.a: the value \[1.25\] is listed twice"),
])
def test_bad_sweep_files_get_clear_errors(raw, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(path)
    assert str(info.value).startswith(str(path))


def test_unreadable_sweep_file_is_named(tmp_path):
    (tmp_path / "broken.yaml").write_text("method: grid\nparameters: [\n")
    with pytest.raises(SweepError, match=r"broken.yaml: not valid YAML"):
        load_sweep(tmp_path / "broken.yaml")
    with pytest.raises(SweepError, match=r"missing.yaml: cannot read the sweep file"):
        load_sweep(tmp_path / "missing.yaml")


def test_command_macros_match_the_wandb_agent():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"config.loss": ["experiments/a.yaml", "experiments/b.yaml"], "seed_everything": 3,
              "model.lr": 0.001, "flag": False, "other": True, "none": None}
    spec = parse_sweep({"method": "grid", "program": "train.py", "command": [
        "${env}", "${interpreter}", "${program}", "--x=${y}", "${args}", "${args_no_hyphens}",
        "${args_no_boolean_flags}", "${args_json}", "${args_no_equals}"],
        "parameters": {k: {"value": v} for k, v in params.items()}})
    run = spec.expand()[0]
    agent = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    expected = (["/usr/bin/env", sys.executable, "train.py", "--x=${y}"] + agent["args"] + agent["args_no_hyphens"]
                + agent["args_no_boolean_flags"] + agent["args_json"] + agent["args_no_equals"])
    assert spec.command_for(run) == expected
    assert "--config.loss=['experiments/a.yaml', 'experiments/b.yaml']" in expected


def test_config_slots_become_config_files_before_the_overrides():
    args = ["fit", "--config=base.yaml", "--trainer.max_epochs=2", "--config.zz_loss=loss.yaml",
            "--config.curriculum=['cur.yaml', 'extra.yaml']", "--config.none=None", "--seed_everything=1"]
    assert expand_config_arguments(args) == [
        "fit", "--config=base.yaml", "--config=cur.yaml", "--config=extra.yaml", "--config=loss.yaml",
        "--trainer.max_epochs=2", "--seed_everything=1"]
    # A list-valued plain `config` is expanded in place; slots follow all leading config files.
    assert expand_config_arguments(["fit", "-c", "a.yaml", "--config.x", "b.yaml", "--config=[c.yaml, d.yaml]"]) == [
        "fit", "-c", "a.yaml", "--config=c.yaml", "--config=d.yaml", "--config=b.yaml"]
    assert expand_config_arguments(["fit", "--config", "a.yaml"]) == ["fit", "--config", "a.yaml"]
    with pytest.raises(ValueError, match=r"--config.x is given twice"):
        expand_config_arguments(["--config.x=a.yaml", "--config.x=b.yaml"])
    with pytest.raises(ValueError, match=r"--config.x: expected a list of config file paths"):
        expand_config_arguments(["--config.x=[1, 2]"])


# ---- the runner, with a stand-in program ---------------------------------------------------------

# A real program, tiny and fast: writes a Lightning-format metrics.csv (two evaluations; the last
# counts) and a curve, from its arguments; fails on purpose while FAIL_RUN matches its arguments.
FAKE_PROGRAM = textwrap.dedent('''
    import csv, json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    run_dir = os.environ["LANDMARKS_RUN_DIR"]
    with open(os.path.join(os.environ["INVOCATIONS"], "calls.log"), "a") as f:
        f.write(os.path.basename(run_dir) + "\\n")
    with open(os.path.join(run_dir, "env.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LANDMARKS_SWEEP")}, f)
    print("fake run", args)
    if os.environ.get("FAIL_RUN") and os.environ["FAIL_RUN"] in " ".join(sys.argv):
        sys.exit(3)
    loss = {"a.yaml": 0.50, "b.yaml": 0.30}[os.path.basename(args["config.loss"])]
    recall = loss + 0.02 * int(args["seed_everything"])
    log_dir = os.path.join(run_dir, "csv", "version_0")
    os.makedirs(os.path.join(log_dir, "plots"))
    with open(os.path.join(log_dir, "metrics.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/recall@fpr=1e-03", "val/p@1", "val/n_distractors"])
        w.writerow([0, 9, 1.5, "", "", ""])
        w.writerow([0, 9, "", 0.01, 0.1, 1000])
        w.writerow([1, 19, "", recall, 0.9, 1000])
    with open(os.path.join(log_dir, "plots", "val_epoch001_precision_fpr.csv"), "w") as f:
        f.write("threshold,fpr,precision,recall\\n0.9,0.0,1.0,0.1\\n0.5,0.001,0.9,%r\\n0.1,1.0,0.4,0.9\\n" % recall)
''')


def _fake_sweep(tmp_path: Path) -> Path:
    (tmp_path / "fake.py").write_text(FAKE_PROGRAM)
    sweep = {"name": "fake", "method": "grid", "program": str(tmp_path / "fake.py"),
             "command": ["${interpreter}", "${program}", "${args}"],
             "parameters": {"config.loss": {"values": ["cfg/a.yaml", "cfg/b.yaml"]},
                            "seed_everything": {"values": [0, 1]}}}
    path = tmp_path / "fake_sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().split() if log.exists() else []


def _summary_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["configuration"]: row for row in csv.DictReader(f)}


def test_sweep_runs_end_to_end_resumes_and_reruns_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("INVOCATIONS", str(tmp_path))
    monkeypatch.setenv("FAIL_RUN", "b.yaml --seed_everything=1")
    spec = load_sweep(_fake_sweep(tmp_path))
    out = tmp_path / "sweep"
    outcomes = SweepRunner(spec, out, progress=False).run()
    assert [o.status for o in outcomes] == ["ok", "ok", "ok", "failed"]
    failed = out / outcomes[3].run.name
    record = json.loads((failed / "run.json").read_text())
    assert record["status"] == "failed" and record["exit_code"] == 3 and record["parameters"] == {
        "config.loss": "cfg/b.yaml", "seed_everything": 1}
    assert "fake run" in (failed / "output.log").read_text()
    ok = json.loads((out / outcomes[0].run.name / "run.json").read_text())
    assert ok["status"] == "ok" and ok["exit_code"] == 0 and ok["duration_s"] >= 0
    assert ok["command"][0] == sys.executable and ok["command"][2:] == ["--config.loss=cfg/a.yaml", "--seed_everything=0"]
    assert json.loads((out / "sweep.json").read_text())["runs"][3]["name"] == outcomes[3].run.name
    assert len(_calls(tmp_path)) == 4

    # Rerun: the three good runs are skipped, the failed one is set aside and runs again.
    monkeypatch.delenv("FAIL_RUN")
    before = {o.run.name: (out / o.run.name / "run.json").read_text() for o in outcomes[:3]}
    again = SweepRunner(spec, out, progress=False).run()
    assert [o.status for o in again] == ["skipped", "skipped", "skipped", "ok"]
    assert _calls(tmp_path)[4:] == [outcomes[3].run.name]
    assert {n: (out / n / "run.json").read_text() for n in before} == before
    kept = out / ".previous-attempts" / f"{outcomes[3].run.name}.1"
    assert json.loads((kept / "run.json").read_text())["status"] == "failed"

    # A deleted run folder (and an interrupted one) run again; nothing else does.
    import shutil

    shutil.rmtree(out / outcomes[1].run.name)
    interrupted = out / outcomes[2].run.name / "run.json"
    interrupted.write_text(interrupted.read_text().replace('"status": "ok"', '"status": "running"'))
    third = SweepRunner(spec, out, progress=False).run()
    assert [o.status for o in third] == ["skipped", "ok", "ok", "skipped"]
    assert sorted(_calls(tmp_path)[5:]) == sorted([outcomes[1].run.name, outcomes[2].run.name])

    # compare: recall a = 0.50, 0.52; b = 0.30, 0.32 (the last evaluation counts, not the first).
    comparison = compare(sweep=out)
    rows = _summary_rows(out / "summary.csv")
    assert set(rows) == {"loss=a", "loss=b"}
    half = T975[1] * np.std([0.50, 0.52], ddof=1) / np.sqrt(2)  # = 12.706 · 0.01414 / 1.414 = 0.12706
    assert float(rows["loss=a"]["recall@fpr=1e-03 mean"]) == pytest.approx(0.51)
    assert float(rows["loss=a"]["recall@fpr=1e-03 ci95"]) == pytest.approx(half) == pytest.approx(0.127062, abs=1e-6)
    assert float(rows["loss=b"]["recall@fpr=1e-03 mean"]) == pytest.approx(0.31)
    assert float(rows["loss=a"]["p@1 mean"]) == pytest.approx(0.9) and rows["loss=a"]["p@1 ci95"] == "0.0"
    assert rows["loss=a"]["n"] == "2" and rows["loss=a"]["seeds"] == "seed_everything=0; seed_everything=1"
    assert comparison.metrics == ["recall@fpr=1e-03", "p@1"]
    assert (out / "summary.png").stat().st_size > 10_000
    assert "| loss=a | 2 | 0.510 ± 0.127 | 0.900 ± 0.000 |" in (out / "summary.md").read_text()


def test_parallel_runs_share_the_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("INVOCATIONS", str(tmp_path))
    spec = load_sweep(_fake_sweep(tmp_path))
    outcomes = SweepRunner(spec, tmp_path / "sweep", parallel=2, progress=False).run()
    assert [o.status for o in outcomes] == ["ok"] * 4
    threads = str(max(1, available_cores() // 2))
    for o in outcomes:
        env = json.loads((tmp_path / "sweep" / o.run.name / "env.json").read_text())
        assert env == {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "LANDMARKS_SWEEP": "fake"}


def test_sweep_command_line_dry_run_runs_nothing(tmp_path, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv("INVOCATIONS", str(tmp_path))
    path = _fake_sweep(tmp_path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "sweep"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and out.count("(to run)") == 4 and "--config.loss=cfg/b.yaml --seed_everything=1" in out
    assert not (tmp_path / "sweep").exists() and _calls(tmp_path) == []
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "nope.yaml: cannot read the sweep file" in capsys.readouterr().err


def _smoke_variant(tmp_path: Path, old: str, new: str) -> Path:
    """experiments/sweeps/smoke.yaml with one piece of text replaced (which must be there)."""
    text = (ROOT / "experiments" / "sweeps" / "smoke.yaml").read_text()
    assert old in text
    path = tmp_path / "variant.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_sweep_command_without_the_parameters_is_refused(tmp_path, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.chdir(ROOT)
    path = _smoke_variant(tmp_path, "  - ${args}\n", "")
    # Four runs of one identical command, labelled as four configurations: refused.
    assert main(["sweep", str(path), "--out", str(tmp_path / "d"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"landmarks sweep: error: {path}: command passes no parameters: "
                                                    "it uses none of ${args}, ${args_no_hyphens}")
    # parse_sweep refuses it too (also a command with only a constant parameter).
    with pytest.raises(SweepError, match=r"command passes no parameters"):
        parse_sweep({"method": "grid", "command": ["prog", "--x=1"], "parameters": {"a": {"value": 1}}})
    assert parse_sweep({"method": "grid", "command": ["prog", "${args_json_file}"], "parameters": {"a": {"value": 1}}})


@pytest.mark.parametrize("old, new, message", [
    ("experiments/contrastive.yaml", "experiments/nope.yaml",
     r"parameters.config.loss: config file 'experiments/nope.yaml' does not exist \(relative to "),
    ("experiments/contrastive.yaml", "[experiments/contrastive.yaml, experiments]",
     r"parameters.config.loss: config file 'experiments' is not a file"),
    ("--config=experiments/demo.yaml", "--config=experiments/demoo.yaml",
     r"command: --config=experiments/demoo.yaml: config file 'experiments/demoo.yaml' does not exist"),
    ("values: [0, 1]", "values: [0, null]",
     r"parameters.seed_everything: value None holds null, which would be passed as the text 'None'"),
    ("values: [0, 1]", "values: [0, [2, null]]", r"parameters.seed_everything: value \[2, None\] holds null"),
])
def test_sweep_dry_run_refuses_what_landmarks_could_not_run(old, new, message, tmp_path, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.chdir(ROOT)  # the sweep's paths are relative to where it starts
    path = _smoke_variant(tmp_path, old, new)
    assert main(["sweep", str(path), "--out", str(tmp_path / "d"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"landmarks sweep: error: {path}: ")
    assert re.search(message, err), err
    assert not (tmp_path / "d").exists()


def test_sweep_out_that_is_a_file_is_refused_and_null_config_slots_are_no_file(tmp_path, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.chdir(ROOT)
    (tmp_path / "file").write_text("x")
    for dry_run in (["--dry-run"], []):
        assert main(["sweep", "experiments/sweeps/smoke.yaml", "--out", str(tmp_path / "file"), *dry_run]) == 2
        assert capsys.readouterr().err == f"landmarks sweep: error: --out {tmp_path / 'file'}: exists and is not a folder\n"
    # A config slot's null (no file) and lists of existing files are what they should be.
    path = _smoke_variant(tmp_path, "[experiments/center.yaml, experiments/contrastive.yaml]",
                          "[experiments/center.yaml, null, [experiments/contrastive.yaml, experiments/curriculum.yaml]]")
    assert main(["sweep", str(path), "--out", str(tmp_path / "d"), "--dry-run"]) == 0
    assert "6 runs" in capsys.readouterr().out


# ---- compare, from hand-written CSV logs -------------------------------------------------------


def _hand_run(root: Path, name: str, params: dict, recall: float | None, status: str = "ok",
              extra_rows: list | None = None) -> Path:
    run = root / name
    log_dir = run / "csv" / "version_0"
    log_dir.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"name": name, "parameters": params, "status": status,
                                              "exit_code": 0 if status == "ok" else 1}))
    with open(log_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/recall@fpr=1e-03", "val/gap", "val/precision@fpr=1e-03,prior=0.01"])
        w.writerow([0, 10, 2.0, "", "", ""])
        w.writerow([0, 10, "", 0.05, 0.1, 0.2])  # an earlier evaluation: must not count
        for row in extra_rows or []:
            w.writerow(row)
        if recall is not None:
            w.writerow([2, 30, "", recall, recall / 2, 0.5])
    return run


def test_compare_hand_written_logs_mean_and_t_interval(tmp_path):
    a = {"config.loss": "experiments/arcface.yaml", "data.image_size": 64}
    b = {"config.loss": "experiments/center.yaml", "data.image_size": 64}
    runs = [_hand_run(tmp_path, "a0", {**a, "seed_everything": 0}, 0.30),
            _hand_run(tmp_path, "a1", {**a, "seed_everything": 1}, 0.40),
            _hand_run(tmp_path, "a2", {**a, "seed_everything": 2}, 0.50),
            _hand_run(tmp_path, "b0", {**b, "seed_everything": 0}, 0.20),
            _hand_run(tmp_path, "b1", {**b, "seed_everything": 1}, None, status="failed")]
    out = tmp_path / "summary"
    comparison = compare(runs, out=out)
    assert comparison.metrics == ["recall@fpr=1e-03", "precision@fpr=1e-03,prior=0.01", "gap"]
    rows = _summary_rows(out / "summary.csv")
    # a: mean 0.4, s = 0.1, half-width t(0.975, 2) · 0.1 / √3 = 4.3027 · 0.057735 = 0.248414
    assert float(rows["loss=arcface"]["recall@fpr=1e-03 mean"]) == pytest.approx(0.4)
    assert float(rows["loss=arcface"]["recall@fpr=1e-03 std"]) == pytest.approx(0.1)
    assert float(rows["loss=arcface"]["recall@fpr=1e-03 ci95"]) == pytest.approx(T975[2] * 0.1 / np.sqrt(3))
    assert float(rows["loss=arcface"]["recall@fpr=1e-03 ci95"]) == pytest.approx(0.248414, abs=1e-6)
    assert float(rows["loss=arcface"]["gap mean"]) == pytest.approx(0.2)
    # b: one finished run → the mean and no interval.
    assert rows["loss=center"]["n"] == "1" and float(rows["loss=center"]["recall@fpr=1e-03 mean"]) == pytest.approx(0.2)
    assert rows["loss=center"]["recall@fpr=1e-03 ci95"] == "" and rows["loss=center"]["recall@fpr=1e-03 std"] == ""
    md = (out / "summary.md").read_text()
    assert "| loss=arcface | 3 | 0.400 ± 0.248 | 0.500 ± 0.000 | 0.200 ± 0.124 |" in md
    assert "| loss=center | 1 | 0.200 (n=1, no CI) |" in md
    assert "Common to all runs: `data.image_size=64`" in md
    assert "- b1: status 'failed', exit code 1" in md
    with open(out / "runs.csv", newline="") as f:
        per_run = list(csv.DictReader(f))
    assert [r["run"] for r in per_run] == ["a0", "a1", "a2", "b0"] and per_run[0]["epoch"] == "2"
    assert (out / "summary.png").is_file()  # no curve files: the metric panel only


def test_precision_undefined_in_a_run_that_accepted_nothing_is_left_out_of_its_mean(tmp_path, caplog):
    import logging

    def run(name, seed, precision):
        folder = tmp_path / name
        log_dir = folder / "csv" / "version_0"
        log_dir.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"name": name, "parameters": {"seed_everything": seed},
                                                     "status": "ok", "exit_code": 0}))
        # Nothing accepted at FPR 1e-3: recall 0 is logged, precision (0 / 0) is not.
        header = ["epoch", "step", "val/recall@fpr=1e-03"] + (["val/precision@fpr=1e-03"] if precision is not None else [])
        values = [4, 50, 0.0 if precision is None else 0.3] + ([precision] if precision is not None else [])
        (log_dir / "metrics.csv").write_text(",".join(header) + "\n" + ",".join(map(str, values)) + "\n")
        return folder

    runs = [run("s0", 0, 0.9), run("s1", 1, None), run("s2", 2, 0.7)]
    # s1 did accept photos in an earlier evaluation: its old precision must not stand in for the last one.
    text = (runs[1] / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    (runs[1] / "csv" / "version_0" / "metrics.csv").write_text(
        "epoch,step,val/recall@fpr=1e-03,val/precision@fpr=1e-03\n2,30,0.2,0.6\n" + text[1] + ",\n")
    with caplog.at_level(logging.WARNING):
        comparison = compare(runs, out=tmp_path / "out")
    assert "precision@fpr=1e-03 is undefined (nothing accepted at that FPR) in 1 run(s), e.g. s1" in caplog.text
    assert comparison.metrics == ["recall@fpr=1e-03", "precision@fpr=1e-03"]
    rows = _summary_rows(tmp_path / "out" / "summary.csv")
    # mean of 0.9 and 0.7, over the 2 runs where precision is defined; recall over all 3
    assert float(rows["all runs"]["precision@fpr=1e-03 mean"]) == pytest.approx(0.8)
    assert float(rows["all runs"]["recall@fpr=1e-03 mean"]) == pytest.approx(0.2)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "0.800 ± " in md and "(2 of 3 runs; undefined in the others)" in md
    # A precision missing where the recall at that FPR is missing too is still an error.
    other = run("s3", 3, 0.5)
    (other / "csv" / "version_0" / "metrics.csv").write_text("epoch,step,val/gap\n4,50,0.5\n")
    with pytest.raises(CompareError, match="did not evaluate alike"):
        compare(runs + [other], out=tmp_path / "out2")


def test_mean_ci_matches_hand_values():
    assert mean_ci([0.3, 0.4, 0.5]) == (pytest.approx(0.4), pytest.approx(0.2484138), pytest.approx(0.1))
    assert mean_ci([0.7]) == (0.7, None, None)


def test_compare_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({"parameters": {}, "status": "ok"}))
    with pytest.raises(CompareError, match=r"empty: no metrics.csv below this folder"):
        compare([empty], out=tmp_path / "o")
    run = _hand_run(tmp_path, "r0", {"seed_everything": 0}, 0.3)
    with pytest.raises(CompareError, match=r"metric 'p@1' is missing in 1 run\(s\), e.g. .*r0/csv/version_0/metrics.csv"):
        compare([run], out=tmp_path / "o", metrics=["p@1"])
    bad = _hand_run(tmp_path, "r1", {"seed_everything": 1}, 0.3, extra_rows=[[1, 20, "", "oops", "", ""]])
    with pytest.raises(CompareError, match=r"r1/csv/version_0/metrics.csv: line 4, column val/recall@fpr=1e-03: 'oops'"):
        compare([bad], out=tmp_path / "o")
    with pytest.raises(CompareError, match=r"give --out DIR"):
        compare([run])
    only_failed = tmp_path / "sweep"
    _hand_run(only_failed, "f", {"seed_everything": 0}, None, status="failed")
    with pytest.raises(CompareError, match=r"no finished run to compare \(1 left out: f: status 'failed'"):
        compare(sweep=only_failed)


def _compare_error(args: list[str], capsys) -> str:
    from cli.main import main

    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("landmarks compare: error: "), err
    return err[len("landmarks compare: error: "):].rstrip("\n")


def test_compare_refuses_an_infinite_value_naming_file_line_and_column(tmp_path, capsys):
    good = _hand_run(tmp_path, "r0", {"seed_everything": 0}, 0.3)
    bad = _hand_run(tmp_path, "r1", {"seed_everything": 1}, float("inf"))
    assert _compare_error([str(good), str(bad), "--out", str(tmp_path / "o")], capsys) == (
        f"{bad}/csv/version_0/metrics.csv: line 4, column val/recall@fpr=1e-03: inf is not a finite number")
    assert not (tmp_path / "o").exists()
    # An infinite value in an earlier evaluation is not the run's result: not an error.
    early = _hand_run(tmp_path, "r2", {"seed_everything": 2}, 0.4, extra_rows=[[1, 20, "", "-inf", "", ""]])
    compare([good, early], out=tmp_path / "o")


def test_compare_refuses_a_metrics_file_cut_short(tmp_path, capsys):
    good = _hand_run(tmp_path, "r0", {"seed_everything": 0}, 0.3)
    for name, cut in (("nonewline", "1,19,,0.9,0.45,0."), ("short", "1,19,,0.9\n")):
        run = _hand_run(tmp_path, name, {"seed_everything": 1}, 0.3)
        metrics = run / "csv" / "version_0" / "metrics.csv"
        metrics.write_text(metrics.read_text() + cut)  # a run killed while Lightning wrote this line
        assert _compare_error([str(good), str(run), "--out", str(tmp_path / "o")], capsys) == (
            f"{metrics}: the last line is incomplete (no newline at its end, or fewer fields than the header): "
            "the run may still be running, or was killed while writing it")
    extra = _hand_run(tmp_path, "extra", {"seed_everything": 1}, 0.3, extra_rows=[[1, 20, "", 0.2, 0.1, 0.3, "EXTRA"]])
    assert _compare_error([str(good), str(extra), "--out", str(tmp_path / "o")], capsys) == (
        f"{extra}/csv/version_0/metrics.csv: line 4 has 7 fields, the header 6 (an unquoted comma, or lines of two "
        "files mixed?)")


def test_compare_names_a_metrics_file_that_is_not_text(tmp_path, capsys):
    run = _hand_run(tmp_path, "bin0", {"seed_everything": 0}, 0.3)
    metrics = run / "csv" / "version_0" / "metrics.csv"
    metrics.write_bytes(b"epoch,step\n\xff\xfe\x00garbage\x9c\n")
    assert _compare_error([str(run), "--out", str(tmp_path / "o")], capsys) == (
        f"{metrics}: not a UTF-8 text file (byte 0xff at offset 11); is it a Lightning metrics.csv?")


def test_compare_out_that_is_a_file_is_refused_before_reading(tmp_path, capsys):
    (tmp_path / "outfile").write_text("x")
    unreadable = tmp_path / "no_such_run"  # not read: --out is checked first
    assert _compare_error([str(unreadable), "--out", str(tmp_path / "outfile")], capsys) == (
        f"--out {tmp_path / 'outfile'}: exists and is not a folder")


def test_paired_differences_against_a_control_match_hand_values(tmp_path, caplog):
    import logging

    center = {"config.loss": "experiments/center.yaml"}
    arc = {"config.loss": "experiments/arcface.yaml"}
    con = {"config.loss": "experiments/contrastive.yaml"}
    recall = {"center": [0.70, 0.80, 0.74], "arcface": [0.79, 0.79, 0.75], "contrastive": [0.80, 0.91, 0.85]}
    runs = [_hand_run(tmp_path, f"{name}{seed}", {**params, "seed_everything": seed}, recall[name][seed])
            for name, params in (("center", center), ("arcface", arc), ("contrastive", con)) for seed in range(3)]
    runs.append(_hand_run(tmp_path, "arcface3", {**arc, "seed_everything": 3}, 0.99))  # no control run of seed 3
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        comparison = compare(runs, out=out, control="loss=center")
    assert "1 run(s) have no partner of the same seeds" in caplog.text and "arcface3" in caplog.text
    # arcface − center per seed: +0.09, −0.01, +0.01 → mean 0.03, s = √(0.0056 / 2) = 0.0529150,
    # half-width t(0.975, 2) · s / √3 = 4.302653 · 0.0529150 / 1.7320508 = 0.131448; seed 3 unpaired.
    d = comparison.paired[("loss=arcface", "recall@fpr=1e-03")]
    assert (d.pairs, d.higher, d.lower) == (3, 2, 1)
    assert d.mean == pytest.approx(0.03) and d.half_width == pytest.approx(0.131448, abs=1e-6)
    # contrastive − center: +0.10, +0.11, +0.11 → mean 0.106667, s = 0.0057735, half-width 0.014342
    d = comparison.paired[("loss=contrastive", "recall@fpr=1e-03")]
    assert d.mean == pytest.approx(0.106667, abs=1e-6) and d.half_width == pytest.approx(0.014342, abs=1e-6)
    with open(out / "paired.csv", newline="") as f:
        rows = {(r["configuration"], r["metric"]): r for r in csv.DictReader(f)}
    row = rows[("loss=arcface", "recall@fpr=1e-03")]
    assert row["control"] == "loss=center" and row["pairs"] == "3" and (row["higher"], row["lower"]) == ("2", "1")
    assert float(row["mean_difference"]) == pytest.approx(0.03) and float(row["ci95"]) == pytest.approx(0.131448, abs=1e-6)
    md = (out / "summary.md").read_text()
    assert "## Against the control: loss=center" in md
    # the interval holds 0 for arcface (not bold); it excludes 0 for contrastive (bold)
    assert "| loss=arcface | 3 | +0.030 ± 0.131 (2 higher, 1 lower) |" in md
    assert "| loss=contrastive | 3 | **+0.107 ± 0.014** (3 higher, 0 lower) |" in md
    assert "arcface3 (loss=arcface; seed_everything=3)" in md
    # A unique part of a label names the control too; the control itself gets no row.
    again = compare(runs, out=tmp_path / "again", control="center", metrics=["recall@fpr=1e-03"])
    assert again.control.label == "loss=center" and ("loss=center", "recall@fpr=1e-03") not in again.paired


def test_control_errors_name_the_labels_and_the_runs(tmp_path):
    runs = [_hand_run(tmp_path, f"{loss}{seed}", {"config.loss": f"experiments/{loss}.yaml", "seed_everything": seed}, 0.5)
            for loss in ("center", "center_plain") for seed in (0, 1)]
    with pytest.raises(CompareError, match=r"--control 'arcface' names no configuration \(they are: 'loss=center'; 'loss=center_plain'\)"):
        compare(runs, out=tmp_path / "o", control="arcface")
    with pytest.raises(CompareError, match=r"--control 'cent' matches 2 configurations"):
        compare(runs, out=tmp_path / "o", control="cent")
    # the exact label wins over a longer label that contains it
    assert compare(runs, out=tmp_path / "o", control="loss=center").control.label == "loss=center"
    twice = _hand_run(tmp_path, "center0-again", {"config.loss": "experiments/center.yaml", "seed_everything": 0}, 0.6)
    with pytest.raises(CompareError, match=r"center0-again of 'loss=center' have the same seeds .*ambiguous"):
        compare(runs + [twice], out=tmp_path / "o", control="loss=center_plain")


def test_paired_differences_leave_out_undefined_pairs_and_cover_the_plotted_metric(tmp_path):
    def run(name, loss, seed, recall, precision):
        folder = tmp_path / name
        log_dir = folder / "csv" / "version_0"
        log_dir.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"name": name, "status": "ok", "exit_code": 0,
                                                     "parameters": {"loss": loss, "seed_everything": seed}}))
        header, values = ["epoch", "step", "val/recall@fpr=1e-03", "val/p@1"], [4, 50, recall, 0.9]
        if precision is not None:  # nothing accepted: precision undefined, not logged
            header, values = header + ["val/precision@fpr=1e-03"], values + [precision]
        (log_dir / "metrics.csv").write_text(",".join(header) + "\n" + ",".join(map(str, values)) + "\n")
        return folder

    runs = [run("a0", "a", 0, 0.5, 0.8), run("a1", "a", 1, 0.6, 0.9), run("a2", "a", 2, 0.7, 0.7),
            run("b0", "b", 0, 0.6, 0.9), run("b1", "b", 1, 0.7, None), run("b2", "b", 2, 0.8, 0.8)]
    # The plotted metric joins the metrics after they are chosen: it is paired too.
    comparison = compare(runs, out=tmp_path / "out", control="loss=a", metrics=["recall@fpr=1e-03"],
                         plot_metric="precision@fpr=1e-03")
    assert comparison.paired[("loss=b", "recall@fpr=1e-03")].pairs == 3
    d = comparison.paired[("loss=b", "precision@fpr=1e-03")]  # seed 1 undefined in b: 2 pairs, +0.1 each
    assert (d.pairs, d.higher, d.lower) == (2, 2, 0) and d.mean == pytest.approx(0.1)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| loss=b | 3 | **+0.100 ± 0.000** (3 higher, 0 lower) | **+0.100 ± 0.000** (2 pairs, 2 higher, 0 lower) |" in md
    with pytest.raises(CompareError, match=r"--control 'loss=a': these runs form one configuration"):
        compare(runs[:3], out=tmp_path / "o", control="loss=a")
    with pytest.raises(CompareError, match=r"--control 'all runs': these runs form one configuration \('all runs'\)"):
        compare(runs[:3], out=tmp_path / "o", control="all runs")  # its own label: still nothing to compare
    with pytest.raises(ValueError, match="one control value per value"):
        paired_difference([0.1, 0.2], [0.1])
    # A mean and a half-width that round alike get a fourth digit, so the bold can be checked by eye.
    assert _fmt_paired(PairedDifference(-0.07147, 0.070662, 3, 0, 3), 3) == "**-0.0715 ± 0.0707** (0 higher, 3 lower)"
    assert _fmt_paired(PairedDifference(0.0701, 0.0704, 3, 2, 1), 3) == "+0.0701 ± 0.0704 (2 higher, 1 lower)"


def test_runs_with_the_same_seeds_are_reported_as_reruns(tmp_path, caplog):
    import logging

    runs = [_hand_run(tmp_path, name, {"seed_everything": 0}, recall) for name, recall in (("r0", 0.7), ("r0-again", 0.7))]
    with caplog.at_level(logging.WARNING):
        compare(runs, out=tmp_path / "out")
    assert "runs r0, r0-again of 'all runs' have the same seeds (seed_everything=0)" in caplog.text
    assert "## Runs with the same seeds" in (tmp_path / "out" / "summary.md").read_text()


def test_one_run_given_twice_is_refused(tmp_path):
    run = _hand_run(tmp_path, "r0", {"seed_everything": 0}, 0.7)
    cli_run = _lightning_run(tmp_path, "l0", {"seed_everything": 0}, 0.7)
    # Before: "0.700 ± 0.000, n=2" from one run, given twice, or as itself and its own version folder.
    for twice in ([run, run], [cli_run, next(cli_run.rglob("metrics.csv")).parent]):
        with pytest.raises(CompareError, match=r"are the same run \(both read .*metrics.csv\); give each run once"):
            compare(twice, out=tmp_path / "out")


def _lightning_run(root: Path, name: str, config: dict, recall: float) -> Path:
    """A LightningCLI run folder (config.yaml beside metrics.csv, no run.json)."""
    run = _hand_run(root, name, {}, recall)
    (run / "run.json").unlink()
    return _with_config(run, config)


def test_lightning_run_folders_pair_only_when_every_seed_matches(tmp_path):
    def config(loss, seed, data_seed):
        return {"seed_everything": seed, "model": {"loss": {"class_path": f"losses.{loss}"}}, "data": {"seed": data_seed}}

    runs = [_lightning_run(tmp_path, "c0", config("CenterSoftmaxLoss", 0, 0), 0.5),
            _lightning_run(tmp_path, "c1", config("CenterSoftmaxLoss", 1, 1), 0.6),
            _lightning_run(tmp_path, "a0", config("ArcFaceLoss", 0, 0), 0.7),
            _lightning_run(tmp_path, "a1", config("ArcFaceLoss", 1, 7), 0.9)]  # another sampler seed: no partner
    comparison = compare(runs, out=tmp_path / "out", control="center")
    d = comparison.paired[("group=arcface_no-curriculum_raw-db", "recall@fpr=1e-03")]
    assert d.pairs == 1 and d.mean == pytest.approx(0.2)
    assert any(u.startswith("a1 (") for u in comparison.unpaired) and any(u.startswith("c1 (") for u in comparison.unpaired)
    # Runs whose data.seed alone differs are two replicates, not a rerun.
    assert not comparison.configurations[0].repeated_seeds()


def _with_config(run: Path, config: dict) -> Path:
    (run / "csv" / "version_0" / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_runs_grouped_together_that_differ_in_their_config_are_listed_and_group_by_splits_them(tmp_path, caplog):
    import logging

    def config(seed, data_dir, synthetic):
        return {"seed_everything": seed,
                "trainer": {"max_epochs": 8, "default_root_dir": f"runs/r{seed}{data_dir}",  # the run's own folder
                            "logger": [{"init_args": {"save_dir": f"runs/r{seed}{data_dir}"}}]},
                "data": {"data_dir": data_dir, "seed": seed, "synthetic": synthetic}}

    world = {"seed": 0, "nonlandmark_pool": 1500}
    runs = [_with_config(_hand_run(tmp_path, f"r{seed}{d}", {"seed_everything": seed}, 0.5 + 0.1 * seed + (0.05 if d == "big" else 0)),
                         config(seed, d, world if d == "small" else None))
            for d in ("small", "big") for seed in range(3)]
    with caplog.at_level(logging.WARNING):
        mixed = compare(runs, out=tmp_path / "mixed")
    # The seeds, the run folders and the loggers differ in every run: not reported. data.synthetic is
    # one difference, a section against null (its seed left out, as every seed is).
    assert mixed.configurations[0].differences == {"data.data_dir": ["small", "big"],
                                                   "data.synthetic": [{"nonlandmark_pool": 1500}, None]}
    assert "the runs of 'all runs' differ in data.data_dir, data.synthetic" in caplog.text
    md = (tmp_path / "mixed" / "summary.md").read_text()
    assert "## Runs averaged together that differ in other settings" in md and "`data.data_dir`: small, big" in md
    split = compare(runs, out=tmp_path / "split", group_by=["data.data_dir"], control="data_dir=small")
    assert [c.label for c in split.configurations] == ["data_dir=small", "data_dir=big"]
    assert [len(c.runs) for c in split.configurations] == [3, 3]
    # data.synthetic follows data.data_dir here, so within each group nothing differs any more
    assert all(not c.differences for c in split.configurations)
    d = split.paired[("data_dir=big", "recall@fpr=1e-03")]
    assert d.mean == pytest.approx(0.05) and d.half_width == pytest.approx(0.0) and (d.higher, d.lower) == (3, 0)
    assert "Runs averaged together" not in (tmp_path / "split" / "summary.md").read_text()
    # The section the listing names can be the key to group by: a mapping against null.
    by_section = compare(runs, out=tmp_path / "section", group_by=["data.synthetic"])
    assert [len(c.runs) for c in by_section.configurations] == [3, 3]
    assert [c.parameters["data.synthetic"] for c in by_section.configurations] == ['{"nonlandmark_pool": 1500}', None]
    with pytest.raises(CompareError, match=r"--group-by data.folder: no run's config.yaml has this key"):
        compare(runs, out=tmp_path / "o", group_by=["data.folder"])
    with pytest.raises(CompareError, match=r"--group-by data.seed: a seed"):
        compare(runs, out=tmp_path / "o", group_by=["data.seed"])
    bare = _hand_run(tmp_path, "bare", {"seed_everything": 5}, 0.5)
    with pytest.raises(CompareError, match=r"--group-by data.data_dir: .*bare/csv/version_0 has no config.yaml"):
        compare(runs + [bare], out=tmp_path / "o", group_by=["data.data_dir"])


# ---- one real run: `landmarks fit` through the runner ---------------------------------------------


@pytest.mark.slow
def test_smoke_sweep_file_runs_a_real_fit(tiny_world, tmp_path, monkeypatch):
    """experiments/sweeps/smoke.yaml, cut to one loss and two seeds on the tiny world: config slot, run folder, compare."""
    raw = yaml.safe_load((ROOT / "experiments" / "sweeps" / "smoke.yaml").read_text())
    raw["parameters"]["data.data_dir"] = {"value": str(tiny_world)}
    raw["parameters"]["config.loss"] = {"values": ["experiments/contrastive.yaml"]}
    raw["parameters"]["seed_everything"] = {"values": [3, 4]}
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "sweep"
    outcomes = SweepRunner(load_sweep(path), out, progress=False, cwd=ROOT).run()
    run_dir = out / outcomes[0].run.name
    assert outcomes[0].status == "ok", (run_dir / "output.log").read_text()[-3000:]
    config = yaml.safe_load(next(run_dir.rglob("config.yaml")).read_text())
    assert config["model"]["loss"]["class_path"] == "losses.ContrastiveLoss"  # from the config slot
    assert config["seed_everything"] == 3 and config["data"]["seed"] == 3  # ${..seed_everything}
    assert config["trainer"]["default_root_dir"] == str(run_dir.resolve())
    wandb_logger = config["trainer"]["logger"][1]["init_args"]
    assert wandb_logger["save_dir"] == str(run_dir.resolve())
    assert wandb_logger["group"] == "contrastive_no-curriculum_oracle-clean" and "sweep-smoke" in wandb_logger["tags"]
    assert (run_dir / "contrastive" / "version_0" / "metrics.csv").is_file()
    assert [o.status for o in outcomes] == ["ok", "ok"]
    comparison = compare(sweep=out)
    # Two seeds of one configuration: their config.yaml files differ only in the seeds and in the
    # run's own folders, which are not differences of the configuration.
    assert [len(c.runs) for c in comparison.configurations] == [2]
    assert comparison.configurations[0].differences == {}
    assert "differ in other settings" not in (out / "summary.md").read_text()
    record = comparison.configurations[0].runs[0]
    assert record.curve_file.name == "val_epoch000_precision_fpr.csv"
    with open(record.curve_file, newline="") as f:
        curve = list(csv.DictReader(f))
    # Accepting every query (the lowest threshold): recall = share of correct top-1 = P@1.
    assert float(curve[-1]["recall"]) == pytest.approx(record.metrics["p@1"], abs=1e-6)
    assert [float(r["fpr"]) for r in curve] == sorted(float(r["fpr"]) for r in curve)
    assert "| 2 | " in (out / "summary.md").read_text()


# What each curriculum file of a sweep's curriculum axis is (its wandb / `landmarks compare` group part).
SCHEDULES = {"curriculum": "curriculum", "curriculum_random_order": "curriculum-random-order",
             "curriculum_soft": "curriculum-soft",
             "no_curriculum": "one-stage", None: "no-curriculum"}


@pytest.mark.slow
@pytest.mark.parametrize("sweep, epochs", [("paper_ablation", 5), ("curriculum_order", 8)])
def test_loss_by_curriculum_sweeps_expand_to_valid_commands(sweep, epochs, monkeypatch, capsys):
    """Every configuration of the ablation resolves under LightningCLI to the loss and curriculum it names."""
    from callbacks.wandb_conventions import run_identity
    from cli.main import main

    spec = load_sweep(ROOT / "experiments" / "sweeps" / f"{sweep}.yaml")
    runs = spec.expand()
    losses, curricula = spec.parameters["config.loss"].values, spec.parameters["config.curriculum"].values
    seeds = spec.parameters["seed_everything"].values
    assert len(seeds) >= 3 and len(runs) == len(seeds) * len(losses) * len(curricula)
    assert len({r.name for r in runs}) == len(runs)
    # A loss value is its file, or its file followed by the recipe files it is run with.
    for path in [p for value in (*losses, *curricula) if value for p in ([value] if isinstance(value, str) else value)]:
        assert (ROOT / path).is_file(), path
    assert None in curricula  # the arm without any Curriculum callback (no imprinting either)
    monkeypatch.chdir(ROOT)
    groups = set()
    for run in runs[: len(losses) * len(curricula)]:  # seed 0: each configuration once
        command = spec.command_for(run)
        assert command[:4] == ["/usr/bin/env", "landmarks", "fit", "--config=experiments/demo.yaml"]
        with pytest.raises(SystemExit) as info:
            main(command[2:] + ["--print_config"])
        assert info.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["data"]["seed"] == config["seed_everything"] == 0
        identity = run_identity(config)
        loss_files = run.parameters["config.loss"]
        loss_file = loss_files if isinstance(loss_files, str) else loss_files[0]
        assert identity.loss == Path(loss_file).stem.replace("_", "-")
        curriculum_file = run.parameters["config.curriculum"]
        assert identity.schedule == SCHEDULES[curriculum_file and Path(curriculum_file).stem]
        callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
        assert callbacks.count("callbacks.Curriculum") == (curriculum_file is not None)
        assert config["trainer"]["max_epochs"] == epochs
        groups.add(identity.group)
    # wandb groups by loss × curriculum arm: the one-stage arm (imprinting) and the no-callback arm
    # are groups of their own
    assert len(groups) == len(losses) * len(curricula)


def test_cleaning_sweep_trains_the_paper_recipe_on_raw_and_cleaned_db(monkeypatch, capsys):
    """experiments/sweeps/cleaning.yaml: 2 databases × 3 seeds, each resolving to center loss +
    curriculum on the noisy DB (oracle_clean off), the cleaned one read from landmarks clean's folder."""
    from cli.main import main

    spec = load_sweep(ROOT / "experiments" / "sweeps" / "cleaning.yaml")
    runs = spec.expand()
    assert len(runs) == 6 and len({r.name for r in runs}) == 6
    monkeypatch.chdir(ROOT)
    manifests = set()
    for run in runs[:2]:
        with pytest.raises(SystemExit) as info:
            main(spec.command_for(run)[2:] + ["--print_config"])
        assert info.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["data"]["oracle_clean"] is False and config["data"]["image_size"] == 64
        assert config["model"]["loss"]["class_path"] == "losses.CenterSoftmaxLoss"
        assert [c["class_path"] for c in config["trainer"]["callbacks"]].count("callbacks.Curriculum") == 1
        manifests.add(str((ROOT / config["data"]["data_dir"] / config["data"]["db_manifest"]).resolve()))
    assert manifests == {str(ROOT / "data" / "synthetic" / "db.csv"), str(ROOT / "runs" / "cleaning" / "clean" / "clean.csv")}


def test_short_forms_of_values_in_run_names():
    from sweeps.spec import _short

    assert _short("experiments/center_plain.yaml") == "center_plain"
    assert _short("db.csv") == "db"  # a file, not a class path ("csv")
    assert _short("../../runs/cleaning/clean/clean.csv") == "clean"
    assert _short("losses.ArcFaceLoss") == "ArcFaceLoss"
    assert _short(0.001) == "0.001" and _short([1, 2]) == "1+2" and _short(None) == "none"


def test_the_comparison_plot_gives_each_of_many_configurations_its_own_line_and_keeps_the_legend_off_the_data(tmp_path):
    from sweeps.compare import _style

    # 12 configurations with long names (as a loss × curriculum sweep makes) and a curve per run
    runs = []
    for k in range(12):
        params = {"config.loss": f"experiments/loss_with_a_long_recipe_name_{k // 3}+warmup+push.yaml",
                  "config.curriculum": f"experiments/curriculum_{k % 3}.yaml", "seed_everything": 0}
        run = _hand_run(tmp_path, f"r{k}", params, 0.3 + 0.02 * k)
        plots = run / "csv" / "version_0" / "plots"
        plots.mkdir()
        fpr = np.array([0.0, 1e-3, 1e-2, 1e-1, 1.0])
        rows = "\n".join(f"{1 - f:.3f},{f},{0.9 - 0.5 * f:.3f},{min(1.0, 0.3 + 0.02 * k + f):.3f}" for f in fpr)
        (plots / "val_epoch002_precision_fpr.csv").write_text("threshold,fpr,precision,recall\n" + rows + "\n")
        runs.append(run)
    comparison = compare(runs, out=tmp_path / "summary", plot=False)
    fig = plot_comparison(comparison, "recall@fpr=1e-03", tmp_path / "summary.png")
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    # every configuration its own colour and line style (tab10 alone repeated after 10)
    assert len({(str(c), s) for c, s in (_style(i, 12) for i in range(12))}) == 12
    assert len({(str(c), s) for c, s in (_style(i, 45) for i in range(45))}) == 45
    metric_ax, recall_ax, precision_ax, legend_ax = fig.axes
    legend = legend_ax.get_legend()
    assert len(legend.get_texts()) == 12 and recall_ax.get_legend() is None
    # drawn below the curves: the legend's box overlaps neither curve panel
    fig.canvas.draw()
    box = legend.get_window_extent()
    for ax in (recall_ax, precision_ax):
        assert not box.overlaps(ax.get_window_extent()), ax.get_title()
    assert [line.get_color() for line in recall_ax.get_lines()] == [_style(i, 12)[0] for i in range(12)]
