"""Manifests and image decoding: every kind of bad input gets a clear error or the skip policy."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datamodules.images import UnreadableImage, load_rgb
from datamodules.manifest import ClassMap, ManifestError, read_image_folder, read_manifest, write_manifest

REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "realphotos"


def _jpeg(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_manifest_roundtrip_resolves_relative_paths(tmp_path):
    _jpeg(tmp_path / "img" / "a.jpg")
    _jpeg(tmp_path / "img" / "b.jpg")
    table = pd.DataFrame({"path": ["img/a.jpg", "img/b.jpg"], "landmark_id": ["0123", "7"], "lat": ["1.5", ""]})
    write_manifest(table, tmp_path / "db.csv")
    manifest = read_manifest(tmp_path / "db.csv")
    assert manifest.paths == [str(tmp_path / "img/a.jpg"), str(tmp_path / "img/b.jpg")]
    assert manifest.landmark_ids == ["0123", "7"]  # leading zero survives: ids are text
    pd.testing.assert_frame_equal(manifest.table, table)
    assert not list(tmp_path.glob(".db.csv.tmp*"))


def test_missing_column_names_file_and_column(tmp_path):
    (tmp_path / "db.csv").write_text("path,landmark\nx.jpg,1\n")
    with pytest.raises(ManifestError, match=r"db\.csv.*missing required column.*landmark_id"):
        read_manifest(tmp_path / "db.csv")


def test_unknown_extra_column_is_an_error_unless_ignored(tmp_path):
    (tmp_path / "db.csv").write_text("path,landmark_id,landmarkname\nx.jpg,1,Eiffel\n")
    with pytest.raises(ManifestError, match=r"unknown column.*landmarkname"):
        read_manifest(tmp_path / "db.csv")
    assert read_manifest(tmp_path / "db.csv", extra_columns="ignore").landmark_ids == ["1"]


def test_empty_landmark_id_names_the_line(tmp_path):
    (tmp_path / "db.csv").write_text("path,landmark_id\na.jpg,1\nb.jpg,\n")
    with pytest.raises(ManifestError, match=r"line 3: empty 'landmark_id'"):
        read_manifest(tmp_path / "db.csv")


def test_column_map_reads_foreign_csv(tmp_path):
    (tmp_path / "m.csv").write_text("relpath,label\na.jpg,eiffel\n")
    manifest = read_manifest(tmp_path / "m.csv", column_map={"path": "relpath", "landmark_id": "label"})
    assert manifest.landmark_ids == ["eiffel"]


def test_class_map_is_numeric_order_and_unknown_id_is_an_error():
    class_map = ClassMap.from_ids(["10", "9", "100", "9"])
    assert class_map.landmark_ids == ("9", "10", "100")
    assert class_map.encode(["100", "9"]).tolist() == [2, 0]
    with pytest.raises(ManifestError, match=r"queries\.csv: line 3: landmark_id '5'"):
        class_map.encode(["9", "5"], "queries.csv")


def test_image_folder_layout(tmp_path):
    _jpeg(tmp_path / "lm" / "b_tower" / "2.jpg")
    _jpeg(tmp_path / "lm" / "a_gate" / "1.jpg")
    (tmp_path / "lm" / "a_gate" / "notes.txt").write_text("not an image")
    manifest = read_image_folder(tmp_path / "lm")
    assert manifest.landmark_ids == ["a_gate", "b_tower"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no images"):
        read_image_folder(tmp_path / "empty")


# ---- decoding -----------------------------------------------------------------------------


def test_cmyk_grey_rgba_16bit_all_become_rgb(tmp_path):
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    Image.new("L", (20, 10), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (20, 10), (0, 0, 255, 0)).save(tmp_path / "clear.png")  # fully transparent
    Image.fromarray(np.full((10, 20), 65535 // 2, dtype=np.uint16)).save(tmp_path / "deep.png")
    before = _digest(tmp_path)
    red = load_rgb(tmp_path / "cmyk.jpg")
    assert red.shape == (10, 20, 3) and red.dtype == np.uint8
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 60
    assert (load_rgb(tmp_path / "grey.png") == 77).all()
    assert (load_rgb(tmp_path / "clear.png") == 255).all()  # transparent → white background
    half = load_rgb(tmp_path / "deep.png")
    assert abs(int(half.mean()) - 128) <= 1  # rescaled, not clipped to 255
    assert _digest(tmp_path) == before  # inputs are never modified


def test_exif_rotation_is_applied(tmp_path):
    # Stored 40 wide x 20 high, blue with a red top-left quadrant (x < 20, y < 10).
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    shown = load_rgb(tmp_path / "rot.jpg").astype(int)
    assert shown.shape == (40, 20, 3)  # width and height swap: 20 wide x 40 high
    # Turning 90° clockwise moves the stored top-left corner to the top-right: the red quadrant is
    # now x >= 10, y < 20. Look at each quadrant's centre (JPEG blurs the edges).
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    centres = {"top_left": (10, 5), "top_right": (10, 15), "bottom_left": (30, 5), "bottom_right": (30, 15)}
    for name, (y, x) in centres.items():
        expected = red if name == "top_right" else blue
        assert np.abs(shown[y, x] - expected).max() < 40, (name, shown[y, x])


def test_huge_image_is_downscaled_on_decode(tmp_path):
    Image.new("RGB", (6000, 4000), (1, 2, 3)).save(tmp_path / "big.jpg", quality=70)
    out = load_rgb(tmp_path / "big.jpg", max_side=192)
    assert max(out.shape[:2]) == 192 and out.shape[:2] == (128, 192)


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "garbage"])
def test_unreadable_images_raise_naming_the_file(tmp_path, case):
    path = tmp_path / f"{case}.jpg"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        _jpeg(path, size=(300, 300))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "garbage":
        path.write_bytes(os.urandom(500))
    with pytest.raises(UnreadableImage, match=re.escape(str(path))):
        load_rgb(path)


def test_real_photos_load_through_the_same_readers():
    if not (REAL_PHOTOS / "MANIFEST.csv").is_file():
        pytest.skip(f"real photos not found at {REAL_PHOTOS} (shared data is only on development machines)")
    landmarks = read_image_folder(REAL_PHOTOS / "landmarks")
    nonlandmarks = read_image_folder(REAL_PHOTOS / "nonlandmarks", kind="nonlandmark")
    assert len(set(landmarks.landmark_ids)) == 15
    assert len(landmarks) == 246 and len(nonlandmarks) == 164
    via_csv = read_manifest(
        REAL_PHOTOS / "MANIFEST.csv", column_map={"path": "relpath", "landmark_id": "label"}, extra_columns="ignore"
    )
    assert len(via_csv) == 410
    for path in landmarks.paths[::25] + nonlandmarks.paths[::25]:
        image = load_rgb(path, max_side=192)
        assert image.ndim == 3 and image.shape[2] == 3 and max(image.shape[:2]) <= 192


def test_class_order_does_not_depend_on_hash_seed():
    ids = ["07", "7", "007", "b", "a", "10"]
    assert ClassMap.from_ids(ids).landmark_ids == ("007", "07", "7", "10", "a", "b")
    assert ClassMap.from_ids(list(reversed(ids))).landmark_ids == ClassMap.from_ids(ids).landmark_ids
    assert ClassMap.from_ids(["--5", "3"]).landmark_ids == ("3", "--5")  # not an integer: no crash


def test_nonlandmark_label_is_not_a_landmark_id(tmp_path):
    (tmp_path / "db.csv").write_text("path,landmark_id\na.jpg,4\nb.jpg,-1\n")
    with pytest.raises(ManifestError, match=r"line 3: landmark_id '-1' is not a landmark id"):
        read_manifest(tmp_path / "db.csv")


def test_line_numbers_survive_dropped_rows(tmp_path):
    (tmp_path / "q.csv").write_text("path,landmark_id\na.jpg,1\nb.jpg,1\nc.jpg,99\n")
    manifest = read_manifest(tmp_path / "q.csv").subset(np.array([False, True, True]))
    with pytest.raises(ManifestError, match=r"q\.csv: line 4: landmark_id '99'"):
        ClassMap.from_ids(["1"]).encode(manifest.landmark_ids, manifest.source, manifest.lines)
