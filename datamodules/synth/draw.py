"""Drawing a landmark's structure with PIL: primitives, textured walls, the seven part kinds, the
composition of each shooting angle, and the finished view layer (RGBA, transparent where the sky
of each photo shows through).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from datamodules.synth.colours import RGB, hsv, jittered, mixed, shaded
from datamodules.synth.geometry import BASE_LINE, Blueprint, Part, View, perspective_coeffs

# ---- primitives --------------------------------------------------------------------------------

def rect(draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, fill) -> None:
    x0, x1 = sorted((int(round(x0)), int(round(x1))))
    y0, y1 = sorted((int(round(y0)), int(round(y1))))
    draw.rectangle((x0, y0, x1, y1), fill=fill)


def ellipse(draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, fill) -> None:
    x0, x1 = sorted((int(round(x0)), int(round(x1))))
    y0, y1 = sorted((int(round(y0)), int(round(y1))))
    draw.ellipse((x0, y0, x1, y1), fill=fill)


def textured_rect(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], colour: RGB,
                  accent: RGB, texture: str, period: float) -> None:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    p = max(3, int(round(period)))
    half = max(1, p // 2)
    if texture == "hstripes":
        for y in range(y0, y1, p):
            draw.rectangle((x0, y, x1 - 1, min(y + half, y1) - 1), fill=accent)
    elif texture == "vstripes":
        for x in range(x0, x1, p):
            draw.rectangle((x, y0, min(x + half, x1) - 1, y1 - 1), fill=accent)
    elif texture == "bricks":
        for row, y in enumerate(range(y0, y1, half + 1)):
            draw.line((x0, y, x1 - 1, y), fill=accent)
            for x in range(x0 + (row % 2) * half, x1, p):
                draw.line((x, y, x, min(y + half, y1 - 1)), fill=accent)
    elif texture == "windows":
        for y in range(y0 + p // 3, y1 - half, p + half // 2):
            for x in range(x0 + p // 3, x1 - half + 1, p):
                draw.rectangle((x, y, x + half - 1, min(y + p * 2 // 3, y1 - 1)), fill=accent)
    elif texture == "checker":
        for row, y in enumerate(range(y0, y1, half + 1)):
            for col, x in enumerate(range(x0, x1, half + 1)):
                if (row + col) % 2:
                    draw.rectangle((x, y, min(x + half, x1 - 1), min(y + half, y1 - 1)), fill=accent)
    elif texture == "arcade":
        for y in range(y0 + p // 3, y1 - p, 2 * p):
            for x in range(x0 + p // 4, x1 - half, p):
                draw.rectangle((x, y + half // 2, x + half, y + p + half // 2), fill=accent)
                draw.ellipse((x, y, x + half, y + half), fill=accent)


# ---- the seven part kinds -----------------------------------------------------------------------

_TRANSPARENT = (0, 0, 0, 0)


class _PartBox(NamedTuple):
    """A part as placed, in pixels: centre, base line, size and outline; its shaded colours and texture."""

    cx: float
    base: float
    w: float
    h: float
    x0: float
    x1: float
    top: float
    colour: RGB
    accent: RGB
    dark: RGB
    texture: str
    period: float


def _draw_part(draw: ImageDraw.ImageDraw, part: Part, cx: float, base: float, scale: float, size: int,
               shade: float = 1.0, side: bool = False) -> None:
    """One part standing on ``base`` (pixels), centred on ``cx``, ``scale`` times its nominal size."""
    w, h = part.width * size * scale, part.height * size * scale
    box = _PartBox(
        cx=cx, base=base, w=w, h=h, x0=cx - w / 2, x1=cx + w / 2, top=base - h,
        colour=shaded(part.colour, shade), accent=shaded(part.accent, shade), dark=shaded(part.colour, 0.35 * shade),
        texture=part.side_texture if side else part.texture, period=part.period * size * scale,
    )
    _PART_DRAWERS[part.kind](draw, part, box)


def _draw_tower(draw: ImageDraw.ImageDraw, part: Part, box: _PartBox) -> None:
    cx, base, w, h, x0, x1, top, colour, accent, dark, texture, period = box
    body_top = base - 0.78 * h
    textured_rect(draw, (x0, body_top, x1, base), colour, accent, texture, period)
    if part.top == "flat":
        rect(draw, x0 - 0.1 * w, body_top - 0.03 * h, x1 + 0.1 * w, body_top + 0.02 * h, accent)
    elif part.top == "crenels":
        merlon = w / 7
        for k in range(0, 7, 2):
            rect(draw, x0 + k * merlon, body_top - 0.06 * h, x0 + (k + 1) * merlon, body_top, colour)
    elif part.top == "roof":
        draw.polygon([(x0 - 0.06 * w, body_top), (cx, top), (x1 + 0.06 * w, body_top)], fill=accent)
    elif part.top == "dome":
        ellipse(draw, x0, body_top - 0.5 * w, x1, body_top + 0.5 * w, accent)
    else:
        draw.polygon([(cx - 0.3 * w, body_top), (cx, top - 0.1 * h), (cx + 0.3 * w, body_top)], fill=accent)
    if part.ornament:  # clock face
        ellipse(draw, cx - 0.28 * w, body_top + 0.12 * w, cx + 0.28 * w, body_top + 0.68 * w, accent)


def _draw_dome(draw: ImageDraw.ImageDraw, part: Part, box: _PartBox) -> None:
    cx, base, w, h, x0, x1, top, colour, accent, dark, texture, period = box
    drum_h, dome_h = 0.35 * h, 0.55 * h
    textured_rect(draw, (cx - 0.4 * w, base - drum_h, cx + 0.4 * w, base), colour, accent, texture, period)
    spring = base - drum_h
    draw.pieslice((int(x0), int(spring - dome_h), int(x1), int(spring + dome_h)), 180, 360, fill=accent)
    if texture in ("vstripes", "hstripes", "arcade"):  # ribs
        for k in (-0.3, -0.15, 0.0, 0.15, 0.3):
            draw.line((cx + k * w, spring, cx + 0.3 * k * w, spring - 0.95 * dome_h), fill=colour, width=1)
    if part.ornament:  # lantern
        rect(draw, cx - 0.05 * w, spring - dome_h - 0.08 * h, cx + 0.05 * w, spring - dome_h + 2, colour)
        draw.polygon([(cx - 0.06 * w, spring - dome_h - 0.08 * h), (cx, top - 0.02 * h),
                      (cx + 0.06 * w, spring - dome_h - 0.08 * h)], fill=accent)


def _draw_arch(draw: ImageDraw.ImageDraw, part: Part, box: _PartBox) -> None:
    cx, base, w, h, x0, x1, top, colour, accent, dark, texture, period = box
    attic = top + 0.14 * h
    textured_rect(draw, (x0, attic, x1, base), colour, accent, texture, period)
    rect(draw, x0 - 0.03 * w, top, x1 + 0.03 * w, attic, accent)
    # The opening is cut out of the layer, so the sky and ground of each photo show through.
    ow, oh = 0.45 * w, 0.62 * h
    rect(draw, cx - ow / 2, base - oh + ow / 2, cx + ow / 2, base, _TRANSPARENT)
    ellipse(draw, cx - ow / 2, base - oh, cx + ow / 2, base - oh + ow, _TRANSPARENT)
    if part.ornament:  # side passages
        for sx in (-0.36, 0.36):
            rect(draw, cx + sx * w - 0.06 * w, base - 0.3 * h, cx + sx * w + 0.06 * w, base, _TRANSPARENT)


def _draw_facade(draw: ImageDraw.ImageDraw, part: Part, box: _PartBox) -> None:
    cx, base, w, h, x0, x1, top, colour, accent, dark, texture, period = box
    cornice = top + 0.2 * h
    textured_rect(draw, (x0, cornice, x1, base), colour, accent, texture, period)
    if part.top in ("roof", "spire"):
        draw.polygon([(x0 - 0.02 * w, cornice), (cx, top), (x1 + 0.02 * w, cornice)], fill=accent)
    elif part.top == "crenels":
        step = w / 5
        for k in range(5):
            rect(draw, x0 + k * step, cornice - (0.1 + 0.05 * (k % 2)) * h, x0 + (k + 0.8) * step, cornice, accent)
    else:
        rect(draw, x0 - 0.03 * w, cornice - 0.04 * h, x1 + 0.03 * w, cornice + 0.02 * h, accent)
    rect(draw, cx - 0.07 * w, base - 0.32 * h, cx + 0.07 * w, base, dark)
    if part.ornament:  # rose window
        r = 0.09 * w
        ellipse(draw, cx - r, cornice + 0.05 * h, cx + r, cornice + 0.05 * h + 2 * r, accent)


def _draw_spire(draw: ImageDraw.ImageDraw, part: Part, box: _PartBox) -> None:
    cx, base, w, h, x0, x1, top, colour, accent, dark, texture, period = box
    shoulder = base - 0.3 * h
    textured_rect(draw, (x0, shoulder, x1, base), colour, accent, texture, period)
    draw.polygon([(x0, shoulder), (cx, top), (x1, shoulder)], fill=accent)
    if part.ornament:
        ellipse(draw, cx - 0.15 * w, top - 0.15 * w, cx + 0.15 * w, top + 0.15 * w, colour)


def _draw_colonnade(draw: ImageDraw.ImageDraw, part: Part, box: _PartBox) -> None:
    cx, base, w, h, x0, x1, top, colour, accent, dark, texture, period = box
    roof_h, beam_h, step_h = 0.18 * h, 0.12 * h, 0.06 * h
    beam = top + roof_h
    rect(draw, x0, beam + beam_h, x1, base - step_h, dark)
    if part.top in ("roof", "spire", "dome"):
        draw.polygon([(x0, beam), (cx, top), (x1, beam)], fill=accent)
    textured_rect(draw, (x0, beam, x1, beam + beam_h), accent, colour, texture, period)
    n = min(9, max(4, round(part.width / 0.08)))
    for k in range(n):
        xc = x0 + (k + 0.5) * w / n
        rect(draw, xc - w / (4 * n), beam + beam_h, xc + w / (4 * n), base - step_h, colour)
    rect(draw, x0 - 0.03 * w, base - step_h, x1 + 0.03 * w, base, accent)


def _draw_pyramid(draw: ImageDraw.ImageDraw, part: Part, box: _PartBox) -> None:
    cx, base, w, h, x0, x1, top, colour, accent, dark, texture, period = box
    draw.polygon([(x0, base), (cx, top), (x1, base)], fill=colour)
    if texture != "plain":
        for y in np.arange(top + period, base, max(2.0, period)):
            half_width = 0.5 * w * (y - top) / h
            draw.line((cx - half_width, y, cx + half_width, y), fill=accent)
    if part.ornament:
        draw.polygon([(cx - 0.06 * w, base), (cx, base - 0.14 * h), (cx + 0.06 * w, base)], fill=dark)


_PART_DRAWERS = {
    "tower": _draw_tower, "dome": _draw_dome, "arch": _draw_arch, "facade": _draw_facade,
    "spire": _draw_spire, "colonnade": _draw_colonnade, "pyramid": _draw_pyramid,
}


# ---- compositions, one per shooting angle ---------------------------------------------------------

class _Placed(NamedTuple):
    part: Part
    cx: float  # fraction of the canvas
    scale: float
    shade: float = 1.0
    side: bool = False


def _fit(placed: list[_Placed], max_height: float, max_width: float) -> list[_Placed]:
    """Scale and recentre a composition so it fits above the base line."""
    left = min(p.cx - p.part.width * p.scale / 2 for p in placed)
    right = max(p.cx + p.part.width * p.scale / 2 for p in placed)
    tallest = max(p.part.height * p.scale for p in placed)
    g = min(1.0, max_height / tallest, max_width / (right - left))
    mid = (left + right) / 2
    return [p._replace(cx=0.5 + (p.cx - mid) * g, scale=p.scale * g) for p in placed]


def _draw_composition(draw: ImageDraw.ImageDraw, placed: list[_Placed], size: int, base: float) -> None:
    for p in placed:
        _draw_part(draw, p.part, p.cx * size, base, p.scale, size, p.shade, p.side)


def _front_layout(blueprint: Blueprint, rng: np.random.Generator) -> list[_Placed]:
    main, others = blueprint.parts[0], blueprint.parts[1:]
    placed = []
    tall = [p for p in others if p.kind in ("dome", "spire", "tower", "pyramid")]
    if tall and rng.random() < 0.7:  # something rising behind the main part
        behind = tall[int(rng.integers(len(tall)))]
        placed.append(_Placed(behind, 0.5, min(1.6, max(1.0, 1.25 * main.height / behind.height))))
    flank = others[int(rng.integers(len(others)))]
    flank_scale = float(rng.uniform(0.5, 0.8))
    offset = main.width / 2 + flank.width * flank_scale * 0.35
    placed += [_Placed(flank, 0.5 - offset, flank_scale), _Placed(flank, 0.5 + offset, flank_scale)]
    placed.append(_Placed(main, 0.5, 1.0))
    return _fit(placed, 0.8, 0.96)


def _compose_front(draw, blueprint: Blueprint, rng: np.random.Generator, size: int) -> None:
    _draw_composition(draw, _front_layout(blueprint, rng), size, BASE_LINE * size)


def _compose_side(draw, blueprint: Blueprint, rng: np.random.Generator, size: int) -> None:
    parts = blueprint.parts
    count = int(rng.integers(3, min(5, len(parts)) + 1))
    order = [int(i) for i in rng.permutation(len(parts))[:count]]
    placed, x, scale = [], 0.0, 1.0
    for index in order:
        part = parts[index]
        placed.append(_Placed(part, x + part.width * scale / 2, scale, shade=0.8, side=True))
        x += part.width * scale * 0.8
        scale *= 0.82
    main = parts[0]
    wall = Part("facade", x, 0.2, main.accent, main.colour, main.side_texture, "hstripes",
                main.period, "flat", False)
    placed.insert(0, _Placed(wall, x / 2, 1.0, shade=0.9, side=False))
    _draw_composition(draw, _fit(placed, 0.8, 0.98), size, BASE_LINE * size)


def _compose_detail(draw, blueprint: Blueprint, rng: np.random.Generator, size: int) -> None:
    """A close-up: the front composition zoomed in on the body of one of its parts."""
    front_seed = next((v.layout_seed for v in blueprint.views if v.framing == "front"), None)
    layout = _front_layout(blueprint, rng if front_seed is None else np.random.default_rng(front_seed))
    textured = [p for p in layout if p.part.texture != "plain"] or layout
    focus = textured[int(rng.integers(len(textured)))]
    zoom = float(rng.uniform(2.2, 3.2))
    focus_x = focus.cx + float(rng.uniform(-0.25, 0.25)) * focus.part.width * focus.scale
    focus_y = BASE_LINE - float(rng.uniform(0.3, 0.6)) * focus.part.height * focus.scale
    zoomed = [p._replace(cx=0.5 + (p.cx - focus_x) * zoom, scale=p.scale * zoom) for p in layout]
    _draw_composition(draw, zoomed, size, (0.5 + (BASE_LINE - focus_y) * zoom) * size)


def _compose_distant(draw, blueprint: Blueprint, rng: np.random.Generator, size: int) -> None:
    base = BASE_LINE * size
    haze = hsv(rng.random(), rng.uniform(0.02, 0.15), rng.uniform(0.45, 0.75))
    x = -0.05
    while x < 1.05:  # the surrounding city skyline
        w, h = rng.uniform(0.06, 0.16), rng.uniform(0.06, 0.28)
        block = jittered(rng, haze, 18)
        textured_rect(draw, (x * size, base - h * size, (x + w) * size, base), block, shaded(block, 0.75),
                      "windows" if rng.random() < 0.6 else "plain", 0.035 * size)
        x += w + rng.uniform(-0.02, 0.03)
    count = min(len(blueprint.parts), int(rng.integers(2, 4)))
    others = rng.choice(np.arange(1, len(blueprint.parts)), count - 1, replace=False)
    group = [blueprint.parts[0]] + [blueprint.parts[int(i)] for i in others]
    placed, x = [], 0.0
    for part in group:
        placed.append(_Placed(part, x + part.width / 2, 1.0))
        x += part.width * 0.85
    placed = _fit(placed, float(rng.uniform(0.38, 0.5)), 0.5)
    shift = float(rng.uniform(-0.18, 0.18))
    _draw_composition(draw, [p._replace(cx=p.cx + shift) for p in placed], size, base)


def _compose_interior(draw, blueprint: Blueprint, rng: np.random.Generator, size: int) -> None:
    palette, parts = blueprint.palette, blueprint.parts
    s = size
    wall, floor_a, floor_b, ceiling = (palette[int(i)] for i in rng.permutation(len(palette))[:4])
    ceiling = shaded(ceiling, 0.55)
    vx, vy = rng.uniform(0.4, 0.6) * s, rng.uniform(0.4, 0.52) * s
    bx0, by0, bx1, by1 = vx - 0.24 * s, vy - 0.26 * s, vx + 0.24 * s, vy + 0.2 * s
    draw.polygon([(0, 0), (s, 0), (bx1, by0), (bx0, by0)], fill=ceiling)
    draw.polygon([(0, 0), (bx0, by0), (bx0, by1), (0, s)], fill=shaded(wall, 0.8))
    draw.polygon([(s, 0), (bx1, by0), (bx1, by1), (s, s)], fill=shaded(wall, 0.68))
    draw.polygon([(0, s), (s, s), (bx1, by1), (bx0, by1)], fill=floor_a)
    for k in range(1, 7):  # floor tiles in perspective
        t = (k / 7) ** 2
        y = by1 + (s - by1) * t
        draw.line((bx0 + (0 - bx0) * t, y, bx1 + (s - bx1) * t, y), fill=floor_b, width=1)
    for k in range(-4, 5):
        draw.line((vx + k * 0.06 * s, by1, vx + k * 0.3 * s, s), fill=floor_b, width=1)
    source = parts[int(rng.integers(len(parts)))]
    textured_rect(draw, (bx0, by0, bx1, by1), wall, source.accent, source.side_texture, source.period * s * 0.7)
    feature = rng.choice(("window", "altar", "rose"))
    if feature == "window":  # tall stained-glass window on the back wall
        ww = 0.16 * s
        stripes = max(3, int(rng.integers(3, 7)))
        for k in range(stripes):
            colour = palette[int(rng.integers(len(palette)))]
            left = vx - ww / 2 + k * ww / stripes
            rect(draw, left, by0 + 0.1 * s, left + ww / stripes, by1 - 0.06 * s, colour)
        draw.pieslice((int(vx - ww / 2), int(by0 + 0.02 * s), int(vx + ww / 2), int(by0 + 0.18 * s)), 180, 360,
                      fill=palette[int(rng.integers(len(palette)))])
    elif feature == "altar":
        rect(draw, vx - 0.12 * s, by1 - 0.12 * s, vx + 0.12 * s, by1, source.accent)
        gold = mixed(source.colour, (230, 190, 60), 0.6)
        rect(draw, vx - 0.05 * s, by0 + 0.04 * s, vx + 0.05 * s, by1 - 0.12 * s, gold)
    else:
        r = 0.12 * s
        ellipse(draw, vx - r, vy - r, vx + r, vy + r, source.accent)
        for k in range(8):
            a = k * math.pi / 4
            draw.line((vx, vy, vx + r * math.cos(a), vy + r * math.sin(a)), fill=source.colour, width=1)
    column = next((p for p in parts if p.kind in ("colonnade", "tower")), parts[0])
    pairs = int(rng.integers(2, 5))
    for k in reversed(range(pairs)):  # far columns first
        t = (k + 0.5) / pairs * 0.85
        width = (0.12 + (0.03 - 0.12) * t) * s
        top_y, bottom_y = by0 * t, s + (by1 - s) * t
        for x_edge, x_back in ((0.03 * s, bx0), (0.97 * s, bx1)):
            x = x_edge + (x_back - x_edge) * t
            textured_rect(draw, (x - width / 2, top_y, x + width / 2, bottom_y), column.colour, column.accent,
                          "vstripes" if column.texture == "plain" else column.texture, width / 3)
    for _ in range(int(rng.integers(0, 4))):  # lamps
        lx, ly = rng.uniform(0.2, 0.8) * s, rng.uniform(0.08, 0.3) * s
        draw.line((lx, 0, lx, ly), fill=(40, 40, 40))
        ellipse(draw, lx - 0.025 * s, ly, lx + 0.025 * s, ly + 0.04 * s, (255, 230, 150))


_COMPOSERS = {
    "front": _compose_front, "side": _compose_side, "interior": _compose_interior,
    "detail": _compose_detail, "distant": _compose_distant,
}

# ---- the view layer ----------------------------------------------------------------------------

def render_view(blueprint: Blueprint, view: View, size: int) -> Image.Image:
    """The structure of one view as a premultiplied RGBA layer (transparent where sky shows)."""
    rng = np.random.default_rng(view.layout_seed)
    opaque = view.framing == "interior"
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 255) if opaque else _TRANSPARENT)
    _COMPOSERS[view.framing](ImageDraw.Draw(layer), blueprint, rng, size)
    # Premultiplied, so that resampling does not bleed the black of transparent pixels into edges.
    layer = layer.convert("RGBa")
    if view.framing == "side":
        # The row of parts recedes: the far end shrinks towards the base line.
        base = BASE_LINE * size
        far = float(rng.uniform(0.55, 0.75))
        near_left = rng.random() < 0.5
        left, right = (1.0, far) if near_left else (far, 1.0)
        dst = [(0, base - base * left), (size, base - base * right), (size, base), (0, base)]
        src = [(0, 0), (size, 0), (size, base), (0, base)]
        layer = layer.transform((size, size), Image.Transform.PERSPECTIVE, perspective_coeffs(dst, src),
                                resample=Image.Resampling.BILINEAR)
    return layer
