"""What a synthetic world is made of: :class:`SynthConfig` (size, difficulty, noise, seed), its
presets, and the vocabularies the config and the plan name (shooting angles, non-landmark kinds).

Imports nothing that draws: the data module, the CLI and the plan read this without loading the
renderer.
"""

from __future__ import annotations

from dataclasses import dataclass

# 2: adds the calibration split and the user collection (format-1 files are unchanged).
# 3: adds lat,lon columns to distractors.csv and calibration.csv (every image is unchanged).
FORMAT = "synthetic-landmark-world/3"

# The shooting angles a landmark can be photographed from (a config's max_views is at most this many).
FRAMINGS = ("front", "side", "interior", "detail", "distant")
# Everyday non-landmark scenes (drawn by datamodules.synth.scenes, in this order) and the hard
# negatives: generic buildings made from the landmarks' part vocabulary.
SCENE_KINDS = ("indoor_room", "food_table", "nature", "street", "people_closeup")
HARD_NEGATIVE_KIND = "generic_building"
NONLANDMARK_KINDS = SCENE_KINDS + (HARD_NEGATIVE_KIND,)


@dataclass(frozen=True)
class SynthConfig:
    """Size, difficulty and noise of a synthetic landmark world (the defaults are the demo world)."""

    num_landmarks: int = 100
    images_per_landmark: int = 30
    queries_per_landmark: int = 5
    nonlandmark_pool: int = 1500
    distractors: int = 5000
    image_size: int = 96
    min_views: int = 2
    max_views: int = 3
    noise_fraction: float = 0.1  # share of DB rows with a wrong label
    noise_nonlandmark_share: float = 0.5  # of the noisy rows, share that are really non-landmarks
    duplicate_landmarks: int = 3
    hard_negative_share: float = 0.3  # share of non-landmark images that are generic buildings
    difficulty: float = 1.0
    # Non-landmark photos for calibrating a threshold (never trained on). 3,500: enough that a 1e-3
    # threshold lets more than 2e-3 of new photos through in at most 10 % of worlds
    # (recognition.calibration.calibration_photos_needed: 3,339); 2,000 did in 24 %.
    calibration: int = 3500
    collection: int = 1000  # a user's photo collection, for albums
    collection_landmark_share: float = 0.015  # about 1 landmark photo in 67
    collection_gps_share: float = 0.6  # photos with GPS in their EXIF
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_landmarks", "images_per_landmark", "min_views"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("queries_per_landmark", "nonlandmark_pool", "distractors", "duplicate_landmarks", "calibration",
                     "collection", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.image_size < 32:
            problems.append("image_size must be >= 32")
        if not self.min_views <= self.max_views <= len(FRAMINGS):
            problems.append(f"need min_views <= max_views <= {len(FRAMINGS)} (the shooting angles available)")
        if not 0.0 <= self.noise_fraction < 1.0:
            problems.append("noise_fraction must be in [0, 1)")
        for name in ("noise_nonlandmark_share", "hard_negative_share", "collection_landmark_share",
                     "collection_gps_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1]")
        if self.num_landmarks - 2 * self.duplicate_landmarks < 0:
            problems.append("duplicate_landmarks needs two landmarks each (a duplicate and its original)")
        if self.num_landmarks - self.duplicate_landmarks < 2:
            problems.append("need at least 2 distinct structures (num_landmarks - duplicate_landmarks >= 2)")
        if self.difficulty < 0:
            problems.append("difficulty must be >= 0")
        if problems:
            raise ValueError("invalid SynthConfig: " + "; ".join(problems))

    @classmethod
    def tiny(cls, seed: int = 0) -> "SynthConfig":
        """A world small enough for unit tests elsewhere (generates in well under 2 s)."""
        return cls(
            num_landmarks=8, images_per_landmark=6, queries_per_landmark=2, nonlandmark_pool=40,
            distractors=60, image_size=64, duplicate_landmarks=1, calibration=50, collection=30,
            collection_landmark_share=0.2, seed=seed,
        )


CONFIG_HELP = {
    "num_landmarks": "landmark ids, duplicates included",
    "images_per_landmark": "DB images per landmark id",
    "queries_per_landmark": "held-out queries per landmark (duplicate ids get none)",
    "nonlandmark_pool": "non-landmark training images",
    "distractors": "non-landmark distractor queries",
    "image_size": "side of the square JPEGs in pixels",
    "min_views": "fewest shooting angles per landmark",
    "max_views": "most shooting angles per landmark (front, side, interior, detail, distant: at most 5)",
    "noise_fraction": "share of DB rows with a wrong label",
    "noise_nonlandmark_share": "of the noisy rows, share that show no landmark (rest: another landmark)",
    "duplicate_landmarks": "landmarks that appear under a second id",
    "hard_negative_share": "share of non-landmark images that are generic (non-landmark) buildings",
    "difficulty": "scales warp, crop, occlusion, colour cast, blur, noise and JPEG loss (0 = clean)",
    "calibration": "non-landmark photos for calibrating the threshold (disjoint from training and distractors)",
    "collection": "photos of a user's collection (mostly not landmarks), for albums",
    "collection_landmark_share": "share of the collection that shows a landmark",
    "collection_gps_share": "share of the collection with GPS coordinates in the EXIF",
    "seed": "world seed; same seed and config give byte-identical files",
}
