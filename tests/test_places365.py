"""Places365 as the non-landmark pool: the published list files → manifests, category exclusion."""

from __future__ import annotations

import logging

import pytest
from public_datasets import PLACES_CATEGORIES, make_places365

from cli.main import main
from datamodules.manifest import ManifestError, read_manifest
from datamodules.places365 import prepare_places365, read_places365, read_places365_categories


@pytest.fixture
def places(tmp_path):
    return make_places365(tmp_path / "places365")


def test_categories_file_gives_index_to_name(places):
    categories = read_places365_categories(places)
    assert categories[0] == "airfield" and categories[71] == "bus_station/indoor" and categories[91] == "church/outdoor"
    assert len(categories) == len(PLACES_CATEGORIES)


def test_default_exclusion_drops_landmark_prone_scenes_and_warns_about_unknown_defaults(places, caplog):
    with caplog.at_level(logging.WARNING):
        manifest, counts = read_places365(places, "train")
    kinds = set(manifest.table["kind"])
    # amphitheater and both church variants are in the default list; the rest stay.
    assert kinds == {"airfield", "alley", "art_school", "bedroom", "bus_station/indoor"}
    assert counts == {"excluded_categories": 3 * 2, "missing_files": 0}
    assert len(manifest) == 5 * 2 and manifest.landmark_ids is None
    assert manifest.paths[0] == str(places / "data_256" / "a" / "airfield" / "00000001.jpg")
    assert list(manifest.lines[:2]) == [1, 2]  # file line numbers of the kept rows
    assert "default exclusion list" in caplog.text and "'tower'" in caplog.text


def test_explicit_exclusion_none_and_unknown_names(places):
    keep_all, counts = read_places365(places, "train", exclude=())
    assert len(keep_all) == 2 * len(PLACES_CATEGORIES) and counts["excluded_categories"] == 0
    only_outdoor_church, _ = read_places365(places, "train", exclude=["/c/church/outdoor", "bedroom"])
    assert {"church/indoor", "amphitheater"} <= set(only_outdoor_church.table["kind"])
    assert not {"church/outdoor", "bedroom"} & set(only_outdoor_church.table["kind"])
    with pytest.raises(ManifestError, match=r"unknown Places365 category \['towr'\]"):
        read_places365(places, "train", exclude=["towr"])


def test_val_split_and_alternative_folder_names(tmp_path):
    root = make_places365(tmp_path / "p", train_dir="data_large_standard")
    val, _ = read_places365(root, "val", exclude=())
    assert val.paths[0] == str(root / "val_256" / "Places365_val_00000001.jpg")
    assert val.table["kind"].iloc[0] == "airfield" and len(val) == len(PLACES_CATEGORIES)
    train, _ = read_places365(root, "train", exclude=())
    assert "/data_large_standard/" in train.paths[0]


def test_missing_images_are_skipped_with_a_count(places):
    (places / "data_256" / "a" / "alley" / "00000002.jpg").unlink()
    manifest, counts = read_places365(places, "train", exclude=())
    assert counts["missing_files"] == 1 and len(manifest) == 2 * len(PLACES_CATEGORIES) - 1
    assert list(manifest.lines[2:4]) == [3, 5]  # line 4 (the missing alley image) is gone


@pytest.mark.parametrize(
    "filename, line, message",
    [
        ("places365_train_standard.txt", "/a/airfield/00000009.jpg 4", r"line 17: image in folder '/a/airfield' has label 4 = 'alley'"),
        ("places365_train_standard.txt", "/a/airfield/00000009.jpg 7", r"line 17: category index 7 is not in categories_places365.txt"),
        ("places365_train_standard.txt", "a/airfield/00000009.jpg,0", r"line 17: 'a/airfield/00000009.jpg,0' is not a"),
        ("places365_val.txt", "val_00000009.jpg 0", r"line 9: 'val_00000009.jpg 0' is not a"),
    ],
)
def test_malformed_lines_are_errors_naming_file_and_line(places, filename, line, message):
    path = places / filename
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ManifestError, match=f"{filename}: {message}"):
        read_places365(places, "val" if "val" in filename else "train", exclude=(), check_files=False)


def test_missing_image_folder_is_an_error(places):
    (places / "val_256").rename(places / "elsewhere")
    with pytest.raises(ManifestError, match="no Places365 validation image folder"):
        read_places365(places, "val")
    manifest, _ = read_places365(places, "val", image_dir="elsewhere", exclude=())
    assert "/elsewhere/" in manifest.paths[0]


def test_prepare_command_writes_manifests_the_data_module_reads(places, tmp_path):
    listing = {p: p.read_bytes() for p in places.glob("*.txt")}
    out = tmp_path / "out"
    assert main(["prepare", "places365", "--root", str(places), "--out", str(out), "--exclude", "church,bedroom"]) == 0
    pool = read_manifest(out / "nonlandmarks.csv", "nonlandmark")
    assert list(pool.table.columns) == ["path", "kind"]
    assert pool.table["path"].iloc[0] == "../places365/data_256/a/airfield/00000001.jpg"  # relative to out/
    assert all(__import__("os").path.isfile(p) for p in pool.paths)
    assert len(pool) == 2 * (len(PLACES_CATEGORIES) - 3)
    val = read_manifest(out / "places365_val.csv", "nonlandmark")
    assert len(val) == len(PLACES_CATEGORIES) - 3
    assert {p: p.read_bytes() for p in places.glob("*.txt")} == listing  # inputs untouched
    summary = prepare_places365(places, tmp_path / "again", splits=["val"])
    assert set(summary) == {"val"} and not (tmp_path / "again" / "nonlandmarks.csv").exists()


def test_a_repeated_list_line_and_non_utf8_bytes_are_errors_naming_the_file(places):
    """Before: the repeat put one photo twice in the pool (exit 0); the bytes a UnicodeDecodeError traceback."""
    train = places / "places365_train_standard.txt"
    first = train.read_text().splitlines()[0]
    train.write_text(train.read_text() + first + "\n")
    count = len(train.read_text().splitlines())
    with pytest.raises(ManifestError, match=rf"places365_train_standard.txt: line {count}: image "
                                            rf"'{first.split()[0].lstrip('/')}' is listed again \(first on line 1\)"):
        read_places365(places, "train", exclude=())
    (places / "categories_places365.txt").write_bytes(b"\xff\xfe/a/airfield 0\n")
    with pytest.raises(ManifestError, match=r"categories_places365.txt: not UTF-8 text \(byte 0\)"):
        read_places365(places, "val")


@pytest.mark.parametrize("argv, named", [
    (["--exclude", ","], "--exclude names no category; give names, or 'none' to keep every category"),
    (["--exclude", ""], "--exclude names no category; give names, or 'none' to keep every category"),
    (["--splits", "train,foo"], "splits must be train, val or both, got ['train', 'foo']"),
    (["--splits", ","], "splits must be train, val or both, got []"),
])
def test_prepare_refuses_empty_or_unknown_choices_before_writing(argv, named, places, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "places365", "--root", str(places), "--out", str(out), *argv]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"landmarks prepare: error: {named}"
    assert not out.exists()


def test_prepare_writes_nothing_when_a_later_split_fails(places, tmp_path, capsys):
    """Before: nonlandmarks.csv was written, then the missing val folder stopped the run."""
    import shutil

    shutil.rmtree(places / "val_256")
    out = tmp_path / "out"
    assert main(["prepare", "places365", "--root", str(places), "--out", str(out)]) == 2
    assert "no Places365 validation image folder" in capsys.readouterr().err
    assert not out.exists()
