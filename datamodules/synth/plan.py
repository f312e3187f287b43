"""The plan of a world, before any pixel: landmark ids, names, cities and places, duplicates, the
shooting-angle mix, which DB rows are noise and what they really show, the kind of every
non-landmark image, one render task per image, and the ``world.json`` summary.

Everything is drawn from the plan stream (and the per-landmark view-mix streams) in a fixed order,
so a plan is a pure function of the config: the steps below must keep their order of draws.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from datamodules.synth.config import FORMAT, HARD_NEGATIVE_KIND, SCENE_KINDS, SynthConfig
from datamodules.synth.geometry import NAME_SUFFIXES, Blueprint, landmark_blueprint
from datamodules.synth.streams import (
    STREAM_CALIBRATION,
    STREAM_COLLECTION,
    STREAM_DB,
    STREAM_DISTRACTORS,
    STREAM_NONLANDMARKS,
    STREAM_PLAN,
    STREAM_PLAN_2,
    STREAM_POSITIONS,
    STREAM_QUERIES,
    STREAM_VIEW_MIX,
    stream_rng,
)


class Task(NamedTuple):
    """One image to render: its file, its random stream and index, and what it shows."""

    relpath: str
    stream: int
    index: int
    structure: int  # landmark index whose blueprint is shown; -1 for a non-landmark image
    view: int
    kind: str  # non-landmark kind; "" for landmark images
    gps: tuple[float, float] | None = None  # written into the JPEG's EXIF (the user collection)


@dataclass
class Plan:
    landmarks: list[dict]
    db: list[dict]
    queries: list[dict]
    nonlandmarks: list[dict]
    distractors: list[dict]
    tasks: list[Task]
    world: dict
    calibration: list[dict]
    collection: list[dict]


@dataclass
class _Landmarks:
    """Who the landmarks are, by landmark index (``k``)."""

    ids: list[int]
    blueprints: list[Blueprint]
    duplicate_of: dict[int, int]  # duplicate's index -> its original's index
    structure_of: list[int]  # index -> index of the blueprint it shows (its original for a duplicate)
    originals: list[int]
    cities: list[dict]
    rows: list[dict]  # landmarks.csv rows, by index


class _Noise(NamedTuple):
    """The DB rows (``k * images_per_landmark + i``) that carry a wrong label."""

    total: int
    nonlandmark_count: int
    nonlandmark: set[int]  # really no landmark
    wrong_landmark: set[int]  # really another landmark


# ---- names -------------------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "st", "tr", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "s", "l", "m")


def _word(rng: np.random.Generator) -> str:
    syllables = int(rng.integers(2, 4))
    parts = [str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(syllables)]
    return ("".join(parts) + str(rng.choice(_CODAS))).capitalize()


def _unique_word(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        word = _word(rng)
        if word not in taken:
            taken.add(word)
            return word


def _nonlandmark_kind(rng: np.random.Generator, hard_negative_share: float) -> str:
    if rng.random() < hard_negative_share:
        return HARD_NEGATIVE_KIND
    return str(rng.choice(SCENE_KINDS))


def _fmt(degrees: float) -> str:
    return f"{degrees:.6f}"


# ---- the plan, step by step ---------------------------------------------------------------------

def build_plan(config: SynthConfig) -> Plan:
    rng = stream_rng(config.seed, STREAM_PLAN)
    landmarks = _plan_landmarks(config, rng)
    view_draws = _draw_view_mix(config, landmarks)
    noise = _pick_noisy_rows(config, rng)
    db_rows, db_tasks = _plan_db(config, rng, landmarks, view_draws, noise)
    query_rows, query_tasks = _plan_queries(config, landmarks, view_draws)
    split_rows, split_tasks = _plan_nonlandmarks(config, rng)
    # Format 2's splits: their own plan stream, after every format-1 draw.
    rng_2 = stream_rng(config.seed, STREAM_PLAN_2)
    calibration_rows, calibration_tasks = _plan_calibration(config, rng_2)
    collection_rows, collection_tasks = _plan_collection(config, rng_2, landmarks)
    # Format 3: positions for the distractors and calibration photos, each split from a stream of
    # its own (a world with more distractors keeps the first ones' positions and the calibration's).
    for k, rows in enumerate((split_rows["distractors"], calibration_rows)):
        _place_everyday_photos(stream_rng(config.seed, STREAM_POSITIONS, k), landmarks.cities, rows)

    by_id = lambda row: int(row["landmark_id"])  # noqa: E731 - stable sort keeps image order within an id
    landmark_rows = sorted(landmarks.rows, key=by_id)
    db_rows.sort(key=by_id)
    query_rows.sort(key=by_id)
    world = _world_summary(config, landmarks, len(db_rows), len(query_rows), split_rows, noise)
    world["counts"].update(calibration=len(calibration_rows), collection=len(collection_rows),
                           collection_landmark_photos=sum(1 for r in collection_rows if r["landmark_id"]),
                           collection_with_gps=sum(1 for r in collection_rows if r["lat"]))
    world["kinds"]["calibration"] = dict(sorted(Counter(r["kind"] for r in calibration_rows).items()))
    return Plan(landmark_rows, db_rows, query_rows, split_rows["nonlandmarks"], split_rows["distractors"],
                db_tasks + query_tasks + split_tasks + calibration_tasks + collection_tasks, world,
                calibration_rows, collection_rows)


def _plan_landmarks(config: SynthConfig, rng: np.random.Generator) -> _Landmarks:
    """Ids, structures, duplicates, cities, places and names of the landmarks."""
    n = config.num_landmarks
    blueprints = [landmark_blueprint(config, k) for k in range(n)]  # no pixels: cheap
    ids = [int(i) for i in rng.choice(np.arange(1000, 1000 + 10 * n), size=n, replace=False)]

    order = [int(i) for i in rng.permutation(n)]
    dup_count = config.duplicate_landmarks
    duplicate_of = dict(zip(order[:dup_count], order[dup_count:2 * dup_count]))
    structure_of = [duplicate_of.get(k, k) for k in range(n)]
    originals = [k for k in range(n) if k not in duplicate_of]

    names: set[str] = set()
    cities = _draw_cities(rng, n, names)
    places = _place_landmarks(rng, n, duplicate_of, cities)
    rows = []
    for k in range(n):
        suffix = str(rng.choice(NAME_SUFFIXES[blueprints[structure_of[k]].parts[0].kind]))
        place = places[k]
        rows.append({
            "landmark_id": ids[k], "name": f"{_unique_word(rng, names)} {suffix}",
            "lat": _fmt(place["lat"]), "lon": _fmt(place["lon"]),
            "num_views": len(blueprints[structure_of[k]].views),
            "duplicate_of": ids[duplicate_of[k]] if k in duplicate_of else "", "city": place["city"],
        })
    return _Landmarks(ids, blueprints, duplicate_of, structure_of, originals, cities, rows)


def _draw_cities(rng: np.random.Generator, n: int, names: set[str]) -> list[dict]:
    cities = []
    for _ in range(min(8, max(2, math.ceil(n / 15)))):
        while True:  # cities far apart, so a GPS radius never spans two of them
            lat, lon = float(rng.uniform(-45, 60)), float(rng.uniform(-170, 170))
            if all(abs(lat - c["lat"]) + abs(lon - c["lon"]) > 10 for c in cities):
                break
        cities.append({"name": _unique_word(rng, names), "lat": lat, "lon": lon})
    return cities


def _place_landmarks(rng: np.random.Generator, n: int, duplicate_of: dict[int, int],
                     cities: list[dict]) -> dict[int, dict]:
    """Each landmark's city and coordinates; a duplicate stands where its original does."""
    by_index = {}
    for k in range(n):
        if k in duplicate_of:
            continue
        city = cities[int(rng.integers(len(cities)))]
        by_index[k] = {"k": k, "city": city["name"], "lat": city["lat"] + float(rng.normal(0, 0.02)),
                       "lon": city["lon"] + float(rng.normal(0, 0.03))}
    for dup, original in duplicate_of.items():  # the same place, a few metres apart
        source = by_index[original]
        by_index[dup] = {"k": dup, "city": source["city"], "lat": source["lat"] + float(rng.normal(0, 3e-4)),
                         "lon": source["lon"] + float(rng.normal(0, 3e-4))}
    return by_index


def _draw_view_mix(config: SynthConfig, landmarks: _Landmarks) -> list[tuple[list[int], list[int]]]:
    """Per landmark, the view of each DB image and of each query (own stream per landmark).

    Some shooting angles are photographed far more often than others (Dirichlet weights)."""
    view_draws = []
    for k in range(config.num_landmarks):
        views_rng = stream_rng(config.seed, STREAM_VIEW_MIX, k)
        num_views = len(landmarks.blueprints[landmarks.structure_of[k]].views)
        weights = views_rng.dirichlet(np.full(num_views, 2.0))
        # The first images cover every angle once, so each angle is in the DB under its label.
        db_views = [i if i < num_views else int(views_rng.choice(num_views, p=weights))
                    for i in range(config.images_per_landmark)]
        query_views = [int(views_rng.choice(num_views, p=weights)) for _ in range(config.queries_per_landmark)]
        view_draws.append((db_views, query_views))
    return view_draws


def _pick_noisy_rows(config: SynthConfig, rng: np.random.Generator) -> _Noise:
    total_db = config.num_landmarks * config.images_per_landmark
    noisy = round(config.noise_fraction * total_db)
    noisy_nonlandmark = round(config.noise_nonlandmark_share * noisy)
    noisy_rows = [int(i) for i in rng.permutation(total_db)[:noisy]]
    return _Noise(noisy, noisy_nonlandmark, set(noisy_rows[:noisy_nonlandmark]), set(noisy_rows[noisy_nonlandmark:]))


def _plan_db(config: SynthConfig, rng: np.random.Generator, landmarks: _Landmarks,
             view_draws: list[tuple[list[int], list[int]]], noise: _Noise) -> tuple[list[dict], list[Task]]:
    """The labelled DB: every landmark's images, a noisy row showing no landmark or another one."""
    ids, blueprints, structure_of = landmarks.ids, landmarks.blueprints, landmarks.structure_of
    tasks: list[Task] = []
    db_rows = []
    for k in range(config.num_landmarks):
        lid, meta = ids[k], landmarks.rows[k]
        for i in range(config.images_per_landmark):
            row_index = k * config.images_per_landmark + i
            relpath = f"images/db/{lid}/{i}.jpg"
            if row_index in noise.nonlandmark:
                kind = _nonlandmark_kind(rng, config.hard_negative_share)
                task = Task(relpath, STREAM_DB, row_index, -1, -1, kind)
                truth, view, is_noise = "", "", 1
            elif row_index in noise.wrong_landmark:
                candidates = [o for o in landmarks.originals if o != structure_of[k]]
                other = candidates[int(rng.integers(len(candidates)))]
                other_view = int(rng.integers(len(blueprints[other].views)))
                task = Task(relpath, STREAM_DB, row_index, other, other_view, "")
                truth, view, is_noise = ids[other], other_view, 1
            else:
                structure, db_view = structure_of[k], view_draws[k][0][i]
                task = Task(relpath, STREAM_DB, row_index, structure, db_view, "")
                truth, view, is_noise = ids[structure], db_view, 0
            tasks.append(task)
            db_rows.append({"path": relpath, "landmark_id": lid, "lat": meta["lat"], "lon": meta["lon"],
                            "view": view, "is_noise": is_noise, "true_landmark_id": truth})
    return db_rows, tasks


def _plan_queries(config: SynthConfig, landmarks: _Landmarks,
                  view_draws: list[tuple[list[int], list[int]]]) -> tuple[list[dict], list[Task]]:
    """Held-out queries of the original landmarks only (a duplicate's query would have two answers)."""
    tasks, query_rows = [], []
    for k in landmarks.originals:
        lid, meta = landmarks.ids[k], landmarks.rows[k]
        for i, query_view in enumerate(view_draws[k][1]):
            relpath = f"images/queries/{lid}/{i}.jpg"
            tasks.append(Task(relpath, STREAM_QUERIES, k * config.queries_per_landmark + i, k, query_view, ""))
            query_rows.append({"path": relpath, "landmark_id": lid, "lat": meta["lat"], "lon": meta["lon"],
                               "view": query_view})
    return query_rows, tasks


def _plan_nonlandmarks(config: SynthConfig, rng: np.random.Generator) -> tuple[dict[str, list[dict]], list[Task]]:
    """The non-landmark training pool, then the distractor queries."""
    tasks, split_rows = [], {}
    for split, stream, count in (("nonlandmarks", STREAM_NONLANDMARKS, config.nonlandmark_pool),
                                 ("distractors", STREAM_DISTRACTORS, config.distractors)):
        rows = []
        for i in range(count):
            kind = _nonlandmark_kind(rng, config.hard_negative_share)
            relpath = f"images/{split}/{i}.jpg"
            tasks.append(Task(relpath, stream, i, -1, -1, kind))
            rows.append({"path": relpath, "kind": kind})
        split_rows[split] = rows
    return split_rows, tasks


def _plan_calibration(config: SynthConfig, rng: np.random.Generator) -> tuple[list[dict], list[Task]]:
    """Non-landmark photos for calibrating a threshold: never trained on, disjoint from the distractors."""
    rows, tasks = [], []
    for i in range(config.calibration):
        kind = _nonlandmark_kind(rng, config.hard_negative_share)
        relpath = f"images/calibration/{i}.jpg"
        tasks.append(Task(relpath, STREAM_CALIBRATION, i, -1, -1, kind))
        rows.append({"path": relpath, "kind": kind})
    return rows, tasks


def everyday_position(rng: np.random.Generator, cities: list[dict]) -> tuple[float, float]:
    """Where an everyday (non-landmark) photo is taken: somewhere in one of the world's ``cities``
    (``{"lat", "lon"}`` in degrees), a few km from its centre, where the landmarks stand too."""
    city = cities[int(rng.integers(len(cities)))]
    return float(city["lat"]) + float(rng.normal(0, 0.05)), float(city["lon"]) + float(rng.normal(0, 0.05))


def _place_everyday_photos(rng: np.random.Generator, cities: list[dict], rows: list[dict]) -> None:
    """``lat``/``lon`` for every row (in place), by :func:`everyday_position`: the distractors and
    calibration photos stand for a user's everyday photos, so that a GPS filter and a threshold
    calibrated with it (``landmarks index --gps-radius-km``) can be measured. Only the CSVs carry
    them; the images (and their EXIF) are those of a world without positions."""
    for row in rows:
        lat, lon = everyday_position(rng, cities)
        row["lat"], row["lon"] = _fmt(lat), _fmt(lon)


def _plan_collection(config: SynthConfig, rng: np.random.Generator,
                     landmarks: _Landmarks) -> tuple[list[dict], list[Task]]:
    """A user's photo collection: mostly everyday photos, a few of landmarks (original ids only,
    so each has one right answer), GPS in the EXIF for a share of them. A landmark photo's GPS is
    within ~200 m of the landmark; an everyday photo's is somewhere in one of the world's cities."""
    n = config.collection
    landmark_count = min(n, round(n * config.collection_landmark_share)) if n else 0
    if config.collection_landmark_share > 0 and n and not landmark_count:
        landmark_count = 1
    is_landmark = np.zeros(n, dtype=bool)
    is_landmark[rng.choice(n, landmark_count, replace=False)] = True
    rows, tasks = [], []
    for i in range(n):
        relpath = f"images/collection/{i:05d}.jpg"
        if is_landmark[i]:
            k = landmarks.originals[int(rng.integers(len(landmarks.originals)))]
            view = int(rng.integers(len(landmarks.blueprints[k].views)))
            lat, lon = float(landmarks.rows[k]["lat"]), float(landmarks.rows[k]["lon"])
            lat, lon = lat + float(rng.normal(0, 1e-3)), lon + float(rng.normal(0, 1e-3))
            task_args, truth, kind = (k, view, ""), landmarks.ids[k], ""
        else:
            lat, lon = everyday_position(rng, landmarks.cities)
            kind = _nonlandmark_kind(rng, config.hard_negative_share)
            task_args, truth = (-1, -1, kind), ""
        gps = (round(lat, 6), round(lon, 6)) if rng.random() < config.collection_gps_share else None
        tasks.append(Task(relpath, STREAM_COLLECTION, i, *task_args, gps))
        rows.append({"path": relpath, "landmark_id": truth, "kind": kind,
                     "lat": _fmt(gps[0]) if gps else "", "lon": _fmt(gps[1]) if gps else ""})
    return rows, tasks


def _world_summary(config: SynthConfig, landmarks: _Landmarks, db_count: int, query_count: int,
                   split_rows: dict[str, list[dict]], noise: _Noise) -> dict:
    """The content of ``world.json``: config, counts, noise, duplicates, kinds and cities."""
    ids = landmarks.ids
    return {
        "format": FORMAT,
        "config": asdict(config),
        "seed": config.seed,
        "counts": {
            "landmarks": config.num_landmarks, "distinct_structures": len(landmarks.originals), "db": db_count,
            "queries": query_count, "nonlandmarks": len(split_rows["nonlandmarks"]),
            "distractors": len(split_rows["distractors"]),
        },
        "noise": {"total": noise.total, "wrong_landmark": noise.total - noise.nonlandmark_count,
                  "nonlandmark": noise.nonlandmark_count},
        "duplicates": sorted(({"landmark_id": ids[d], "duplicate_of": ids[o]}
                              for d, o in landmarks.duplicate_of.items()),
                             key=lambda pair: pair["landmark_id"]),
        "kinds": {split: dict(sorted(Counter(r["kind"] for r in rows).items())) for split, rows in split_rows.items()},
        "cities": [{"name": c["name"], "lat": _fmt(c["lat"]), "lon": _fmt(c["lon"])} for c in landmarks.cities],
        "queries_of_duplicates": "none: a duplicate id's structure is queried under its original id only",
    }
