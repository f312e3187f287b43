"""The command line for people: every `landmarks` command turns a bad input into one line.

For each command of ``cli.main.TOOL_COMMANDS`` and the LightningCLI commands ``fit`` and
``validate``: exit status 2, stderr exactly one line ``landmarks <command>: error: ...`` naming the
file, column or key, and no traceback. In-process (``cli.main.main(argv)``) for speed; a few
subprocesses prove the real console: the one line, a normal run without FAISS / Lightning chatter,
and ``--debug`` showing the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli.main import LIGHTNING_COMMANDS, TOOL_COMMANDS, error_line, main, one_line

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "experiments" / "demo.yaml")


def _bad_manifest(folder: Path) -> Path:
    """A DB manifest whose landmark column is misspelt (``landmark`` for ``landmark_id``)."""
    path = folder / "misspelt.csv"
    path.write_text("path,landmark\na.jpg,1\nb.jpg,2\n")
    return path


def _photo(world: Path) -> str:
    return str(next((world / "images" / "queries").rglob("*.jpg")))


def _cases(world: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """command -> (argv with a bad input, text the error line must contain)."""
    np.save(tmp / "emb.npy", np.ones((2, 4), np.float32))
    (tmp / "not-an-index").mkdir()
    (tmp / "empty-run").mkdir()
    bad = str(_bad_manifest(tmp))
    tiny = [f"--data.data_dir={world}", "--data.synthetic=null", "--data.num_workers=0"]
    return {
        "synth": (["synth", "--out", str(tmp / "w"), "--image-size", "big"], "--image-size"),
        "demo": (["demo", "--config", str(tmp / "missing.yaml")], "missing.yaml"),
        "sweep": (["sweep", str(tmp / "nope.yaml"), "--out", str(tmp / "sweep")], "nope.yaml"),
        "compare": (["compare", str(tmp / "empty-run"), "--out", str(tmp / "cmp")], "empty-run"),
        "index": (["index", "--manifest", bad, "--out", str(tmp / "idx"), "--backbone", "mobilenetv2_100"],
                  "missing required column(s) ['landmark_id']"),
        "recognize": (["recognize", "--index", str(tmp / "no-index"), _photo(world)], "no-index"),
        "albums": (["albums", "--index", str(tmp / "not-an-index"), str(world / "images" / "queries"),
                    "--out", str(tmp / "albums")], "not-an-index: no index.json"),
        "export": (["export", "--checkpoint", str(tmp / "gone.ckpt"), "--out", str(tmp / "exp")], "gone.ckpt"),
        "prepare": (["prepare", "places365", "--root", str(tmp / "no-places"), "--out", str(tmp / "p")], "no-places"),
        "evaluate": (["evaluate", "gldv2", "--solution", str(tmp / "no-solution.csv"), "--predictions",
                      str(tmp / "p.csv")], "no-solution.csv"),
        "clean": (["clean", "--manifest", bad, "--out", str(tmp / "clean"), "--embeddings", str(tmp / "emb.npy")],
                  "missing required column(s) ['landmark_id']"),
        "clean-tune": (["clean-tune", "--manifest", str(tmp / "no-db.csv"), "--embeddings", str(tmp / "emb.npy")],
                       "no-db.csv"),
        "clean-separability": (["clean-separability", "--manifest", str(world / "db.csv"), "--nonlandmarks",
                                str(tmp / "no-pool.csv"), "--model", "a=x.ckpt", "--out", str(tmp / "sep")],
                               "no-pool.csv"),
        "realphotos": (["realphotos", "--root", str(tmp / "no-photos"), "--out", str(tmp / "rp")],
                       "no-photos/MANIFEST.csv"),
        "fit": (["fit", "--config", DEMO, *tiny, "--trainer.max_epochs=abc"], "trainer.max_epochs"),
        "validate": (["validate", "--config", DEMO, *tiny, "--model.backbone=mobilenetv2_10"],
                     "model.backbone: unknown backbone 'mobilenetv2_10'"),
    }


COMMANDS = [*TOOL_COMMANDS, "fit", "validate"]


@pytest.fixture(scope="module")
def cases(tiny_world, tmp_path_factory):
    return _cases(tiny_world, tmp_path_factory.mktemp("bad-inputs"))


def _assert_one_line(command: str, code, out: str, err: str, named: str) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"landmarks {command}: error: "), lines[0]
    assert named in lines[0], (named, lines[0])


def test_every_command_has_a_bad_input_case(cases):
    assert set(cases) == set(COMMANDS)
    assert {"fit", "validate"} <= set(LIGHTNING_COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_input_is_one_line_and_exit_status_2(command, cases, capsys, monkeypatch):
    monkeypatch.delenv("LANDMARKS_DEBUG", raising=False)
    argv, named = cases[command]
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # a command must not leave by SystemExit, but report what it printed
        code = exit_.code
    out, err = capsys.readouterr()
    _assert_one_line(command, code, out, err, named)


@pytest.mark.parametrize("extra, named", [
    (["--data.data_dir=/nonexistent/landmarks"], "data_dir /nonexistent/landmarks does not exist"),
    (["--config", "/nonexistent/extra.yaml"], "/nonexistent/extra.yaml"),
    (["--trainer.max_epochz=3"], "--trainer.max_epochz=3"),
    (["--data.nonlandmark_share=1.5"], "nonlandmark_share"),
    (["--model.pooling=max"], "model.pooling"),
    (["--model.loss=losses.NoSuchLoss"], "NoSuchLoss"),
    # Before: a pydantic traceback, a ZeroDivisionError, a run that trained nothing with exit 0.
    (["--data.image_size=0"], "data.image_size must be >= 1, got 0"),
    (["--data.augment_strength=-1"], "data.augment_strength must lie in [0, 1]"),
    (["--data.batches_per_epoch=0"], "data.batches_per_epoch must be >= 1, got 0"),
    (["--trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch must be >= 1"),
    (["--trainer.max_epochs=0"], "trainer.max_epochs must be >= 1 (or -1: no limit), got 0"),
    # Before: a RuntimeError traceback at the first evaluation, after an epoch of training.
    (["--data.query_manifest=null"], "RetrievalEvaluation needs non-empty evaluation sets, and queries is empty"),
])
def test_lightning_config_errors_are_one_line(extra, named, tiny_world, capsys):
    argv = ["fit", "--config", DEMO, f"--data.data_dir={tiny_world}", "--data.synthetic=null", *extra]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    _assert_one_line("fit", code, out, err, named)


def test_an_unknown_command_and_a_missing_option_are_one_line(capsys):
    assert main(["nosuch"]) == 2
    assert capsys.readouterr().err == "landmarks: error: unknown command 'nosuch' (`landmarks --help` lists the commands)\n"
    assert main(["index", "--manifest", "db.csv"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "landmarks index: error: the following arguments are required: --out (see `landmarks index --help`)"]


def test_debug_flag_and_variable_reraise(tmp_path, monkeypatch, capsys):
    from datamodules.manifest import ManifestError

    argv = ["clean-tune", "--manifest", str(tmp_path / "nope.csv"), "--embeddings", str(tmp_path / "e.npy")]
    with pytest.raises(ManifestError, match="nope.csv"):
        main([*argv, "--debug"])
    monkeypatch.setenv("LANDMARKS_DEBUG", "1")
    with pytest.raises(ManifestError, match="nope.csv"):
        main(argv)
    monkeypatch.setenv("LANDMARKS_DEBUG", "0")
    assert main(argv) == 2


def test_error_lines_are_one_line():
    worker = ("Caught UnreadableImage in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 1, in f\ndatamodules.images.UnreadableImage: /data/a.jpg: cannot decode (boom)\n')
    assert one_line(worker) == "/data/a.jpg: cannot decode (boom)"
    assert one_line("first\n  second\n  - a bullet\n") == "first second a bullet"
    assert one_line("--model wants NAME=CHECKPOINT") == "--model wants NAME=CHECKPOINT"
    assert error_line("fit", FileNotFoundError(2, "No such file or directory", "/x/y.ckpt")) == \
        "landmarks fit: error: /x/y.ckpt: No such file or directory"


# ---- the real console ---------------------------------------------------------------------------


def _landmarks(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}
    environ.pop("LANDMARKS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          env=environ, cwd=cwd or ROOT, timeout=600)


CHATTER = ("faiss.loader", "AVX512", "AVX2", "GPU available", "TPU available", "litlogger", "Tip:", "Warning",
           "deprecated", "DeprecationWarning", "UserWarning", "LightningCLI's args")


@pytest.mark.slow  # real subprocesses: each pays the torch/Lightning import
def test_console_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = str(_bad_manifest(tmp_path))
    argv = ["index", "--manifest", bad, "--out", str(tmp_path / "idx"), "--backbone", "mobilenetv2_100"]
    done = _landmarks(*argv)
    _assert_one_line("index", done.returncode, done.stdout, done.stderr, "misspelt.csv: missing required column")
    debug = _landmarks(*argv, "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "datamodules.manifest.ManifestError: " in debug.stderr


@pytest.mark.slow  # real subprocesses: each pays the torch/Lightning import
def test_console_run_has_no_library_chatter_and_verbose_brings_it_back(tiny_world, tmp_path):
    argv = ["index", "--manifest", str(tiny_world / "db.csv"), "--out", str(tmp_path / "idx"), "--backbone",
            "mobilenetv2_100", "--image-size", "64", "--threshold", "0.5", "--cache-dir", "", "--num-workers", "0",
            "--accelerator", "cpu"]
    done = _landmarks(*argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "index:" in done.stdout and "threshold:  0.500000 (fixed" in done.stdout  # the results
    # The embedding's progress bar goes to stderr with the progress lines, not into the results.
    assert "Predicting" not in done.stdout and "Predicting" in done.stderr
    assert "INFO landmarks.recognition: embedding 48 database images" in done.stderr  # the project's progress
    for noise in CHATTER:
        assert noise not in done.stdout + done.stderr, (noise, done.stderr)
    # -v brings the libraries back (FAISS's loader lines, logged at INFO when the index loads).
    loud = _landmarks("-v", "recognize", "--index", str(tmp_path / "idx"), "--threshold", "0.5", _photo(tiny_world))
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "faiss.loader" in loud.stderr


@pytest.mark.parametrize("command, extra, named", [
    ("demo", ["--scales", "1.414", "1.414"], "--scales: scales must be distinct factors in [0.25, 4], got [1.414, 1.414]"),
    ("fit", ["--config", DEMO, "--model.eval_scales=[1.0, 9.0]"], "model.eval_scales: scales must be distinct factors"),
])
def test_bad_scales_are_one_line(command, extra, named, tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LANDMARKS_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing of a run is written before the error
    world = [f"--data.data_dir={tiny_world}", "--data.synthetic=null", "--data.num_workers=0"] if command == "fit" else []
    capsys.readouterr()
    code = main([command, *extra, *world])
    out, err = capsys.readouterr()
    _assert_one_line(command, code, out, err, named)
    assert not list(tmp_path.iterdir())


# ---- numbers out of range, and files that are not checkpoints ----------------------------------


@pytest.mark.parametrize("argv, named", [
    (["index", "--manifest", "db.csv", "--out", "idx", "--backbone", "b", "--target-fpr", "1.5"],
     "argument --target-fpr: must lie in (0, 1), got '1.5'"),
    (["index", "--manifest", "db.csv", "--out", "idx", "--backbone", "b", "--batch-size", "0"],
     "argument --batch-size: must be an integer >= 1, got '0'"),
    (["index", "--manifest", "db.csv", "--out", "idx", "--backbone", "b", "--distance-threshold", "-1"],
     "argument --distance-threshold: must be >= 0, got '-1'"),
    (["index", "--manifest", "db.csv", "--out", "idx", "--backbone", "b", "--index-kind", "ivf", "--nlist", "0"],
     "argument --nlist: must be an integer >= 1"),
    (["recognize", "--index", "idx", "x.jpg", "--threshold", "nan"], "argument --threshold: expected a finite number"),
    (["recognize", "--index", "idx", "x.jpg", "--device", "bogus"], "argument --device: expected cpu, cuda, cuda:N or auto"),
    (["recognize", "--index", "idx", "x.jpg", "--workers", "-1"], "argument --workers: must be an integer >= 0"),
    (["albums", "--index", "idx", "photos", "--out", "a", "--thumb-size", "-10"], "argument --thumb-size"),
    (["export", "--checkpoint", "c.ckpt", "--out", "e", "--image-size", "0"], "argument --image-size"),
    (["clean", "--manifest", "db.csv", "--out", "c", "--report-landmarks", "-5"],
     "argument --report-landmarks: must be an integer >= 0"),
    (["synth", "--out", "w", "--workers", "0"], "argument --workers: must be an integer >= 1"),
    (["sweep", "s.yaml", "--out", "s", "--parallel", "0"], "argument --parallel"),
    (["prepare", "shards", "--manifest", "m.csv", "--out", "s", "--quality", "101"],
     "argument --quality: must be an integer in [1, 100]"),
    (["demo", "--target-fpr", "0"], "argument --target-fpr: must lie in (0, 1)"),
    (["realphotos", "--wise-ft", "1.5"], "argument --wise-ft: must lie in [0, 1]"),
])
def test_a_number_out_of_range_is_refused_when_the_line_is_parsed(argv, named, tmp_path, monkeypatch, capsys):
    """Before this check, index embedded every photo and then raised a traceback for --target-fpr 1.5;
    --nlist 0 and export's --image-size 0 were quietly replaced by defaults."""
    monkeypatch.delenv("LANDMARKS_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)  # relative paths that do not exist: the number must fail first
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    _assert_one_line(argv[0], code, out, err, named)
    assert not list(tmp_path.iterdir())


def _not_checkpoints(folder: Path, real: Path | None = None) -> dict[str, Path]:
    import torch

    files = {"text": folder / "text.ckpt", "plain-dict": folder / "dict.ckpt"}
    files["text"].write_text("hello\n")
    torch.save({"weights": torch.zeros(2)}, files["plain-dict"])
    if real is not None:  # a checkpoint cut short, as by a full disk or an interrupted copy
        files["truncated"] = folder / "truncated.ckpt"
        files["truncated"].write_bytes(real.read_bytes()[:4096])
    files["folder"] = folder / "run-folder"  # a run folder given for its checkpoint: was "checkpoint not found"
    files["folder"].mkdir()
    return files


@pytest.mark.parametrize("kind", ["text", "plain-dict", "truncated", "folder"])
@pytest.mark.parametrize("command", ["index", "export", "validate"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(command, kind, tiny_world, tmp_path, monkeypatch, capsys):
    import torch

    real = tmp_path / "real.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(4096)}}, real)
    bad = str(_not_checkpoints(tmp_path, real)[kind])
    argv = {
        "index": ["index", "--manifest", str(tiny_world / "db.csv"), "--out", str(tmp_path / "idx"), "--checkpoint",
                  bad, "--threshold", "0.5", "--cache-dir", ""],
        "export": ["export", "--checkpoint", bad, "--out", str(tmp_path / "exp")],
        "validate": ["validate", "--config", DEMO, f"--data.data_dir={tiny_world}", "--data.synthetic=null",
                     "--data.num_workers=0", "--trainer.logger=false", f"--ckpt_path={bad}"],
    }[command]
    monkeypatch.delenv("LANDMARKS_DEBUG", raising=False)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    expected = {"plain-dict": "not a LandmarkModule checkpoint of format 'landmark-module/1'",
                "folder": "a folder, not a checkpoint file"}.get(kind, "not a checkpoint loadable with weights_only=True")
    _assert_one_line(command, code, out, err, f"{bad}: {expected}")


def test_an_index_out_folder_that_is_not_an_index_is_refused_before_embedding(tiny_world, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.txt").write_text("someone's folder\n")
    capsys.readouterr()
    code = main(["index", "--manifest", str(tiny_world / "db.csv"), "--out", str(photos), "--backbone",
                 "mobilenetv2_100", "--threshold", "0.5", "--cache-dir", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    _assert_one_line("index", code, out, err, "exists and is not a landmark index; choose another --out")
    assert not (tmp_path / "cache").exists()  # nothing was embedded
    assert [p.name for p in photos.iterdir()] == ["keep.txt"]


def test_an_albums_out_that_is_a_file_is_refused_before_recognising(tmp_path, capsys):
    (tmp_path / "albums.txt").write_text("not a folder\n")
    capsys.readouterr()
    code = main(["albums", "--index", str(tmp_path / "no-index"), str(tmp_path), "--out", str(tmp_path / "albums.txt")])
    out, err = capsys.readouterr()
    _assert_one_line("albums", code, out, err, "albums.txt: exists and is not a folder")  # not the missing index


@pytest.mark.parametrize("stage, named", [
    ("{epochs: 1, class_share: 0.0}", "Curriculum stage 0: class_share must be in (0, 1], got 0.0"),
    ("{epochs: 1, class_share: 0.1}", "curriculum stage 0 activates 1 classes, but a global batch needs 16"),
])
def test_curriculum_mistakes_are_one_line(stage, named, tiny_world, tmp_path, capsys):
    """The first was a jsonargparse union error around the refusal, the second a ValueError traceback."""
    curriculum = tmp_path / "curriculum.yaml"
    curriculum.write_text("trainer:\n  callbacks+:\n    - class_path: callbacks.Curriculum\n      init_args:\n"
                          f"        stages:\n          - {stage}\n          - {{}}\n")
    argv = ["fit", "--config", DEMO, f"--data.data_dir={tiny_world}", "--data.synthetic=null", "--data.num_workers=0",
            "--trainer.logger=false", "--config", str(curriculum)]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    _assert_one_line("fit", code, out, err, named)


def test_a_db_whose_every_photo_is_undecodable_is_one_line_at_the_evaluation(tiny_world, tmp_path, capsys):
    """Undecodable photos are skipped and counted; with none left the evaluation gave a RuntimeError
    traceback ("cannot build an index over an empty gallery") instead of naming the manifest."""
    import shutil

    import pandas as pd

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    (world / "world.json").unlink()  # hand-edited: not a synthetic world any more
    db = pd.read_csv(world / "db.csv", dtype=str)
    for path in db["path"]:
        (world / path).write_bytes(b"not a JPEG")  # present and non-empty, so only decoding fails
    argv = ["fit", "--config", DEMO, f"--data.data_dir={world}", "--data.synthetic=null", "--data.num_workers=0",
            "--data.classes_per_batch=4", "--data.batches_per_epoch=1", "--trainer.max_epochs=1",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'runs'}"]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    err = "\n".join(line for line in err.splitlines() if "skipping unreadable image" not in line)
    _assert_one_line("fit", code, out, err,
                     f"RetrievalEvaluation: none of the {len(db)} gallery photos (data.db_manifest: db.csv) could be "
                     "decoded")


def _checkpoint_index(folder: Path) -> Path:
    """A saved index whose model is a checkpoint that no longer exists."""
    from recognition.artifact import LandmarkIndex

    emb = np.eye(4, 8, dtype=np.float32)
    model = {"identity": {"source": "checkpoint", "backbone": "toy", "embedding_size": 8, "image_size": 32},
             "key": "k", "source": {"checkpoint": str(folder / "gone.ckpt")}}
    return LandmarkIndex.from_embeddings(emb, ["a", "a", "b", "b"], model, representation="mean").save(folder / "idx")


@pytest.mark.parametrize("extra, named", [
    # Before: exit 0 and an export.json at the index's 64 px (the option was ignored).
    (["--image-size", "32"], "--image-size: an index's model keeps the image size it was built with"),
    # Before: "<out>: File exists".
    (["--out", "{tmp}/afile"], "--out {tmp}/afile: exists and is not a folder"),
    # Before: "index directory not found: <file>".
    (["--index", "{tmp}/afile"], "{tmp}/afile is a file, not an index folder"),
    # Before: "pass the checkpoint explicitly", which --index does not allow.
    ([], "gone.ckpt, which is gone; export the checkpoint with --checkpoint PATH instead of --index, "
         "or rebuild the index"),
])
def test_export_from_an_index_mistakes_are_one_line(extra, named, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LANDMARKS_DEBUG", raising=False)
    (tmp_path / "afile").write_text("not a folder\n")
    argv = ["export", "--index", str(_checkpoint_index(tmp_path)), "--out", str(tmp_path / "exp"),
            "--format", "torchscript"]
    for i in range(0, len(extra), 2):  # the case's option replaces the default one
        value = extra[i + 1].format(tmp=tmp_path)
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = value
        else:
            argv += [extra[i], value]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    _assert_one_line("export", code, out, err, named.format(tmp=tmp_path))
    assert not (tmp_path / "exp").exists()
