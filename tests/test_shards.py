"""Tar shards (``landmarks prepare shards``): round trip, the data module over shards, streaming
exactly once across ranks × workers, mid-epoch resume, resumable/atomic preparation, bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from datamodules import LandmarkDataModule
from datamodules.datasets import manifest_dataset
from datamodules.images import load_rgb
from datamodules.manifest import ManifestError, load_manifest
from datamodules.shards import ShardError, ShardStream, prepare_shards, read_shard_set
from datamodules.transforms import eval_transform

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = {"db": "db.csv", "nonlandmarks": "nonlandmarks.csv", "queries": "queries.csv",
             "distractors": "distractors.csv"}


@pytest.fixture(scope="module")
def sharded(tiny_world, tmp_path_factory):
    """The tiny world's four manifests as shard sets (small shards, so there are several)."""
    out = tmp_path_factory.mktemp("shards")
    for name, csv in MANIFESTS.items():
        prepare_shards(tiny_world / csv, out / name, samples_per_shard=7, progress=False)
    return out


def _datamodules(tiny_world, sharded, **kwargs):
    kwargs = {"classes_per_batch": 4, "samples_per_class": 2, **kwargs}
    files = LandmarkDataModule(data_dir=str(tiny_world), image_size=32, num_workers=0, **kwargs)
    shards = LandmarkDataModule(data_dir=str(sharded), image_size=32, num_workers=0, db_manifest="db",
                                nonlandmark_manifest="nonlandmarks", query_manifest="queries",
                                distractor_manifest="distractors", **kwargs)
    return files, shards


def test_round_trip_keeps_bytes_labels_and_columns(tiny_world, sharded):
    source = load_manifest(tiny_world / "db.csv")
    shards = read_shard_set(sharded / "db")
    header = json.loads((sharded / "db" / "shardset.json").read_text())
    assert header["num_samples"] == len(source) == len(shards) and header["skipped"] == 0
    assert len(header["shards"]) == -(-len(source) // 7) and sum(s["nsamples"] for s in header["shards"]) == len(source)
    assert shards.landmark_ids == source.landmark_ids
    assert [os.path.realpath(p) for p in shards.paths] == [os.path.realpath(p) for p in source.paths]
    assert list(shards.table["is_noise"]) == list(source.table["is_noise"])  # every source column travels
    # Each member holds the source file's bytes (small upright JPEGs are stored as they are) and a
    # JSON record naming the row and landmark, read here with tarfile, independent of our reader.
    first = header["shards"][1]["url"]
    with tarfile.open(sharded / "db" / first) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}
    rows = shards.table.index[shards.table["shard"] == first]
    assert len(members) == 2 * len(rows)
    for row in rows:
        key = shards.table.at[row, "key"]
        assert members[f"{key}.jpg"] == Path(source.paths[row]).read_bytes()
        assert json.loads(members[f"{key}.json"]) == {"row": int(row), "landmark_id": source.landmark_ids[row],
                                                      "nonlandmark": False}


def test_large_and_rotated_images_are_stored_upright_at_max_side(tmp_path):
    big = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    rotated = Image.fromarray(big[:50, :30])
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    pd.DataFrame({"path": ["big.png", "rotated.jpg"], "landmark_id": ["a", "b"]}).to_csv(tmp_path / "m.csv", index=False)
    prepare_shards(tmp_path / "m.csv", tmp_path / "out", max_side=64, progress=False)
    dataset = LandmarkDataModule(data_dir=str(tmp_path), db_manifest="out", nonlandmark_manifest=None,
                                 query_manifest=None, distractor_manifest=None, nonlandmark_share=0.0,
                                 image_size=200).eval_dataset("gallery")
    assert dataset.decode(0).shape == (38, 64, 3)  # 500 px → 64 on the longer side
    # Smaller than max_side but rotated by its EXIF tag: re-encoded upright, not stored as it is.
    assert dataset.decode(1).shape == load_rgb(tmp_path / "rotated.jpg").shape == (30, 50, 3)


def test_data_module_over_shards_gives_the_same_samples_and_batches(tiny_world, sharded):
    files, shards = _datamodules(tiny_world, sharded, batches_per_epoch=4, seed=3)
    assert shards.class_map.to_list() == files.class_map.to_list()
    assert shards.eval_set_names == files.eval_set_names
    for name in files.eval_set_names:
        a, b = files.eval_dataset(name), shards.eval_dataset(name)
        assert len(a) == len(b)
        for i in range(0, len(a), 7):
            x, y = a[i], b[i]
            assert (x["label"], x["index"], x["valid"]) == (y["label"], y["index"], y["valid"])
            assert torch.equal(x["image"], y["image"]), (name, i)
    batches = []
    for dm in (files, shards):
        loader = dm.train_dataloader()
        dm.eval_dataset("train_landmarks").transform.set_random_seed(0)  # same augmentations for both
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 4
    for x, y in zip(*batches):  # P×K composition, labels and pixels: exactly the map-style batches
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
        assert torch.equal(x["image"], y["image"])


def test_mid_epoch_resume_over_shards_continues_with_the_same_batches(tiny_world, sharded):
    _, dm = _datamodules(tiny_world, sharded, batches_per_epoch=6, seed=1)
    whole = [b["index"] for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    seen = []
    for batch in loader:
        seen.append(batch["index"])
        if len(seen) == 2:
            state = loader.state_dict()
            break
    _, again = _datamodules(tiny_world, sharded, batches_per_epoch=6, seed=1)
    resumed = again.train_dataloader()
    resumed.load_state_dict(state)
    rest = [b["index"] for b in resumed]
    assert len(rest) == 4
    for got, want in zip(seen + rest, whole):
        assert torch.equal(got, want)


def test_stream_reads_every_sample_once_in_one_process_with_workers(tiny_world, sharded):
    manifest = read_shard_set(sharded / "distractors", "nonlandmark")
    stream = ShardStream(manifest, np.full(len(manifest), -1), eval_transform(32), 32)
    loader = torch.utils.data.DataLoader(stream, batch_size=16, num_workers=2)
    seen = torch.cat([b["index"] for b in loader]).tolist()
    assert sorted(seen) == list(range(len(manifest)))
    subset = manifest.subset(np.arange(len(manifest)) % 3 == 0)  # rows dropped (e.g. by cleaning)
    stream = ShardStream(subset, np.full(len(subset), -1), eval_transform(32), 32)
    assert sorted(s["index"] for s in stream) == list(range(len(subset)))


_RANK_SCRIPT = r"""
import json, os, sys
import numpy as np, torch, torch.distributed as dist
from datamodules.shards import ShardStream, read_shard_set
from datamodules.transforms import eval_transform
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[3]}", rank=int(sys.argv[1]), world_size=2)
manifest = read_shard_set(sys.argv[2], "nonlandmark")
stream = ShardStream(manifest, np.full(len(manifest), -1), eval_transform(32), 32)
seen = []
for batch in torch.utils.data.DataLoader(stream, batch_size=8, num_workers=2):
    seen += batch["index"].tolist()
every = [None, None]
dist.all_gather_object(every, seen)
if dist.get_rank() == 0:
    print(json.dumps(every))
dist.destroy_process_group()
"""


def test_stream_visits_every_sample_exactly_once_across_2_ranks_x_2_workers(sharded, tmp_path, free_port):
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(sharded / "distractors"), str(free_port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    rank0, rank1 = json.loads(outputs[0][0].strip().splitlines()[-1])
    total = len(read_shard_set(sharded / "distractors", "nonlandmark"))
    assert rank0 and rank1 and not set(rank0) & set(rank1)  # both ranks read, none twice
    assert len(rank0) + len(rank1) == total and sorted(rank0 + rank1) == list(range(total))


def test_prepare_resumes_after_an_interruption_and_writes_shards_atomically(tiny_world, tmp_path, monkeypatch):
    import datamodules.shards as shards_module

    real = shards_module._member_bytes
    calls = {"n": 0}

    def dies_in_the_third_shard(*args):
        calls["n"] += 1
        if calls["n"] == 2 * 20 + 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shards_module, "_member_bytes", dies_in_the_third_shard)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(tiny_world / "distractors.csv", out, samples_per_shard=20, progress=False)
    # Two finished shards; the third left nothing under its name; no set header yet.
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-000000.json", "shard-000000.tar", "shard-000001.json", "shard-000001.tar"]
    assert not (out / "shardset.json").exists() and not list(out.glob(".*.tmp-*"))
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    monkeypatch.setattr(shards_module, "_member_bytes", real)
    calls["n"] = 0
    header = prepare_shards(tiny_world / "distractors.csv", out, samples_per_shard=20, progress=False)
    assert all((out / name).stat().st_mtime_ns == t for name, t in finished.items())  # kept, not rewritten
    reference = prepare_shards(tiny_world / "distractors.csv", tmp_path / "ref", samples_per_shard=20, progress=False)
    assert header["shards"] == reference["shards"]
    for shard in header["shards"]:  # byte-identical to an uninterrupted run
        assert (out / shard["url"]).read_bytes() == (tmp_path / "ref" / shard["url"]).read_bytes()
    assert prepare_shards(tiny_world / "distractors.csv", out, samples_per_shard=20, progress=False) == header
    with pytest.raises(ShardError, match="another manifest or other settings"):
        prepare_shards(tiny_world / "distractors.csv", out, samples_per_shard=10, progress=False)


def test_unreadable_source_images_are_skipped_and_counted_or_an_error_naming_the_line(tmp_path, caplog):
    good = np.full((20, 30, 3), 128, dtype=np.uint8)
    Image.fromarray(good).save(tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    pd.DataFrame({"path": ["a.jpg", "broken.jpg", "a.jpg"]}).to_csv(tmp_path / "m.csv", index=False)
    with caplog.at_level(logging.WARNING):
        header = prepare_shards(tmp_path / "m.csv", tmp_path / "skip", progress=False)
    assert header["kind"] == "nonlandmark" and header["num_samples"] == 2 and header["skipped"] == 1
    with tarfile.open(tmp_path / "skip" / header["shards"][0]["url"]) as archive:
        first = json.loads(archive.extractfile("000000000.json").read())
    assert first == {"row": 0, "landmark_id": None, "nonlandmark": True}
    assert any("skipped 1 unreadable image" in r.message and "line 3" in r.message for r in caplog.records)
    with pytest.raises(ShardError, match=r"m\.csv: line 3: .*broken\.jpg"):
        prepare_shards(tmp_path / "m.csv", tmp_path / "error", on_bad_image="error", progress=False)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_truncated_shard_is_an_error_naming_it_or_a_counted_skip(tiny_world, sharded, tmp_path, caplog):
    root = tmp_path / "data"
    copy = _copy(sharded / "distractors", root / "distractors")
    shard = copy / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # a shard holds 7 samples of ~2-4 kB
    kwargs = dict(data_dir=str(root), db_manifest=str(tiny_world / "db.csv"), nonlandmark_manifest=None,
                  nonlandmark_share=0.0, query_manifest=None, distractor_manifest="distractors", image_size=32)
    with pytest.raises(ShardError, match=r"shard-000001\.tar: 5000 bytes, but \d+ were written"):
        LandmarkDataModule(on_bad_image="error", **kwargs).setup()
    with caplog.at_level(logging.WARNING):
        dm = LandmarkDataModule(**kwargs)
        dataset = dm.eval_dataset("distractors")
    assert len(dataset) == len(read_shard_set(copy, "nonlandmark")) - 7
    assert any("skipping the 7 samples of 1 damaged shard" in r.message for r in caplog.records)


def test_a_member_that_moved_or_does_not_decode_names_the_shard_and_offset(sharded, tmp_path, caplog):
    copy = _copy(sharded / "distractors", tmp_path / "distractors")
    manifest = read_shard_set(copy, "nonlandmark")
    samples = pd.read_csv(copy / "samples.csv", dtype=str, keep_default_na=False)
    samples.loc[0, "offset"] = samples.loc[1, "offset"]  # an index that points at another member
    samples.to_csv(copy / "samples.csv", index=False)
    shard = copy / manifest.table.at[2, "shard"]
    data = bytearray(shard.read_bytes())
    offset, size = int(manifest.table.at[2, "offset"]), int(manifest.table.at[2, "size"])
    data[offset:offset + size] = b"\0" * size  # same length, bytes destroyed
    shard.write_bytes(bytes(data))
    dataset = manifest_dataset(read_shard_set(copy, "nonlandmark"), np.full(len(manifest), -1), eval_transform(32), 32)
    with caplog.at_level(logging.WARNING):
        moved, destroyed, fine = dataset[0], dataset[2], dataset[3]
    assert not moved["valid"] and not destroyed["valid"] and fine["valid"]
    messages = " | ".join(r.message for r in caplog.records)
    assert f"{shard.name} @ offset {samples.loc[1, 'offset']}: expected member {manifest.table.at[0, 'key']}.jpg" in messages
    assert f"{shard.name} @ offset {offset}: not an image" in messages or f"@ offset {offset}: cannot decode" in messages


def test_shards_of_another_format_version_are_refused_naming_both(sharded, tmp_path):
    copy = _copy(sharded / "queries", tmp_path / "queries")
    header = json.loads((copy / "shardset.json").read_text())
    (copy / "shardset.json").write_text(json.dumps({**header, "version": 7}))
    with pytest.raises(ManifestError, match="format version 7 of landmark-shards; this version of the project reads version 1"):
        load_manifest(copy)


def test_prepare_shards_command_and_its_errors(tiny_world, tmp_path, capsys):
    from cli.main import main

    assert main(["prepare", "shards", "--manifest", str(tiny_world / "queries.csv"), "--out", str(tmp_path / "q"),
                 "--samples-per-shard", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == len(load_manifest(tiny_world / "queries.csv")) and summary["shards"] >= 2
    assert main(["prepare", "shards", "--manifest", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("landmarks prepare: error:") and "missing.csv" in err[0]


def test_index_refuses_a_shard_set_naming_what_to_give_instead(sharded, tmp_path, capsys):
    from cli.main import main

    assert main(["index", "--manifest", str(sharded / "db"), "--out", str(tmp_path / "index"),
                 "--backbone", "mobilenetv2_100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reads image files, not tar shards" in err[0] and str(sharded / "db") in err[0]


# ---- bad input, on small sets built here --------------------------------------------------------


def _small_manifest(folder: Path, rows: int = 3, landmark: bool = True, missing: bool = False) -> Path:
    """A manifest of ``rows`` tiny photos (or of paths to no file, with ``missing``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(rows):
        path = folder / f"p{i}.jpg"
        if not missing:
            Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(path.name)
    columns = {"path": paths, **({"landmark_id": ["1", "1", "2"][:rows]} if landmark else {})}
    pd.DataFrame(columns).to_csv(folder / "m.csv", index=False)
    return folder / "m.csv"


@pytest.fixture
def small_set(tmp_path) -> Path:
    """A landmark shard set of 3 photos in 2 shards (member data at offsets 512, 2048, ...)."""
    prepare_shards(_small_manifest(tmp_path / "src"), tmp_path / "set", samples_per_shard=2, progress=False)
    return tmp_path / "set"


def test_a_manifest_with_no_image_to_pack_is_one_line_and_writes_no_set(tmp_path, capsys):
    """Was exit 0 with a 0-sample set (a warning only when every row's image was missing)."""
    from cli.main import main

    header_only = tmp_path / "header.csv"
    header_only.write_text("path,landmark_id\n")
    all_missing = _small_manifest(tmp_path / "gone", missing=True)
    for manifest, why in ((header_only, "the manifest has no rows"),
                          (all_missing, "all 3 rows' images are missing or unreadable, e.g. line 2: ")):
        out = tmp_path / f"out-{manifest.stem}-{manifest.parent.name}"
        capsys.readouterr()
        assert main(["prepare", "shards", "--manifest", str(manifest), "--out", str(out)]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "prepare shards:" not in line]
        assert len(err) == 1 and err[0].startswith("landmarks prepare: error:"), err  # (the progress bar aside)
        assert f"{manifest}: no images to pack" in err[0] and why in err[0]
        assert not out.exists() or not list(out.iterdir())  # no set, no empty shards, no marker


@pytest.mark.parametrize("written, asked", [("landmark", "nonlandmark"), ("nonlandmark", "landmark")])
def test_a_shard_set_of_the_other_kind_is_refused_naming_both(written, asked, tmp_path):
    """Was accepted: a landmark set given as the non-landmark pool trained its photos as non-landmarks."""
    manifest = _small_manifest(tmp_path / "src", landmark=True)
    prepare_shards(manifest, tmp_path / "set", kind=written, progress=False)
    with pytest.raises(ShardError, match=rf"shardset\.json: a {written} shard set, given where a {asked} manifest is read"):
        load_manifest(tmp_path / "set", asked)
    assert len(load_manifest(tmp_path / "set", written)) == 3


def _edit_samples(shard_set: Path, column: str, value: str, row: int = 0) -> None:
    samples = pd.read_csv(shard_set / "samples.csv", dtype=str, keep_default_na=False)
    samples.loc[row, column] = value
    samples.to_csv(shard_set / "samples.csv", index=False)


@pytest.mark.parametrize("column, value, named", [
    ("offset", "abc", "offset 'abc' is not an integer ≥ 512"),
    ("offset", "", "offset '' is not an integer ≥ 512"),
    ("offset", "0", "offset '0' is not an integer ≥ 512"),  # was OSError [Errno 22] at seek, killing the fit
    ("offset", "-512", "offset '-512' is not an integer ≥ 512"),
    ("size", "1.5e3", "size '1.5e3' is not an integer ≥ 0"),  # was ValueError: invalid literal for int()
    ("size", "-5", "size '-5' is not an integer ≥ 0"),
    ("shard", "../ok/shard-000000.tar", "shard '../ok/shard-000000.tar' is not one of the shards listed in shardset.json"),
])
def test_a_bad_sample_location_is_an_error_naming_samples_csv_and_its_line(small_set, column, value, named):
    _edit_samples(small_set, column, value, row=1)
    with pytest.raises(ShardError) as caught:
        load_manifest(small_set)
    assert str(caught.value) == f"{small_set / 'samples.csv'}: line 3: {named}"


@pytest.mark.parametrize("content, named", [
    (lambda h: {k: v for k, v in h.items() if k != "shards"}, "key 'shards' is missing"),  # was KeyError
    (lambda h: {**h, "shards": {"url": "shard-000000.tar"}}, "key 'shards' is not a list"),
    (lambda h: {**h, "shards": [{"url": "shard-000000.tar"}]}, "key 'shards', entry 0: "),
    (lambda h: {k: v for k, v in h.items() if k != "kind"}, "key 'kind' is None, not 'landmark' or 'nonlandmark'"),
    (lambda h: [1, 2], "not a shard set header (a JSON list, not an object)"),  # was AttributeError
    (lambda h: json.dumps(h)[:40], "not a readable shard set header"),  # truncated
], ids=["no-shards", "shards-not-list", "shard-entry", "no-kind", "a-list", "truncated"])
def test_a_malformed_shardset_json_is_an_error_naming_it_and_the_key(small_set, content, named):
    path = small_set / "shardset.json"
    edited = content(json.loads(path.read_text()))
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ShardError, match=re.escape(f"{path}: {named}")):
        load_manifest(small_set)


def test_a_shard_that_is_a_directory_is_not_a_file_not_missing(small_set):
    from datamodules.shards import damaged_shards

    (small_set / "shard-000001.tar").unlink()
    (small_set / "shard-000001.tar").mkdir()
    (small_set / "shard-000000.tar").unlink()
    assert damaged_shards(load_manifest(small_set)) == {
        "shard-000000.tar": f"{small_set / 'shard-000000.tar'}: shard missing",
        "shard-000001.tar": f"{small_set / 'shard-000001.tar'}: shard is not a file",
    }


def test_a_run_that_failed_before_its_first_shard_does_not_block_a_rerun_with_other_settings(tmp_path):
    """Was refused: the failed run's marker claimed the folder though it held no finished shard."""
    manifest = _small_manifest(tmp_path / "src")
    (tmp_path / "src" / "p0.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    with pytest.raises(ShardError, match=r"m\.csv: line 2: "):
        prepare_shards(manifest, out, samples_per_shard=2, on_bad_image="error", progress=False)
    header = prepare_shards(manifest, out, samples_per_shard=2, on_bad_image="skip", progress=False)
    assert header["num_samples"] == 2 and header["skipped"] == 1
    # A finished shard still guards the folder against other settings (resume semantics unchanged).
    (tmp_path / "src" / "p0.jpg").unlink()
    _small_manifest(tmp_path / "src")
    (tmp_path / "src" / "p2.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # in the second shard
    with pytest.raises(ShardError, match=r"m\.csv: line 4: "):
        prepare_shards(manifest, tmp_path / "half", samples_per_shard=2, on_bad_image="error", progress=False)
    assert (tmp_path / "half" / "shard-000000.tar").is_file()
    with pytest.raises(ShardError, match="holds unfinished shards of another manifest or other settings"):
        prepare_shards(manifest, tmp_path / "half", samples_per_shard=2, on_bad_image="skip", progress=False)
