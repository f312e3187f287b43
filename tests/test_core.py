"""core/: the atomic writer, the text-CSV reader and the empty-ratio rule."""

import json
import math

import numpy as np
import pytest

from core.atomic import atomic_path, replace_dir, save_npy_atomic, write_json_atomic, write_text_atomic
from core.errors import UserError
from core.tables import json_number, ratio, read_text_csv


def test_atomic_path_replaces_on_success_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "plot.png"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.png.tmp-")
        assert not tmp.exists()
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible before the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_atomic_path_leaves_the_old_file_and_no_temporary_on_error(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_text_json_and_npy_writers(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "héllo")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    write_json_atomic(tmp_path / "b.json", {"x": 1}, indent=None, newline=False)
    assert (tmp_path / "b.json").read_text() == '{"x": 1}'
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "c.json", {"x": math.nan}, allow_nan=False)
    assert not (tmp_path / "c.json").exists()
    save_npy_atomic(tmp_path / "v.npy", np.arange(3, dtype=np.float32))
    assert np.load(tmp_path / "v.npy", allow_pickle=False).tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.txt", "b.json", "v.npy"]


def test_replace_dir_swaps_a_folder_in_whole(tmp_path):
    target, new = tmp_path / "index", tmp_path / ".index.tmp"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    fresh = tmp_path / ".fresh"
    fresh.mkdir()
    replace_dir(fresh, tmp_path / "other")
    assert (tmp_path / "other").is_dir() and not fresh.exists()


def test_read_text_csv_keeps_text_and_names_the_file(tmp_path):
    path = tmp_path / "db.csv"
    path.write_text("path,landmark_id\na.jpg,0123\nb.jpg,\n")
    table = read_text_csv(path)
    assert table["landmark_id"].tolist() == ["0123", ""]

    class MyError(UserError):
        pass

    with pytest.raises(MyError, match="manifest not found: .*missing.csv"):
        read_text_csv(tmp_path / "missing.csv", "manifest", MyError)
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"path\n\xff\xfe\x00bad")
    with pytest.raises(UserError, match="bad.csv: not a readable CSV"):
        read_text_csv(bad)


def test_ratio_is_nan_when_nothing_was_counted_and_null_in_json():
    assert ratio(1, 4) == 0.25
    assert math.isnan(ratio(0, 0)) and math.isnan(ratio(3, 0))
    assert json_number(ratio(0, 0)) is None
    assert json_number(ratio(1, 3), 4) == 0.3333
    assert json.dumps({"p": json_number(math.nan)}) == '{"p": null}'


def test_read_text_csv_refuses_a_shifted_first_row_and_a_folder(tmp_path):
    """Before: a first data row longer than the header (a trailing comma on every line, say) made
    pandas take the first column as the index, so every column held its neighbour's values."""
    from core.errors import UserError
    from core.tables import read_text_csv

    trailing = tmp_path / "trailing.csv"
    trailing.write_text("path,landmark_id\na.jpg,1,\nb.jpg,2,\n")
    with pytest.raises(UserError, match=r"trailing.csv: line 2 has more fields than the header's columns"):
        read_text_csv(trailing)
    later = tmp_path / "later.csv"
    later.write_text("path,landmark_id\na.jpg,1\nb.jpg,2,x\n")
    with pytest.raises(UserError, match=r"later.csv: not a readable CSV .*Expected 2 fields in line 3, saw 3"):
        read_text_csv(later)
    with pytest.raises(UserError, match=r"manifest is a folder, not a file: "):
        read_text_csv(tmp_path, "manifest")
    fine = tmp_path / "fine.csv"
    fine.write_text("path,landmark_id\n0123.jpg,0123\nb.jpg,\n")
    assert read_text_csv(fine).values.tolist() == [["0123.jpg", "0123"], ["b.jpg", ""]]
