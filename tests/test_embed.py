"""retrieval/embed.py: correct rows, cache reuse, keying, crash resume, unreadable images, DDP."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ddp_runs import run_ranks
from PIL import Image
from torch import nn

from datamodules.images import load_rgb
from datamodules.transforms import eval_transform
from retrieval.embed import cache_folder, embed_paths
from retrieval.embedding_model import EmbeddingModel

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


class ColourNet(nn.Module):
    """Mean colour + a constant, L2-normalised; counts the rows it embeds; can fail on purpose."""

    embedding_size = 4

    def __init__(self, sign: float = 1.0, fail_on_call: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(sign))
        self.rows = 0
        self.calls = 0
        self.fail_on_call = fail_on_call

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.rows += len(images)
        features = torch.cat([images.mean(dim=(2, 3)), torch.full((len(images), 1), 0.5)], dim=1)
        return F.normalize(features * self.weight, dim=1)


def _model(net: nn.Module, name: str = "colour") -> EmbeddingModel:
    return EmbeddingModel(net, SIZE, {"test": name})


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.new("RGB", (20 + i, 12), (20 * i % 256, 255 - 9 * i, 40)).save(path)
        paths.append(str(path))
    return paths


def _expected(paths: list[str]) -> np.ndarray:
    net = ColourNet()
    transform = eval_transform(SIZE)
    with torch.no_grad():
        batch = torch.stack([transform(image=load_rgb(p, 2 * SIZE))["image"] for p in paths])
        return net(batch).numpy()


def _embed(model, paths, cache, **kw):
    kw = {"batch_size": 2, "accelerator": "cpu", "progress": False, **kw}
    return embed_paths(model, paths, cache_dir=cache, **kw)


def test_rows_match_the_network_and_unreadable_images_are_zero(tmp_path):
    paths = _images(tmp_path / "img", 5)
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    everything = paths[:2] + [str(tmp_path / "img" / "broken.jpg"), str(tmp_path / "img" / "missing.png")] + paths[2:]
    result = _embed(_model(ColourNet()), everything, None)
    assert result.embeddings.dtype == np.float32 and result.embeddings.shape == (7, 4)
    assert result.valid.tolist() == [True, True, False, False, True, True, True]
    np.testing.assert_allclose(result.embeddings[result.valid], _expected(paths), atol=1e-6)
    assert not result.embeddings[~result.valid].any()
    np.testing.assert_allclose(np.linalg.norm(result.embeddings[result.valid], axis=1), 1.0, atol=1e-6)


def test_second_call_reuses_the_cache_and_computes_nothing(tmp_path, monkeypatch):
    paths = _images(tmp_path / "img", 6)
    first_net = ColourNet()
    first = _embed(_model(first_net), paths, tmp_path / "cache")
    assert first_net.rows == 6
    # Same identity (so the same cache key) but a network whose outputs would differ: a reused
    # cache returns the first network's rows, and the forward pass is never called.
    liar = ColourNet(sign=-1.0)
    again = _embed(_model(liar), paths, tmp_path / "cache")
    assert liar.calls == 0
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    # Relative paths and a subset / other order are served from the same cache.
    monkeypatch.chdir(tmp_path)
    subset = _embed(_model(liar), [os.path.relpath(p) for p in paths[::-2]], tmp_path / "cache")
    assert liar.calls == 0
    np.testing.assert_array_equal(subset.embeddings, first.embeddings[::-2])
    # Only array files and JSON in the cache: nothing that needs pickle.
    files = sorted(p.suffix for p in cache_folder(tmp_path / "cache", _model(liar)).iterdir())
    assert set(files) == {".npy", ".json"}


def test_cache_is_keyed_by_model_and_by_file_content(tmp_path):
    paths = _images(tmp_path / "img", 4)
    cache = tmp_path / "cache"
    _embed(_model(ColourNet()), paths, cache)
    other = ColourNet(sign=-1.0)
    flipped = _embed(_model(other, name="another model"), paths, cache)
    assert other.rows == 4
    np.testing.assert_allclose(flipped.embeddings, -_expected(paths), atol=1e-6)
    # A file replaced under the same name (new size and mtime) is embedded again, alone.
    Image.new("RGB", (33, 9), (0, 0, 255)).save(paths[1])
    os.utime(paths[1], ns=(1_000_000_000, 1_000_000_000))
    net = ColourNet()
    result = _embed(_model(net), paths, cache)
    assert net.rows == 1
    np.testing.assert_allclose(result.embeddings, _expected(paths), atol=1e-6)


def test_interrupted_run_resumes_with_only_the_missing_images(tmp_path):
    paths = _images(tmp_path / "img", 10)
    cache = tmp_path / "cache"
    crashing = ColourNet(fail_on_call=4)  # batches of 2, chunks of 4 rows: one chunk survives
    with pytest.raises(RuntimeError, match="simulated crash"):
        _embed(_model(crashing), paths, cache, chunk_rows=4)
    folder = cache_folder(cache, _model(crashing))
    chunks = sorted(folder.glob("chunk-*.json"))
    assert len(chunks) == 1 and json.loads(chunks[0].read_text())["rows"] == 4
    assert not list(folder.glob(".*tmp*"))  # no half-written files left behind
    resumed_net = ColourNet()
    resumed = _embed(_model(resumed_net), paths, cache, chunk_rows=4)
    assert resumed_net.rows == 6
    uncached = _embed(_model(ColourNet()), paths, None)
    np.testing.assert_array_equal(resumed.embeddings, uncached.embeddings)
    np.testing.assert_array_equal(resumed.valid, uncached.valid)


def test_a_path_listed_twice_is_embedded_once(tmp_path):
    paths = _images(tmp_path / "img", 3)
    net = ColourNet()
    result = _embed(_model(net), [paths[0], paths[1], paths[0], paths[2]], tmp_path / "cache")
    assert net.rows == 3
    np.testing.assert_array_equal(result.embeddings[0], result.embeddings[2])
    empty = _embed(_model(net), [], tmp_path / "cache")
    assert empty.embeddings.shape == (0, 4) and empty.valid.shape == (0,)


# What both DDP scripts start with: the imports and a net whose embedding is an image's mean
# colour (it counts the rows it embedded).
_COLOUR_NET_SCRIPT = """
import json, os, sys
import numpy as np, torch, torch.nn.functional as F
from torch import nn
sys.path.insert(0, {root!r})
import retrieval.embed as embed
from retrieval.embed import embed_paths
from retrieval.embedding_model import EmbeddingModel

class ColourNet(nn.Module):
    embedding_size = 4
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(1.0))
        self.rows = 0
    def forward(self, images):
        self.rows += len(images)
        f = torch.cat([images.mean(dim=(2, 3)), torch.full((len(images), 1), 0.5)], dim=1)
        return F.normalize(f * self.weight, dim=1)

"""

_DDP_SCRIPT = _COLOUR_NET_SCRIPT + """
paths, cache, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = {{}}
# Twice in one script: without a cache (rank 0's temporary folder), then with one; the second
# Trainer joins the process group the first one created.
for name, cache_dir in (("nocache", None), ("cache", cache)):
    net = ColourNet()
    result = embed_paths(EmbeddingModel(net, {size}, {{"test": "colour"}}), paths, batch_size=2, accelerator="cpu",
                         devices=2, strategy="ddp", cache_dir=cache_dir, progress=False)
    rank = torch.distributed.get_rank()
    np.save(f"{{out}}-{{name}}-emb{{rank}}.npy", result.embeddings)
    np.save(f"{{out}}-{{name}}-valid{{rank}}.npy", result.valid)
    rows[name] = net.rows
json.dump(rows, open(f"{{out}}-rows{{rank}}.json", "w"))
"""


@pytest.mark.slow
def test_ddp_two_cpu_ranks_each_embed_a_part_and_all_get_everything(tmp_path):
    paths = _images(tmp_path / "img", 9)
    paths.insert(4, str(tmp_path / "img" / "missing.png"))
    script = tmp_path / "embed_ddp.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(root=str(ROOT), size=SIZE)))
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    done = run_ranks([sys.executable, str(script), json.dumps(paths), str(tmp_path / "cache"), str(tmp_path / "out")],
                     env=env, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    single = _embed(_model(ColourNet()), paths, None)
    for name in ("nocache", "cache"):
        for rank in (0, 1):
            np.testing.assert_allclose(np.load(tmp_path / f"out-{name}-emb{rank}.npy"), single.embeddings, atol=1e-6)
            np.testing.assert_array_equal(np.load(tmp_path / f"out-{name}-valid{rank}.npy"), single.valid)
    rows = [json.loads((tmp_path / f"out-rows{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["nocache"] for r in rows] == [5, 5] and [r["cache"] for r in rows] == [5, 5]  # disjoint halves
    folder = next((tmp_path / "cache").glob("embeddings-*"))
    assert sum(json.loads(p.read_text())["rows"] for p in folder.glob("chunk-*.json")) == 10
    assert not list((tmp_path / "tmp").iterdir())  # temporary caches are removed by every rank



_DISAGREE_SCRIPT = _COLOUR_NET_SCRIPT + """
first, second, cache, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
if os.environ.get("LOCAL_RANK") == "1":
    # Rank 1's look at the cache before the second pass finds every image there, as if another
    # job had just written them; rank 0's look, moments earlier, found none.
    looks, real_lookup = [], embed._lookup
    def lookup(folder, paths, stamps, dim):
        looks.append(1)
        chunk_of, row_of, chunks = real_lookup(folder, paths, stamps, dim)
        if len(looks) == 3:  # looks 1-2: the first pass (before, after predict); 3: before the second
            chunk_of, row_of = np.zeros_like(chunk_of), np.zeros_like(row_of)
        return chunk_of, row_of, chunks
    embed._lookup = lookup
for name, paths in (("first", first), ("second", second)):
    result = embed.embed_paths(EmbeddingModel(ColourNet(), {size}, {{"test": "colour"}}), paths, batch_size=2,
                               accelerator="cpu", devices=2, strategy="ddp", cache_dir=cache, progress=False)
    np.save(f"{{out}}-{{name}}-emb{{torch.distributed.get_rank()}}.npy", result.embeddings)
"""


@pytest.mark.slow
def test_ddp_ranks_follow_rank_0_when_their_looks_at_the_cache_disagree(tmp_path):
    paths = _images(tmp_path / "img", 8)
    first, second = paths[:4], paths[4:]
    script = tmp_path / "disagree.py"
    script.write_text(textwrap.dedent(_DISAGREE_SCRIPT.format(root=str(ROOT), size=SIZE)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # Before the fix rank 1 skipped the second predict, and rank 0, inside it, failed with gloo's
    # 'Connection closed by peer' once rank 1 exited (or waited, had rank 1 lived on).
    done = run_ranks([sys.executable, str(script), json.dumps(first), json.dumps(second), str(tmp_path / "cache"),
                      str(tmp_path / "out")], env=env, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    single = _embed(_model(ColourNet()), second, None)
    for rank in (0, 1):  # rank 1 took part in the pass and read the real rows back
        np.testing.assert_allclose(np.load(tmp_path / f"out-second-emb{rank}.npy"), single.embeddings, atol=1e-6)

def test_loader_workers_start_from_a_fork_server_only_in_a_ddp_rank():
    import multiprocessing

    from retrieval.embed import _worker_start

    # one process, or no workers: the default (fork), which shares the parent's memory
    assert _worker_start(2, 1) is None and _worker_start(0, 2) is None
    # a DDP rank has threads, and Python <= 3.11.7 can deadlock a child forked next to one of them
    context = _worker_start(2, 2)
    assert context is multiprocessing.get_context("forkserver")
    from multiprocessing import forkserver

    assert {"torch", "datamodules.datasets"} <= set(forkserver._forkserver._preload_modules)
