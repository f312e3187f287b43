"""The real-photo set (datamodules/realphotos.py) and the `landmarks realphotos` recipe
(cli/realphotos.py): reader and split logic on a fake manifest, and a small smoke check on
../shared/realphotos (skipped when it is absent)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from datamodules.manifest import ManifestError
from datamodules.realphotos import alternate_split, class_disjoint_split, read_realphotos, split_realphotos

ROOT = Path(__file__).resolve().parents[1]
REALPHOTOS = ROOT.parent / "shared" / "realphotos"


def _fake_table() -> pd.DataFrame:
    rows = []
    for label, n in [("a", 5), ("b", 4), ("c", 6), ("d", 3), ("e", 4)]:
        rows += [(f"/x/{label}/{k}.jpg", label, "landmark", "repo/l") for k in range(n)]
    rows += [(f"/x/nl/web{k}.jpg", "nonlandmark", "nonlandmark", "repo/web") for k in range(12)]
    rows += [(f"/x/nl/sk{k}.jpg", "nonlandmark", "nonlandmark", "repo/sk") for k in range(6)]
    return pd.DataFrame(rows, columns=["path", "label", "kind", "source_repo"])


def test_split_is_class_disjoint_complete_and_halved():
    table = _fake_table()
    split = class_disjoint_split(table, seed=3, train_landmarks=2, train_nonlandmarks=6)
    train, evaluated = set(split["train_db"]["label"]), set(split["gallery"]["label"])
    assert len(train) == 2 and train.isdisjoint(evaluated) and train | evaluated == set("abcde")
    assert set(split["queries"]["label"]) <= evaluated
    sizes = table[table["kind"] == "landmark"].groupby("label").size()
    for label in evaluated:  # half (rounded up) to the gallery, the rest to the queries, no overlap
        g = split["gallery"][split["gallery"]["label"] == label]["path"]
        q = split["queries"][split["queries"]["label"] == label]["path"]
        assert (len(g), len(q)) == (math.ceil(sizes[label] / 2), sizes[label] // 2)
        assert set(g).isdisjoint(q)
    for label in train:  # every photo of a training landmark is trained on
        assert (split["train_db"]["label"] == label).sum() == sizes[label]
    nl_train, nl_eval = set(split["train_nonlandmarks"]["path"]), set(split["distractors"]["path"])
    assert len(nl_train) == 6 and nl_train.isdisjoint(nl_eval) and len(nl_train | nl_eval) == 18
    # Stratified by source: 12 web + 6 scikit-image photos → 4 + 2 in the training part.
    assert split["train_nonlandmarks"]["source_repo"].value_counts().to_dict() == {"repo/web": 4, "repo/sk": 2}
    assert (split["distractors"]["kind"] == "nonlandmark").all()


def test_split_is_deterministic_per_seed_and_varies_across_seeds():
    table = _fake_table()
    a = class_disjoint_split(table, seed=0, train_landmarks=2, train_nonlandmarks=6)
    b = class_disjoint_split(table, seed=0, train_landmarks=2, train_nonlandmarks=6)
    assert all(a[k].equals(b[k]) for k in a)
    chosen = {frozenset(class_disjoint_split(table, seed=s, train_landmarks=2, train_nonlandmarks=6)["train_db"]["label"])
              for s in range(8)}
    assert len(chosen) > 1
    with pytest.raises(ValueError, match="train_landmarks"):
        class_disjoint_split(table, seed=0, train_landmarks=5)


def test_reader_resolves_paths_and_names_bad_lines(tmp_path):
    header = "relpath,label,kind,source_repo,source_path,license_note\n"
    good = "landmarks/a/1.jpg,a,landmark,repo/l,x,y\nnonlandmarks/2.jpg,nonlandmark,nonlandmark,repo/w,x,y\n"
    (tmp_path / "MANIFEST.csv").write_text(header + good)
    table = read_realphotos(tmp_path)
    assert list(table.columns) == ["path", "label", "kind", "source_repo"]
    assert table["path"].tolist() == [str(tmp_path / "landmarks/a/1.jpg"), str(tmp_path / "nonlandmarks/2.jpg")]
    (tmp_path / "MANIFEST.csv").write_text(header + good + "x/3.jpg,b,nonlandmark,repo/w,x,y\n")
    with pytest.raises(ManifestError, match=r"MANIFEST.csv: line 4: kind and label disagree"):
        read_realphotos(tmp_path)
    (tmp_path / "MANIFEST.csv").write_text("path,label,kind\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['relpath', 'source_repo'\]"):
        read_realphotos(tmp_path)
    with pytest.raises(ManifestError, match="real-photo manifest not found: .*nowhere/MANIFEST.csv"):
        read_realphotos(tmp_path / "nowhere")


def test_full_set_split_uses_every_landmark_and_all_nonlandmarks():
    table = _fake_table()
    split = split_realphotos(table)
    assert set(split["gallery"]["label"]) == set("abcde") and len(split["distractors"]) == 18
    assert len(split["gallery"]) + len(split["queries"]) == 22


def test_alternate_split_takes_even_sorted_positions_as_the_gallery():
    # issue 17's protocol: per landmark, paths sorted; shuffled input must not change the answer
    table = _fake_table().sample(frac=1.0, random_state=3).reset_index(drop=True)
    split = alternate_split(table)
    a = split["gallery"][split["gallery"]["label"] == "a"]["path"].tolist()
    assert a == ["/x/a/0.jpg", "/x/a/2.jpg", "/x/a/4.jpg"]  # 5 photos: positions 0, 2, 4
    assert split["queries"][split["queries"]["label"] == "a"]["path"].tolist() == ["/x/a/1.jpg", "/x/a/3.jpg"]
    assert len(split["gallery"]) == 3 + 2 + 3 + 2 + 2 and len(split["queries"]) == 2 + 2 + 3 + 1 + 2
    assert len(split["distractors"]) == 18 and set(split["distractors"]["kind"]) == {"nonlandmark"}
    # halves by sorted name: a, c, e → A; b, d → B, the same on both sides of the split
    for part in ("gallery", "queries"):
        assert dict(zip(split[part]["label"], split[part]["half"])) == {"a": "A", "b": "B", "c": "A", "d": "B", "e": "A"}
    assert split["gallery"].equals(alternate_split(_fake_table())["gallery"])


@pytest.mark.skipif(not (REALPHOTOS / "MANIFEST.csv").is_file(),
                    reason=f"real photos not available at {REALPHOTOS} (they are never copied into the project)")
def test_real_photos_smoke_imagenet_recognises_three_landmarks():
    from cli.realphotos import evaluate
    from retrieval.embedding_model import load_embedding_model

    table = read_realphotos(REALPHOTOS)
    assert (table["kind"] == "landmark").sum() == 246 and (table["kind"] == "nonlandmark").sum() == 164
    assert table.loc[table["kind"] == "landmark", "label"].nunique() == 15
    # A small, quick subset: three very different landmarks, 6 photos each, 20 distractors.
    picked = table[table["label"].isin(["ha_long_bay", "brandenburg_gate", "ho_chi_minh_mausoleum"])]
    picked = picked.groupby("label", group_keys=False).head(6)
    small = pd.concat([picked, table[table["kind"] == "nonlandmark"].head(20)], ignore_index=True)
    split = split_realphotos(small)
    metrics = evaluate(load_embedding_model(backbone="mobilenetv2_100", image_size=96), split)
    assert metrics["n_queries"] == 9 and metrics["n_gallery"] == 9 and metrics["n_distractors"] == 20
    # ImageNet features separate three such different landmarks far above chance (1/3).
    assert metrics["p@1"] >= 2 / 3


def test_the_epoch_curve_ends_at_the_final_model_and_does_not_change_the_fit(tiny_world, tmp_path):
    """`landmarks realphotos --curve --wise-ft 0 1` on a stand-in for the real photos (the tiny
    synthetic world): one point per epoch, the last one scoring exactly the final model, and the
    fit the same as a run without the curve (saving the weights draws no random numbers)."""
    from cli.realphotos import run_realphotos

    db = pd.read_csv(tiny_world / "db.csv", dtype=str)
    db = db[db.is_noise == "0"]
    rows = [(str(tiny_world / p), f"lm{lm}", "landmark", "synth/db") for p, lm in zip(db.path, db.landmark_id)]
    others = [p for name in ("nonlandmarks", "distractors", "calibration")
              for p in pd.read_csv(tiny_world / f"{name}.csv", dtype=str).path]
    rows += [(str(tiny_world / p), "nonlandmark", "nonlandmark", f"synth/{i % 2}") for i, p in enumerate(others)]
    root = tmp_path / "photos"
    root.mkdir()
    pd.DataFrame(rows, columns=["relpath", "label", "kind", "source_repo"]).to_csv(root / "MANIFEST.csv", index=False)
    settings = dict(seeds=[0], train_landmarks=4, train_nonlandmarks=30, image_size=32, epochs=2, workers=0)
    with_curve = run_realphotos(root, tmp_path / "curve", every_epoch=True, wise_ft_alphas=[0.0, 1.0],
                                **settings)["seeds"]["0"]
    plain = run_realphotos(root, tmp_path / "plain", **settings)["seeds"]["0"]
    points = with_curve["curve"]
    assert [p["epoch"] for p in points] == [1, 2] and "curve" not in plain
    for name in ("fine-tuned, 512-d head", "fine-tuned backbone (GeM, no head)"):
        assert points[-1][name] == with_curve["metrics"][name] == plain["metrics"][name]
    assert points[0]["fine-tuned, 512-d head"] != points[1]["fine-tuned, 512-d head"]  # the model moved
    assert not list((tmp_path / "curve" / "seed0" / "epochs").glob("*.ckpt"))  # scored, then deleted
    # WiSE-FT's ends are the ImageNet start and the fine-tuned backbone, scored on the same sets.
    rows = with_curve["metrics"]
    assert rows["WiSE-FT backbone, alpha 0"] == rows["ImageNet MobileNetV2 (GeM)"]
    assert rows["WiSE-FT backbone, alpha 1"] == rows["fine-tuned backbone (GeM, no head)"]


def test_wise_ft_interpolates_every_weight_and_keeps_its_ends_exact():
    """WiSE-FT: alpha 0 is the start network and 1 the fine-tuned one, bit for bit; 0.25 puts
    every floating weight (BatchNorm statistics included) a quarter of the way; a network of
    another architecture and an alpha outside [0, 1] are refused."""
    import torch

    from cli.realphotos import wise_ft
    from core.errors import UserError
    from lightning_modules import EmbeddingNet
    from retrieval.embedding_model import EmbeddingModel

    def model(seed: int, backbone: str = "mobilenetv2_050") -> EmbeddingModel:
        torch.manual_seed(seed)
        net = EmbeddingNet(backbone, pretrained=False, embedding_size=None)
        for module in net.modules():  # distinct BatchNorm statistics, so they are checked too
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
        return EmbeddingModel(net.eval(), 32, {"source": "test", "seed": seed})

    start, tuned = model(0), model(1)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for alpha, expected in ((0.0, start), (1.0, tuned)):
            assert torch.equal(wise_ft(start, tuned, alpha).net(images), expected.net(images))
    mixed = wise_ft(start, tuned, 0.25)
    a, b, m = start.net.state_dict(), tuned.net.state_dict(), mixed.net.state_dict()
    name = "backbone.bn1.running_mean"
    assert torch.allclose(m[name], 0.75 * a[name] + 0.25 * b[name]) and not torch.allclose(m[name], b[name])
    floating = [k for k in m if m[k].is_floating_point()]
    assert all(torch.allclose(m[k], 0.75 * a[k] + 0.25 * b[k]) for k in floating)
    assert mixed.identity["wise_ft"] == {"alpha": 0.25, "start": start.identity} and mixed.key != tuned.key
    assert torch.equal(tuned.net.state_dict()[name], b[name])  # the inputs are not modified
    with pytest.raises(UserError, match="alpha"):
        wise_ft(start, tuned, 1.5)
    with pytest.raises(ValueError, match="one architecture"):
        wise_ft(start, model(2, "mobilenetv2_100"), 0.5)


def test_output_ensemble_scores_the_weighted_sum_of_the_two_cosines():
    """The ensemble's cosine of two photos is (1 - alpha) x the start's + alpha x the fine-tune's,
    by hand; its rows are unit rows (FAISS and the index take them as any other); alpha 0 ranks
    exactly as the start; the two networks' identities are recorded; a bad alpha is refused."""
    import torch
    import torch.nn.functional as F

    from cli.realphotos import output_ensemble
    from core.errors import UserError
    from lightning_modules import EmbeddingNet
    from retrieval.embedding_model import EmbeddingModel

    def model(seed: int) -> EmbeddingModel:
        torch.manual_seed(seed)
        return EmbeddingModel(EmbeddingNet("mobilenetv2_050", pretrained=False, embedding_size=None).eval(), 32,
                              {"source": "test", "seed": seed})

    start, tuned = model(0), model(1)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        a, b = F.normalize(start.net(images), dim=1), F.normalize(tuned.net(images), dim=1)
        for alpha in (0.0, 0.25, 1.0):
            rows = output_ensemble(start, tuned, alpha).net(images)
            assert rows.shape == (4, a.shape[1] + b.shape[1])
            torch.testing.assert_close(rows.norm(dim=1), torch.ones(4))
            torch.testing.assert_close(rows @ rows.T, (1 - alpha) * (a @ a.T) + alpha * (b @ b.T), atol=1e-5, rtol=0)
    mixed = output_ensemble(start, tuned, 0.25)
    assert mixed.identity == {"ensemble": {"alpha": 0.25, "start": start.identity, "tuned": tuned.identity}}
    assert mixed.embedding_size == a.shape[1] + b.shape[1] and mixed.key not in (start.key, tuned.key)
    with pytest.raises(UserError, match="alpha"):
        output_ensemble(start, tuned, -0.1)


def test_a_bad_alpha_is_refused_before_any_fine_tuning(tmp_path, capsys):
    from cli.main import main

    for option in ("--ensemble", "--wise-ft"):
        assert main(["realphotos", option, "0.25", "1.5", "--out", str(tmp_path / "run")]) == 2
        assert f"landmarks realphotos: error: argument {option}: must lie in [0, 1], got '1.5'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
