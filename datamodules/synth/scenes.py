"""Everything around and in front of a structure, and the everyday non-landmark scenes: time of
day, sky, ground and far skyline; people, trees and cars as occluders; rooms, food, nature,
streets and people close-ups (the kinds of :data:`datamodules.synth.config.SCENE_KINDS`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datamodules.synth.colours import RGB, hsv, jittered, mixed, random_colour, shaded
from datamodules.synth.config import SCENE_KINDS
from datamodules.synth.draw import ellipse, rect, textured_rect

TIMES_OF_DAY = ("day", "sunset", "night", "overcast")
# How often each non-day light occurs at difficulty 1; a clean world (difficulty 0) is all daylight.
_OTHER_LIGHT_P = {"sunset": 0.17, "night": 0.13, "overcast": 0.2}
_SKY = {
    "day": ((60, 120, 205), (170, 205, 240)),
    "sunset": ((55, 55, 120), (250, 160, 90)),
    "night": ((8, 10, 30), (40, 45, 85)),
    "overcast": ((140, 145, 155), (200, 202, 206)),
}
GROUNDS = ("grass", "pavement", "sand", "water", "snow", "plaza")
_GROUND_COLOURS = {
    "grass": (80, 130, 60), "pavement": (125, 125, 130), "sand": (205, 185, 140),
    "water": (60, 100, 150), "snow": (230, 235, 245), "plaza": (170, 120, 95),
}
_SKIN = ((255, 220, 190), (235, 190, 150), (200, 150, 110), (160, 110, 75), (110, 75, 50), (80, 55, 40))


def pick_time_of_day(rng: np.random.Generator, difficulty: float) -> str:
    other = {light: p * min(difficulty, 1.0) for light, p in _OTHER_LIGHT_P.items()}
    p = [1.0 - sum(other.values())] + [other[light] for light in TIMES_OF_DAY[1:]]
    return str(rng.choice(TIMES_OF_DAY, p=p))


def _sky(rng: np.random.Generator, size: int, time_of_day: str) -> Image.Image:
    top, bottom = (jittered(rng, c, 12) for c in _SKY[time_of_day])
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    column = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    canvas = Image.fromarray(np.ascontiguousarray(np.broadcast_to(column, (size, size, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if time_of_day == "night":
        for _ in range(int(rng.integers(0, 12))):
            x, y = rng.uniform(0, size), rng.uniform(0, 0.6 * size)
            draw.point((x, y), fill=(230, 230, 200))
    else:
        cloud = mixed(bottom, (255, 255, 255), 0.6 if time_of_day != "overcast" else 0.3)
        for _ in range(int(rng.integers(0, 5))):
            x, y, w = rng.uniform(-0.1, 1.0) * size, rng.uniform(0.02, 0.45) * size, rng.uniform(0.1, 0.35) * size
            ellipse(draw, x, y, x + w, y + 0.3 * w, cloud)
    return canvas


def _ground(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, horizon: float, kind: str) -> None:
    colour = jittered(rng, _GROUND_COLOURS[kind], 10)
    rect(draw, 0, horizon, size, size, colour)
    line = shaded(colour, 0.8 if kind != "water" else 1.35)
    if kind in ("pavement", "plaza"):
        vx = rng.uniform(0.2, 0.8) * size
        for k in range(1, 6):
            y = horizon + (size - horizon) * (k / 6) ** 1.7
            draw.line((0, y, size, y), fill=line)
        for k in range(-6, 7):
            draw.line((vx + k * 0.05 * size, horizon, vx + k * 0.35 * size, size), fill=line)
    elif kind in ("grass", "sand"):
        for _ in range(int(rng.integers(10, 30))):
            x, y = rng.uniform(0, size), rng.uniform(horizon, size)
            draw.line((x, y, x + rng.uniform(-1, 1), y - rng.uniform(1, 3)), fill=line)
    elif kind == "water":
        for _ in range(int(rng.integers(6, 16))):
            x, y, w = rng.uniform(0, size), rng.uniform(horizon, size), rng.uniform(3, 0.2 * size)
            draw.line((x, y, x + w, y), fill=line)


def _far_skyline(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, horizon: float,
                 sky_colour: RGB) -> None:
    haze = mixed(sky_colour, (110, 110, 120), 0.5)
    x = rng.uniform(-0.1, 0.0) * size
    while x < size:
        w, h = rng.uniform(0.04, 0.12) * size, rng.uniform(0.03, 0.14) * size
        rect(draw, x, horizon - h, x + w, horizon, jittered(rng, haze, 6))
        x += w


def exterior_background(rng: np.random.Generator, size: int, time_of_day: str) -> tuple[Image.Image, float]:
    canvas = _sky(rng, size, time_of_day)
    draw = ImageDraw.Draw(canvas)
    horizon = float(rng.uniform(0.7, 0.88)) * size
    if rng.random() < 0.4:
        _far_skyline(draw, rng, size, horizon, canvas.getpixel((0, int(horizon) - 1)))
    _ground(draw, rng, size, horizon, str(rng.choice(GROUNDS)))
    return canvas, horizon


def _person(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, base: float, height: float) -> None:
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    shirt, trousers = random_colour(rng), random_colour(rng, (0.1, 0.7), (0.15, 0.6))
    head = 0.11 * height
    shoulders = 0.14 * height
    rect(draw, x - 0.09 * height, base - 0.45 * height, x - 0.01 * height, base, trousers)
    rect(draw, x + 0.01 * height, base - 0.45 * height, x + 0.09 * height, base, trousers)
    torso = (int(x - shoulders), int(base - 0.8 * height), int(x + shoulders), int(base - 0.42 * height))
    draw.rounded_rectangle(torso, radius=max(1, int(0.05 * height)), fill=shirt)
    ellipse(draw, x - head * 0.8, base - height, x + head * 0.8, base - height + 2 * head, skin)
    if rng.random() < 0.7:  # hair
        hair = hsv(0.08, rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.5))
        draw.pieslice((int(x - head * 0.85), int(base - height - 0.1 * head), int(x + head * 0.85),
                       int(base - height + 1.4 * head)), 180, 360, fill=hair)


def _tree(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, base: float, height: float) -> None:
    rect(draw, x - 0.04 * height, base - 0.45 * height, x + 0.04 * height, base, (90, 65, 40))
    green = hsv(rng.uniform(0.2, 0.38), rng.uniform(0.4, 0.8), rng.uniform(0.25, 0.6))
    if rng.random() < 0.5:  # conifer
        for k in range(3):
            y = base - (0.3 + 0.22 * k) * height
            half = (0.3 - 0.07 * k) * height
            draw.polygon([(x - half, y + 0.1 * height), (x, y - 0.3 * height), (x + half, y + 0.1 * height)],
                         fill=shaded(green, 1 + 0.1 * k))
    else:
        for _ in range(3):
            cx, cy = x + rng.uniform(-0.15, 0.15) * height, base - rng.uniform(0.6, 0.8) * height
            r = rng.uniform(0.18, 0.3) * height
            ellipse(draw, cx - r, cy - r, cx + r, cy + r, jittered(rng, green, 12))


def _car(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, base: float, height: float) -> None:
    body = random_colour(rng, (0.0, 0.8), (0.2, 0.95))
    length = 2.6 * height
    hull = (int(x - length / 2), int(base - 0.7 * height), int(x + length / 2), int(base - 0.15 * height))
    draw.rounded_rectangle(hull, radius=max(1, int(0.15 * height)), fill=body)
    draw.polygon([(x - 0.3 * length, base - 0.7 * height), (x - 0.18 * length, base - height),
                  (x + 0.2 * length, base - height), (x + 0.32 * length, base - 0.7 * height)], fill=body)
    rect(draw, x - 0.16 * length, base - 0.93 * height, x + 0.18 * length, base - 0.72 * height, (150, 185, 210))
    for wx in (-0.3, 0.3):
        r = 0.2 * height
        ellipse(draw, x + wx * length - r, base - 2 * r, x + wx * length + r, base, (25, 25, 25))


_OCCLUDERS = {"person": _person, "tree": _tree, "car": _car}
# Height range of each occluder at the bottom of the frame, as a fraction of the canvas.
_OCCLUDER_HEIGHTS = {"person": (0.3, 0.75), "tree": (0.4, 0.9), "car": (0.12, 0.22)}


def add_occluders(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, horizon: float,
                  kinds: tuple[str, ...], count: int) -> None:
    for _ in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        base = float(rng.uniform(max(horizon, 0.6 * size), 1.08 * size))
        # Nearer things (lower in the frame) are bigger.
        nearness = (base - 0.5 * size) / (0.58 * size)
        height = size * nearness * rng.uniform(*_OCCLUDER_HEIGHTS[kind])
        _OCCLUDERS[kind](draw, rng, float(rng.uniform(-0.05, 1.05)) * size, base, float(height))


def occluder_count(rng: np.random.Generator, difficulty: float) -> int:
    return min(6, int(rng.poisson(1.3 * difficulty)))


# A scene function returns its canvas, the line occluders stand behind, and the occluders that fit it.
_Scene = tuple[Image.Image, float, tuple[str, ...]]


def _scene_indoor_room(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(canvas)
    wall = hsv(rng.random(), rng.uniform(0.03, 0.4), rng.uniform(0.5, 0.95))
    floor_y = float(rng.uniform(0.6, 0.8)) * s
    textured_rect(draw, (0, 0, s, floor_y), wall, shaded(wall, rng.uniform(0.8, 0.93)),
                  str(rng.choice(("plain", "vstripes", "checker", "hstripes"))), rng.uniform(0.04, 0.12) * s)
    floor = hsv(rng.uniform(0.05, 0.12), rng.uniform(0.2, 0.6), rng.uniform(0.25, 0.7))
    textured_rect(draw, (0, floor_y, s, s), floor, shaded(floor, 0.8),
                  str(rng.choice(("hstripes", "plain", "checker"))), rng.uniform(0.03, 0.08) * s)
    if rng.random() < 0.6:  # window
        x, y = rng.uniform(0.05, 0.6) * s, rng.uniform(0.08, 0.2) * s
        w, h = rng.uniform(0.2, 0.35) * s, rng.uniform(0.2, 0.35) * s
        rect(draw, x - 2, y - 2, x + w + 2, y + h + 2, (235, 235, 230))
        rect(draw, x, y, x + w, y + h, _SKY[time_of_day][1])
        rect(draw, x + w / 2 - 1, y, x + w / 2 + 1, y + h, (235, 235, 230))
    if rng.random() < 0.5:  # picture
        x, y, w = rng.uniform(0.1, 0.7) * s, rng.uniform(0.1, 0.3) * s, rng.uniform(0.12, 0.25) * s
        rect(draw, x, y, x + w, y + 0.75 * w, (90, 60, 30))
        for _ in range(3):
            px, py = x + rng.uniform(0.1, 0.6) * w, y + rng.uniform(0.1, 0.4) * w
            rect(draw, px, py, px + 0.3 * w, py + 0.25 * w, random_colour(rng))
    if rng.random() < 0.5:  # shelf with books
        x, y, w = rng.uniform(0.0, 0.6) * s, rng.uniform(0.25, 0.45) * s, rng.uniform(0.25, 0.4) * s
        rect(draw, x, y, x + w, y + 0.04 * s, (110, 80, 50))
        bx = x
        while bx < x + w - 2:
            bw = rng.uniform(0.015, 0.035) * s
            rect(draw, bx, y - rng.uniform(0.06, 0.1) * s, bx + bw, y, random_colour(rng))
            bx += bw + 1
    if rng.random() < 0.6:  # sofa
        x, w = rng.uniform(-0.1, 0.6) * s, rng.uniform(0.35, 0.6) * s
        colour = random_colour(rng, (0.2, 0.7), (0.25, 0.8))
        back = (int(x), int(floor_y - 0.22 * s), int(x + w), int(floor_y + 0.08 * s))
        seat = (int(x + 0.05 * w), int(floor_y - 0.1 * s), int(x + 0.95 * w), int(floor_y + 0.04 * s))
        draw.rounded_rectangle(back, radius=4, fill=colour)
        draw.rounded_rectangle(seat, radius=3, fill=shaded(colour, 1.15))
    if rng.random() < 0.5:  # table
        x, w = rng.uniform(0.1, 0.7) * s, rng.uniform(0.2, 0.35) * s
        wood = hsv(0.08, rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6))
        rect(draw, x, floor_y - 0.05 * s, x + w, floor_y - 0.02 * s, wood)
        for lx in (x + 2, x + w - 4):
            rect(draw, lx, floor_y - 0.02 * s, lx + 2, floor_y + 0.12 * s, wood)
    if rng.random() < 0.4:  # floor lamp
        x = rng.uniform(0.1, 0.9) * s
        rect(draw, x - 1, floor_y - 0.35 * s, x + 1, floor_y + 0.05 * s, (50, 50, 50))
        draw.polygon([(x - 0.07 * s, floor_y - 0.3 * s), (x - 0.04 * s, floor_y - 0.42 * s),
                      (x + 0.04 * s, floor_y - 0.42 * s), (x + 0.07 * s, floor_y - 0.3 * s)], fill=(245, 225, 170))
    return canvas, floor_y, ("person",)


def _scene_food_table(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.5:
        table = hsv(rng.uniform(0.05, 0.11), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.75))
        textured_rect(draw, (0, 0, s, s), table, shaded(table, 0.85), "vstripes" if rng.random() < 0.5 else "hstripes",
                      rng.uniform(0.05, 0.15) * s)
    else:
        cloth = random_colour(rng, (0.1, 0.7), (0.5, 0.95))
        textured_rect(draw, (0, 0, s, s), cloth, (245, 245, 245), str(rng.choice(("checker", "plain", "hstripes"))),
                      rng.uniform(0.08, 0.16) * s)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(0.15, 0.85) * s, rng.uniform(0.15, 0.85) * s, rng.uniform(0.14, 0.3) * s
        plate = jittered(rng, (238, 238, 232), 10)
        ellipse(draw, cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r, shaded(plate, 0.85))
        ellipse(draw, cx - 0.85 * r, cy - 0.68 * r, cx + 0.85 * r, cy + 0.68 * r, plate)
        for _ in range(int(rng.integers(3, 10))):
            fx, fy = cx + rng.uniform(-0.5, 0.5) * r, cy + rng.uniform(-0.4, 0.4) * r
            fr = rng.uniform(0.08, 0.3) * r
            food = hsv(rng.choice((0.0, 0.05, 0.1, 0.15, 0.3)) + rng.normal(0, 0.02), rng.uniform(0.5, 0.95),
                       rng.uniform(0.3, 0.9))
            ellipse(draw, fx - fr, fy - 0.7 * fr, fx + fr, fy + 0.7 * fr, food)
    if rng.random() < 0.6:  # cup
        cx, cy, r = rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.9) * s, rng.uniform(0.06, 0.1) * s
        cup = random_colour(rng, (0.0, 0.5), (0.6, 1.0))
        handle = (int(cx + 0.6 * r), int(cy - 0.4 * r), int(cx + 1.5 * r), int(cy + 0.4 * r))
        draw.arc(handle, 270, 90, fill=cup, width=2)
        ellipse(draw, cx - r, cy - r, cx + r, cy + r, cup)
        ellipse(draw, cx - 0.75 * r, cy - 0.75 * r, cx + 0.75 * r, cy + 0.75 * r, (70, 40, 20))
    for _ in range(int(rng.integers(0, 3))):  # cutlery
        x, y = rng.uniform(0.05, 0.95) * s, rng.uniform(0.1, 0.6) * s
        rect(draw, x, y, x + 0.015 * s, y + rng.uniform(0.2, 0.3) * s, (185, 185, 190))
    return canvas, 0.0, ()


def _scene_nature(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = _sky(rng, s, time_of_day)
    draw = ImageDraw.Draw(canvas)
    horizon = float(rng.uniform(0.5, 0.78)) * s
    if rng.random() < 0.4:  # sun or moon
        r = rng.uniform(0.03, 0.07) * s
        x, y = rng.uniform(0.1, 0.9) * s, rng.uniform(0.08, 0.4) * s
        ellipse(draw, x - r, y - r, x + r, y + r, (255, 240, 190) if time_of_day != "night" else (230, 230, 210))
    far = mixed(_SKY[time_of_day][1], (60, 70, 80), 0.5)
    for layer in range(int(rng.integers(1, 4))):
        colour = mixed(far, hsv(rng.uniform(0.25, 0.4), 0.5, 0.35), 0.35 * layer)
        points, x = [(0.0, horizon)], 0.0
        while x < s:
            x += rng.uniform(0.08, 0.25) * s
            points.append((x, horizon - rng.uniform(0.05, 0.35 - 0.07 * layer) * s))
        points.append((float(s), horizon))
        draw.polygon(points, fill=colour)
    _ground(draw, rng, s, horizon, str(rng.choice(("grass", "grass", "sand", "water", "snow"))))
    for _ in range(int(rng.integers(0, 7))):
        base = rng.uniform(horizon, 1.05 * s)
        _tree(draw, rng, rng.uniform(0, s), base, (0.15 + 0.6 * (base - horizon) / (s - horizon + 1)) * s)
    for _ in range(int(rng.integers(0, 4))):  # rocks
        x, y, r = rng.uniform(0, s), rng.uniform(horizon, s), rng.uniform(0.02, 0.08) * s
        ellipse(draw, x - r, y - 0.6 * r, x + r, y + 0.4 * r, jittered(rng, (120, 118, 112), 15))
    return canvas, horizon, ("person", "tree")


def _scene_street(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = _sky(rng, s, time_of_day)
    draw = ImageDraw.Draw(canvas)
    horizon = float(rng.uniform(0.55, 0.72)) * s
    x = rng.uniform(-0.1, 0.0) * s
    while x < s:  # ordinary houses and shops: plain boxes, no landmark parts
        w, h = rng.uniform(0.15, 0.35) * s, rng.uniform(0.15, 0.45) * s
        colour = hsv(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.45, 0.9))
        textured_rect(draw, (x, horizon - h, x + w, horizon + 0.05 * s), colour, shaded(colour, 0.6),
                      "windows" if rng.random() < 0.7 else "plain", rng.uniform(0.05, 0.09) * s)
        if rng.random() < 0.5:  # shop sign
            rect(draw, x + 0.1 * w, horizon - 0.08 * s, x + 0.9 * w, horizon - 0.04 * s, random_colour(rng))
        x += w
    rect(draw, 0, horizon + 0.05 * s, s, s, (95, 95, 100))
    rect(draw, 0, horizon + 0.05 * s, s, horizon + 0.1 * s, (160, 155, 150))
    vx = rng.uniform(0.3, 0.7) * s
    for k in range(6):  # lane markings
        t0, t1 = (k / 6) ** 1.6, ((k + 0.5) / 6) ** 1.6
        y0, y1 = horizon + 0.1 * s + (s - horizon) * t0 * 0.9, horizon + 0.1 * s + (s - horizon) * t1 * 0.9
        draw.line((vx + (0.5 * s - vx) * t0, y0, vx + (0.5 * s - vx) * t1, y1), fill=(230, 230, 220),
                  width=max(1, int(3 * t1)))
    for _ in range(int(rng.integers(0, 3))):  # poles
        px = rng.uniform(0, s)
        rect(draw, px, horizon - 0.3 * s, px + 1, horizon + 0.1 * s, (60, 60, 60))
    return canvas, horizon + 0.08 * s, ("person", "car", "car", "tree")


def _scene_people_closeup(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = Image.new("RGB", (s, s), random_colour(rng, (0.05, 0.5), (0.3, 0.9)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):  # out-of-focus background
        x, y, w = rng.uniform(-0.2, 1.0) * s, rng.uniform(-0.2, 1.0) * s, rng.uniform(0.2, 0.6) * s
        rect(draw, x, y, x + w, y + w, random_colour(rng, (0.05, 0.6), (0.3, 0.95)))
    canvas = canvas.filter(ImageFilter.BoxBlur(3))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(0.15, 0.85) * s, rng.uniform(0.3, 0.6) * s, rng.uniform(0.1, 0.22) * s
        skin = _SKIN[int(rng.integers(len(_SKIN)))]
        ellipse(draw, cx - 2.3 * r, cy + 1.1 * r, cx + 2.3 * r, cy + 4.5 * r, random_colour(rng))
        rect(draw, cx - 0.35 * r, cy + 0.6 * r, cx + 0.35 * r, cy + 1.4 * r, shaded(skin, 0.9))
        hair = hsv(0.08, rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.6))
        if rng.random() < 0.5:  # long hair behind the face
            rect(draw, cx - 0.95 * r, cy - 0.6 * r, cx + 0.95 * r, cy + 1.3 * r, hair)
        ellipse(draw, cx - 0.8 * r, cy - r, cx + 0.8 * r, cy + r, skin)
        scalp = (int(cx - 0.85 * r), int(cy - 1.12 * r), int(cx + 0.85 * r), int(cy + 0.5 * r))
        draw.pieslice(scalp, 180, 360, fill=hair)
        for ex in (-0.32, 0.32):
            ellipse(draw, cx + ex * r - 0.09 * r, cy - 0.05 * r, cx + ex * r + 0.09 * r, cy + 0.1 * r, (35, 30, 30))
        if rng.random() < 0.3:  # sunglasses
            rect(draw, cx - 0.55 * r, cy - 0.1 * r, cx + 0.55 * r, cy + 0.15 * r, (20, 20, 25))
        mouth = (int(cx - 0.3 * r), int(cy + 0.2 * r), int(cx + 0.3 * r), int(cy + 0.6 * r))
        draw.arc(mouth, 20, 160, fill=(120, 50, 50), width=1)
    return canvas, 0.0, ()


SCENES = {
    "indoor_room": _scene_indoor_room,
    "food_table": _scene_food_table,
    "nature": _scene_nature,
    "street": _scene_street,
    "people_closeup": _scene_people_closeup,
}
assert tuple(SCENES) == SCENE_KINDS, "config.SCENE_KINDS names the scenes, in this order"
