"""Tar shards in the WebDataset format: millions of photos as a few thousand files.

On a cluster, millions of small JPEGs on shared storage are what breaks first (metadata load,
per-rank file lists). ``landmarks prepare shards`` packs a manifest's images, pre-resized, into
tar files written with :mod:`webdataset` (``<key>.jpg`` + ``<key>.json`` per sample, readable
by any WebDataset pipeline and by ``tar``). Why webdataset and not ``litdata``: plain tar is an
open format every tool reads, the library is three small pure-Python dependencies, and its
rank/worker shard splitting is what the streaming pass needs; litdata's chunk format is its own
and its samplers shuffle by chunk, so they cannot draw P×K batches either.

A shard set is a folder::

    shardset.json          format name + version, shard list (file, samples, bytes), settings
    samples.csv            the source manifest's columns + key, shard, offset, size per sample
    shard-000000.tar       the images
    shard-000000.json      the shard's member offsets (written last: the shard is complete)

It is read in two ways, both giving the same samples:

* **Random access** (training, evaluation): :class:`ShardReader` seeks to a member's recorded
  byte offset. The data module's P×K sampler, its mid-epoch resume and its per-rank slicing are
  the ones used for image files, so batch composition over shards is *exactly* that of the
  map-style path (a per-class shard index: ``samples.csv`` knows where every class's images are).
  It needs a file system with cheap seeks (local disk, NFS, Lustre, GPFS); an object store would
  need the streaming pass.
* **Streaming** (:class:`ShardStream`, whole-set passes such as embedding a database): webdataset
  reads each tar front to back; shards are split across DDP ranks, then across loader workers
  (``webdataset.split_by_node`` / ``split_by_worker``), so every sample is read exactly once in
  all; ranks get unequal counts when the shard count does not divide evenly.

Bad input: a shard whose size differs from what ``prepare`` recorded (truncated, rewritten) is an
error naming it, or with ``on_bad_image="skip"`` its samples are dropped with a logged count; a
member whose tar header does not carry the expected name, or whose bytes do not decode, is an
unreadable image naming the shard and byte offset (the data module's counted skip). A shard set
of another format version, or of another kind than the one read, is refused with both named; a
malformed ``shardset.json`` or ``samples.csv`` row is an error naming the key or line.
``prepare`` writes each shard to a temporary file and renames it, then its offsets file; run
again, it skips finished shards. A manifest with no image to pack is an error, and no set is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset

from core.atomic import atomic_path, write_json_atomic
from core.tables import read_text_csv
from datamodules.images import UnreadableImage, decode_rgb
from datamodules.manifest import Manifest, ManifestError, ManifestKind, load_manifest, manifest_from_table

log = logging.getLogger(__name__)

FORMAT = "landmark-shards"
VERSION = 1
SHARDSET = "shardset.json"
SAMPLES = "samples.csv"
LOCATION_COLUMNS = ("key", "shard", "offset", "size")
_TAR_BLOCK = 512


class ShardError(ManifestError):
    """A shard set cannot be used as given; the message names the shard (and offset)."""


# ---- writing --------------------------------------------------------------------------------


def _member_bytes(path: str, max_side: int, quality: int) -> bytes:
    """The JPEG stored for ``path``: its own bytes when it already is a small upright JPEG
    (no generation loss), else decoded at ≤ ``max_side`` and re-encoded. Raises UnreadableImage."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UnreadableImage(f"{path}: cannot read ({err})") from err
    rgb = decode_rgb(data, path, max_side=max_side)  # validates the file whatever is stored
    with Image.open(io.BytesIO(data)) as image:
        upright = image.getexif().get(0x0112, 1) == 1
        if image.format == "JPEG" and image.mode in ("RGB", "L") and upright and max(image.size) <= max_side:
            return data
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _member_offsets(tar_path: Path) -> dict[str, tuple[int, int]]:
    """``{member name: (data offset, size)}`` of a finished tar file."""
    with tarfile.open(tar_path, "r:") as archive:
        return {m.name: (m.offset_data, m.size) for m in archive if m.isfile()}


def _write_shard(job: dict) -> dict:
    """Write one shard (in a worker process); returns its offsets record (also written to disk)."""
    import webdataset as wds

    out, name = Path(job["out"]), job["name"]
    samples, skipped = [], []
    with atomic_path(out / f"{name}.tar") as tmp:
        with open(tmp, "wb") as stream:
            # Fixed mtime and owner: the same input gives the same bytes. Plain ustar headers (the
            # names are short): pax would add a second header per member (a float mtime needs
            # one), doubling the tar parsing of every streaming pass.
            writer = wds.TarWriter(stream, mtime=0, user="landmarks", group="landmarks", mode=0o444,
                                   format=tarfile.USTAR_FORMAT)
            try:
                for row, path, line, meta in job["rows"]:
                    try:
                        data = _member_bytes(path, job["max_side"], job["quality"])
                    except UnreadableImage as err:
                        if job["on_bad_image"] == "error":
                            raise ShardError(f"{job['source']}: line {line}: {err}") from err
                        skipped.append([int(line), str(err)])
                        continue
                    key = f"{row:09d}"
                    writer.write({"__key__": key, "jpg": data, "json": json.dumps(meta).encode()})
                    samples.append(key)
            finally:
                writer.close()  # on failure too: the temporary file is removed, never renamed
        offsets = _member_offsets(tmp)
        filesize = tmp.stat().st_size
    record = {
        "format": FORMAT, "version": VERSION, "shard": f"{name}.tar", "filesize": filesize,
        "samples": [[key, *offsets[f"{key}.jpg"]] for key in samples], "skipped": skipped,
    }
    write_json_atomic(out / f"{name}.json", record, indent=None)
    return record


def _shard_done(out: Path, name: str) -> dict | None:
    """The offsets record of a finished shard, or None (missing, or the tar does not match it)."""
    record_path, tar_path = out / f"{name}.json", out / f"{name}.tar"
    if not record_path.is_file() or not tar_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("filesize") == tar_path.stat().st_size else None


def _holds_finished_shard(out: Path) -> bool:
    return any(_shard_done(out, p.stem) is not None for p in out.glob("shard-*.json"))


def _discard_empty_set(out: Path, jobs: list[dict], marker: Path) -> None:
    """Remove the shards (all empty) and the marker of a run that packed no image, so that a
    rerun with a fixed manifest starts afresh instead of being refused or resuming empty shards."""
    for job in jobs:
        for suffix in (".tar", ".json"):
            (out / f"{job['name']}{suffix}").unlink(missing_ok=True)
    marker.unlink(missing_ok=True)


def _fingerprint(manifest: Manifest, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    source = Path(manifest.source)
    if source.is_file():
        digest.update(source.read_bytes())
    else:
        digest.update("\n".join(manifest.paths).encode())
    return digest.hexdigest()


def prepare_shards(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kind: ManifestKind | Literal["auto"] = "auto",
    max_side: int = 256,
    quality: int = 90,
    samples_per_shard: int = 1000,
    workers: int = 1,
    on_bad_image: Literal["skip", "error"] = "skip",
    extra_columns: Literal["error", "ignore"] = "error",
    progress: bool = True,
) -> dict:
    """Pack the images of ``manifest`` (CSV or ImageFolder) into a shard set at ``out_dir``.

    Resumable: finished shards (tar + offsets file) are kept when the same command runs again;
    a folder holding shards of another manifest or other settings is an error, never mixed.
    Unreadable source images are skipped and counted (``on_bad_image="skip"``) or an error
    naming the manifest line. Returns the summary that ``shardset.json`` also holds.
    """
    from tqdm import tqdm

    if max_side < 16 or not 1 <= quality <= 100 or samples_per_shard < 1 or workers < 1:
        raise ManifestError(f"bad settings: max_side={max_side} (≥ 16), quality={quality} (1-100), "
                            f"samples_per_shard={samples_per_shard} (≥ 1), workers={workers} (≥ 1)")
    source = Path(manifest)
    if (source / SHARDSET).is_file():
        raise ShardError(f"{source} is already a shard set")
    if kind == "auto":
        kind = "landmark" if source.is_dir() or "landmark_id" in read_text_csv(source, "manifest", ManifestError).columns \
            else "nonlandmark"
    table = load_manifest(source, kind, extra_columns=extra_columns)
    if len(table) == 0:
        raise ShardError(f"{table.source}: no images to pack (the manifest has no rows)")
    out = Path(out_dir)
    settings = {"kind": kind, "max_side": max_side, "quality": quality, "samples_per_shard": samples_per_shard,
                "on_bad_image": on_bad_image}
    fingerprint = _fingerprint(table, settings)
    out.mkdir(parents=True, exist_ok=True)
    if (out / SHARDSET).is_file():
        done = json.loads((out / SHARDSET).read_text())
        if done.get("fingerprint") == fingerprint:
            log.info("%s: already prepared from %s", out, source)
            return done
        raise ShardError(f"{out} holds shards of another manifest or other settings; choose another --out")
    marker = out / ".prepare.json"
    # A marker with no finished shard beside it (a run that failed or was killed before its first
    # shard was complete) guards nothing: another manifest or other settings may take the folder.
    if (marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != fingerprint
            and _holds_finished_shard(out)):
        raise ShardError(f"{out} holds unfinished shards of another manifest or other settings; "
                         "choose another --out or delete it")
    write_json_atomic(marker, {"fingerprint": fingerprint, "source": str(source), **settings})

    # Each member's JSON makes a shard self-describing for any WebDataset reader: the source row,
    # the landmark id (the label; class indices depend on the DB they are trained with) and
    # whether the photo is a non-landmark.
    ids = table.landmark_ids if kind == "landmark" else [None] * len(table)
    meta = [{"landmark_id": i, "nonlandmark": kind == "nonlandmark"} for i in ids]
    jobs = []
    for first in range(0, len(table), samples_per_shard):
        rows = range(first, min(first + samples_per_shard, len(table)))
        jobs.append({
            "out": str(out), "name": f"shard-{first // samples_per_shard:06d}", "source": table.source,
            "max_side": max_side, "quality": quality, "on_bad_image": on_bad_image,
            "rows": [(r, table.paths[r], int(table.lines[r]), {"row": r, **meta[r]}) for r in rows],
        })
    records: dict[str, dict] = {}
    todo = []
    for job in jobs:
        record = _shard_done(out, job["name"])
        if record is None:
            todo.append(job)
        else:
            records[job["name"]] = record
    if records:
        log.info("%s: %d of %d shards already written; writing the other %d", out, len(records), len(jobs), len(todo))
    bar = tqdm(total=len(jobs), initial=len(records), unit="shard", desc="prepare shards", disable=not progress)
    if workers == 1 or len(todo) <= 1:
        finished = map(_write_shard, todo)
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        finished = pool.map(_write_shard, todo)
    try:
        for job, record in zip(todo, finished):
            records[job["name"]] = record
            bar.update(1)
    finally:
        bar.close()
        if workers > 1 and len(todo) > 1:
            pool.shutdown(cancel_futures=True)

    rows, locations, skipped = [], [], 0
    for job in jobs:
        record = records[job["name"]]
        skipped += len(record["skipped"])
        for key, offset, size in record["samples"]:
            rows.append(int(key))
            locations.append((key, record["shard"], offset, size))
    if not rows:
        _discard_empty_set(out, jobs, marker)
        first = next(s for j in jobs for s in records[j["name"]]["skipped"])
        raise ShardError(f"{table.source}: no images to pack: all {skipped} rows' images are missing or "
                         f"unreadable, e.g. line {first[0]}: {first[1]}")
    samples = table.table.iloc[rows].reset_index(drop=True).copy()
    samples["path"] = [os.path.abspath(table.paths[r]) for r in rows]  # where each image came from
    for name, values in zip(LOCATION_COLUMNS, zip(*locations) if locations else [[]] * 4):
        samples[name] = [str(v) for v in values]
    with atomic_path(out / SAMPLES) as tmp:
        samples.to_csv(tmp, index=False)
    summary = {
        "format": FORMAT, "version": VERSION, "kind": kind, "source": str(source), "fingerprint": fingerprint,
        "num_samples": len(rows), "skipped": skipped, "max_side": max_side, "quality": quality,
        "shards": [{"url": records[j["name"]]["shard"], "nsamples": len(records[j["name"]]["samples"]),
                    "filesize": records[j["name"]]["filesize"]} for j in jobs],
    }
    if skipped:
        first = next(s for j in jobs for s in records[j["name"]]["skipped"])
        log.warning("%s: skipped %d unreadable image(s), e.g. line %d: %s", table.source, skipped, *first)
    write_json_atomic(out / SHARDSET, summary)  # last: the set is complete
    marker.unlink(missing_ok=True)
    return summary


# ---- reading --------------------------------------------------------------------------------


def read_shard_header(location: str | os.PathLike) -> dict:
    """``shardset.json`` of a shard set, checked for this reader's format and version."""
    path = Path(location) / SHARDSET
    try:
        header = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: invalid JSON, or bytes that are not UTF-8
        raise ShardError(f"{path}: not a readable shard set header ({err})") from err
    if not isinstance(header, dict):
        raise ShardError(f"{path}: not a shard set header (a JSON {type(header).__name__}, not an object)")
    if header.get("format") != FORMAT:
        raise ShardError(f"{path}: format {header.get('format')!r} is not {FORMAT!r}")
    if header.get("version") != VERSION:
        raise ShardError(f"{path}: shards written in format version {header.get('version')} of {FORMAT}; this "
                         f"version of the project reads version {VERSION}: run `landmarks prepare shards` again")
    _check_header_keys(path, header)
    return header


def _check_header_keys(path: Path, header: dict) -> None:
    """The keys a reader relies on (``kind``, ``shards``), checked once here so that a hand-edited
    or damaged header is one error naming the key, not a KeyError wherever it is used."""
    if header.get("kind") not in ("landmark", "nonlandmark"):
        raise ShardError(f"{path}: key 'kind' is {header.get('kind')!r}, not 'landmark' or 'nonlandmark'")
    shards = header.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{path}: key 'shards' is {'missing' if shards is None else 'not a list'}; "
                         "run `landmarks prepare shards` again")
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("url"), str)
                and isinstance(shard.get("filesize"), int) and not isinstance(shard.get("filesize"), bool)):
            raise ShardError(f"{path}: key 'shards', entry {i}: {shard!r} is not "
                             '{"url": <file name>, "filesize": <bytes>, ...}')


def read_shard_set(location: str | os.PathLike, kind: ManifestKind = "landmark") -> Manifest:
    """A shard set as a :class:`Manifest` whose table carries each sample's shard location."""
    location = Path(location)
    header = read_shard_header(location)
    if header["kind"] != kind:  # else landmark photos would train as non-landmarks, or the reverse
        raise ShardError(f"{location / SHARDSET}: a {header['kind']} shard set, given where a {kind} manifest "
                         "is read; prepare the manifest again with the right --kind or give another set")
    table = read_text_csv(location / SAMPLES, "shard set sample list", ShardError)
    missing = [c for c in LOCATION_COLUMNS if c not in table.columns]
    if missing:
        raise ShardError(f"{location / SAMPLES}: missing column(s) {missing}")
    _check_locations(location / SAMPLES, table, {s["url"] for s in header["shards"]})
    manifest = manifest_from_table(table.drop(columns=list(LOCATION_COLUMNS)), location / SAMPLES, kind)
    for column in LOCATION_COLUMNS:
        manifest.table[column] = table[column].to_numpy()
    manifest.shard_dir = str(location)
    return manifest


def _check_locations(path: Path, table, shards: set[str]) -> None:
    """Each sample's shard is one the header lists and its offset and size are integers a tar
    member can have: a member's data follows its 512-byte header, so its offset is at least 512
    (a smaller one would seek before the file's start in :meth:`ShardReader.read`). Vectorised:
    a set holds millions of samples."""
    unknown = ~table["shard"].isin(shards).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise ShardError(f"{path}: line {i + 2}: shard {table['shard'].iat[i]!r} is not one of the shards "
                         f"listed in {SHARDSET}")
    for column, minimum in (("offset", _TAR_BLOCK), ("size", 0)):
        values = table[column]
        digits = values.str.fullmatch(r"[0-9]{1,18}").to_numpy(dtype=bool)  # 18: fits an int64
        bad = ~digits
        bad[digits] = values[digits].astype(np.int64).to_numpy() < minimum
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ShardError(f"{path}: line {i + 2}: {column} {values.iat[i]!r} is not an integer ≥ {minimum}")


def damaged_shards(manifest: Manifest) -> dict[str, str]:
    """``{shard: why}`` for the manifest's shards that are missing or differ in size from their record."""
    header = read_shard_header(manifest.shard_dir)
    recorded = {s["url"]: s["filesize"] for s in header["shards"]}
    damaged = {}
    for shard in sorted(set(manifest.table["shard"])):
        path = Path(manifest.shard_dir) / shard
        if not path.exists():
            damaged[shard] = f"{path}: shard missing"
        elif not path.is_file():
            damaged[shard] = f"{path}: shard is not a file"
        elif path.stat().st_size != recorded.get(shard):
            damaged[shard] = (f"{path}: {path.stat().st_size} bytes, but {recorded.get(shard)} were written by "
                              "`landmarks prepare shards` (truncated or rewritten): prepare it again")
    return damaged


class ShardReader:
    """Reads sample ``i`` of a sharded manifest by seeking to its recorded offset.

    File handles are opened lazily per process (loader workers fork with none open) and a
    member's tar header is checked to name the expected key, so a shard replaced after
    ``samples.csv`` was written cannot return another sample's image.
    """

    def __init__(self, manifest: Manifest):
        if manifest.shard_dir is None:
            raise ValueError(f"{manifest.source} is not a shard set")
        table = manifest.table
        self.root = Path(manifest.shard_dir)
        self.shard_names = sorted(set(table["shard"]))
        number = {name: i for i, name in enumerate(self.shard_names)}
        self.shard = np.array([number[s] for s in table["shard"]], dtype=np.int32)
        self.offset = table["offset"].astype(np.int64).to_numpy()
        self.size = table["size"].astype(np.int64).to_numpy()
        self.key = table["key"].to_numpy()
        self._files: dict[int, object] = {}
        self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_pid": None}

    def name(self, i: int) -> str:
        return f"{self.root / self.shard_names[self.shard[i]]} @ offset {self.offset[i]}"

    def read(self, i: int) -> bytes:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        shard = int(self.shard[i])
        handle = self._files.get(shard)
        if handle is None:
            try:
                handle = self._files[shard] = open(self.root / self.shard_names[shard], "rb")
            except OSError as err:
                raise UnreadableImage(f"{self.root / self.shard_names[shard]}: cannot open shard ({err})") from err
        offset, size = int(self.offset[i]), int(self.size[i])
        handle.seek(offset - _TAR_BLOCK)
        block = handle.read(_TAR_BLOCK + size)
        member = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if member != f"{self.key[i]}.jpg":
            raise UnreadableImage(f"{self.name(i)}: expected member {self.key[i]}.jpg, found {member!r} "
                                  "(the shard changed after it was indexed)")
        if len(block) < _TAR_BLOCK + size:
            raise UnreadableImage(f"{self.name(i)}: shard truncated ({len(block) - _TAR_BLOCK} of {size} bytes)")
        return block[_TAR_BLOCK:]


class ShardStream(IterableDataset):
    """One sequential pass over a sharded manifest with webdataset, exactly once across ranks and workers.

    Shards go to ranks round-robin (``rank``/``world_size``, by default torch.distributed's),
    then to each rank's loader workers; samples whose key is not in ``manifest`` (rows a
    subset dropped) are passed over. Yields the data module's sample dicts, ``index`` being the
    sample's position in ``manifest``.
    """

    def __init__(self, manifest: Manifest, labels: np.ndarray, transform, image_size: int,
                 rank: int | None = None, world_size: int | None = None):
        if manifest.shard_dir is None:
            raise ValueError(f"{manifest.source} is not a shard set")
        self.urls = [str(Path(manifest.shard_dir) / s) for s in sorted(set(manifest.table["shard"]))]
        self.position = {key: i for i, key in enumerate(manifest.table["key"])}
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform, self.image_size = transform, image_size
        self.rank, self.world_size = rank, world_size

    def _nodes(self, urls: Iterator[str]) -> Iterator[str]:
        import webdataset as wds

        if self.rank is None:
            return wds.split_by_node(urls)
        return islice(urls, self.rank, None, self.world_size)

    def __iter__(self):
        import torch
        import webdataset as wds

        stream = wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=self._nodes,
                                workersplitter=wds.split_by_worker, empty_check=False)
        for sample in stream:
            index = self.position.get(sample["__key__"])
            if index is None:
                continue
            try:
                image = decode_rgb(sample["jpg"], f"{sample['__url__']} member {sample['__key__']}.jpg",
                                   max_side=2 * self.image_size)
                tensor, valid = self.transform(image=image)["image"], True
            except UnreadableImage as err:
                log.warning("skipping unreadable image: %s", err)
                tensor, valid = torch.zeros(3, self.image_size, self.image_size), False
            yield {"image": tensor, "label": int(self.labels[index]), "index": index, "valid": valid}

