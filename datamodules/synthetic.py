"""Procedural synthetic colour fundus photographs: the default dataset, so every pipeline runs without data.

One call renders one eye for two pipelines: diabetic-retinopathy grading (lesions depend on the grade,
international 0-4 scale) and optic-disc segmentation (the disc's binary mask comes with the image).

Design
------
The photograph is composed in float RGB (0..1) from anatomical layers, back to front:

1. background: fundus colour x illumination (radial vignetting, low-frequency unevenness, a flash gradient)
   x choroidal texture;
2. macula: a darker blurred spot 2.5 disc diameters temporal of the disc;
3. optic disc: a yellow-white ellipse with a brighter cup and a soft (blurred) edge;
4. vessel tree: four arcades (an artery and a vein each) grown from the disc centre as correlated random
   walks that branch recursively with tapering width, drawn anti-aliased into alpha layers;
5. grade-dependent lesions: microaneurysms, dot/blot and flame haemorrhages, hard exudates, cotton-wool
   spots, neovascular tufts and a pre-retinal haemorrhage;
6. camera: slight blur, sensor noise, the circular field stop, per-channel gamma and gain.

Every length is a fraction of the retina radius (or of the canvas), so one scene renders alike at any
size; tiny lesions are clamped to about a pixel so they survive small sizes. Noise textures are drawn on
fixed grids and resized for the same reason. Dark structures darken what lies below multiplicatively (a
vessel over the bright disc stays lighter than one over the macula, as in real photos); bright ones blend
towards a colour scaled by the local illumination, so nothing glows in the dark rim.

Randomness comes from ``np.random.SeedSequence([seed, grade])`` split into independent streams (anatomy,
hard-case disc, lesions, pixel noise). The same arguments give byte-identical output; the hard-case
decision and the lesion counts cannot shift the anatomy, and the sensor noise (the only draw whose size
depends on ``size``) cannot shift anything.

Lesion counts rise with the grade but the ranges of neighbouring grades overlap, as in real data, so the
grade is learnable from the overall picture but not from any single count.
"""

from __future__ import annotations

import math
import numbers
import textwrap
from dataclasses import dataclass, replace

import cv2
import numpy as np

NUM_GRADES = 5
MIN_SIZE = 64
HARD_CASE_PROBABILITY = 0.15

# cv2 drawing in fixed point: sub-pixel positions and radii, so small features do not snap to the grid.
_SHIFT = 4
_FIX = 1 << _SHIFT

# Vessel random walk: step length (fraction of the retina radius) and branching depth.
_STEP = 0.02
_MAX_LEVEL = 3

# Lesion count ranges (inclusive) per grade. Neighbouring grades overlap on purpose.
_MICROANEURYSMS = ((0, 0), (3, 12), (10, 25), (12, 30), (12, 30))
_HAEMORRHAGES = ((0, 0), (0, 0), (2, 6), (8, 20), (8, 20))
_EXUDATES = ((0, 0), (0, 0), (3, 15), (10, 30), (10, 30))
_COTTON_WOOL = ((0, 0), (0, 0), (0, 0), (2, 6), (2, 6))
_NEOVASCULAR_TUFTS = ((0, 0), (0, 0), (0, 0), (0, 0), (1, 3))

# Multiplicative colour of dark structures relative to the tissue below (R, G, B): blood absorbs green
# and blue far more than red, which is why vessels and haemorrhages stand out most in the green channel.
_VEIN = np.array([0.52, 0.28, 0.38], np.float32)
_ARTERY = np.array([0.70, 0.45, 0.50], np.float32)
_MICROANEURYSM = np.array([0.45, 0.18, 0.22], np.float32)
_HAEMORRHAGE = np.array([0.40, 0.15, 0.18], np.float32)
_FLAME = np.array([0.50, 0.20, 0.22], np.float32)
_NEOVESSEL = np.array([0.55, 0.26, 0.32], np.float32)
_PRERETINAL = np.array([0.33, 0.09, 0.11], np.float32)


@dataclass(frozen=True)
class SyntheticFundus:
    """One rendered photograph and its labels."""

    image: np.ndarray  # HxWx3 uint8 RGB
    disc_mask: np.ndarray  # HxW uint8, 0 or 255: the optic disc pixels visible inside the retina circle
    grade: int  # 0..4, international diabetic-retinopathy scale
    hard_case: bool  # the disc is faint, small and blurred, or partly outside the retina circle


@dataclass(frozen=True)
class _Eye:
    """Where the retina lies on the canvas; px units, x to the right, y down."""

    size: int
    cx: float
    cy: float
    radius: float
    nasal: int  # +1: the disc (nasal side) is right of the centre, -1: left


@dataclass(frozen=True)
class _Disc:
    cx: float
    cy: float
    ax: float  # semi-axis along the rotated x, px
    ay: float  # semi-axis along the rotated y, px
    angle: float  # radians
    opacity: float  # 1: fully the disc colour; hard cases go down to ~0.1
    edge_blur: float  # Gaussian sigma of the soft edge, px
    cup_scale: float  # cup semi-axes as a fraction of the disc's


@dataclass(frozen=True)
class _Vessel:
    points: np.ndarray  # (n, 2) px
    widths: np.ndarray  # (n,) px
    artery: bool


@dataclass(frozen=True)
class _Grid:
    xx: np.ndarray  # float32 pixel-centre x coordinates
    yy: np.ndarray
    dist: np.ndarray  # distance to the retina centre, px


def render_fundus(
    grade: int, size: int = 512, seed: int = 0, *, hard_case: bool | None = None
) -> SyntheticFundus:
    """Render a deterministic synthetic fundus photograph of the given diabetic-retinopathy grade.

    ``hard_case=None`` lets the seed decide (probability ``HARD_CASE_PROBABILITY``). Forcing it draws the
    same eye (colouring, disc size, lesion counts); only the disc is degraded, and where the disc is moved to
    the rim, the vessel tree and macula move with it.
    """
    grade, size = _validate(grade, size)
    anatomy, hard_rng, lesion_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(seed) % 2**64, grade]).spawn(4)
    )
    drawn_hard = bool(hard_rng.random() < HARD_CASE_PROBABILITY)
    hard = drawn_hard if hard_case is None else bool(hard_case)

    eye = _layout(anatomy, size)
    grid = _make_grid(eye)
    disc, disc_radius = _place_disc(anatomy, eye)
    if hard:
        disc = _make_hard(hard_rng, eye, grid, disc)
    fovea = _fovea(eye, disc, disc_radius)

    image, illumination = _background(anatomy, eye, grid)
    _draw_macula(anatomy, image, grid, fovea, disc_radius)
    _draw_disc(anatomy, image, illumination, grid, disc)
    vessels = _grow_vessel_tree(anatomy, eye, disc, fovea, disc_radius)
    _draw_vessels(image, vessels, eye, grid, disc, fovea)
    _draw_lesions(lesion_rng, grade, image, illumination, eye, disc, vessels, fovea)
    photo = _camera(anatomy, noise_rng, image, eye, grid)
    return SyntheticFundus(image=photo, disc_mask=_disc_mask(grid, disc, eye), grade=grade, hard_case=hard)


def synthetic_data_banner(real_data_hint: str) -> str:
    """The warning every DataModule logs when it falls back to synthetic images, ending with how to use real data.

    Shared so the grading and the segmentation pipelines shout the same thing; ``real_data_hint`` is the
    override that switches to real data (e.g. ``data=aptos|eyepacs data.root=<folder>``).
    """
    text = ("USING SYNTHETIC FUNDUS IMAGES (no dataset given). Metrics say nothing about real patients. "
            f"Real data: {real_data_hint}")
    rule = "!" * 78
    lines = [f"!!  {line:<81}  !!" for line in textwrap.wrap(text, 81)]
    return "\n".join(["", rule, *lines, rule])


def _validate(grade: int, size: int) -> tuple[int, int]:
    if isinstance(grade, bool) or not isinstance(grade, numbers.Integral) or not 0 <= grade < NUM_GRADES:
        raise ValueError(
            f"grade must be an integer in 0..{NUM_GRADES - 1} (international DR scale), got {grade!r}"
        )
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE} (pixels per side), got {size!r}")
    return int(grade), int(size)


# --------------------------------------------------------------------------------------------- geometry


def _layout(rng: np.random.Generator, size: int) -> _Eye:
    radius = rng.uniform(0.45, 0.48) * size
    # Off-centre so that a loader's circle crop has work to do; 0.48 + 0.015 < 0.5 keeps the corners black.
    offset_x, offset_y = rng.uniform(-0.015, 0.015, 2) * size
    nasal = 1 if rng.random() < 0.5 else -1  # left and right eyes
    centre = (size - 1) / 2
    return _Eye(size=size, cx=centre + offset_x, cy=centre + offset_y, radius=radius, nasal=nasal)


def _make_grid(eye: _Eye) -> _Grid:
    yy, xx = np.indices((eye.size, eye.size), dtype=np.float32)
    dist = np.sqrt((xx - np.float32(eye.cx)) ** 2 + (yy - np.float32(eye.cy)) ** 2)
    return _Grid(xx=xx, yy=yy, dist=dist)


def _place_disc(rng: np.random.Generator, eye: _Eye) -> tuple[_Disc, float]:
    """A normal disc on the nasal side; also returns its mean radius, the eye's unit of anatomy."""
    radius = rng.uniform(0.08, 0.13) * eye.radius
    aspect = rng.uniform(0.85, 1.15)  # vertical / horizontal; real discs are slightly taller than wide
    distance = rng.uniform(0.3, 0.45) * eye.radius
    drop = rng.uniform(-0.06, 0.06) * eye.radius
    disc = _Disc(
        cx=eye.cx + eye.nasal * distance,
        cy=eye.cy + drop,
        ax=radius / math.sqrt(aspect),
        ay=radius * math.sqrt(aspect),
        angle=rng.normal(0.0, 0.12),
        opacity=rng.uniform(0.78, 0.92),
        edge_blur=rng.uniform(0.08, 0.16) * radius,
        cup_scale=rng.uniform(0.3, 0.55),
    )
    return disc, radius


def _make_hard(rng: np.random.Generator, eye: _Eye, grid: _Grid, disc: _Disc) -> _Disc:
    """Degrade the disc in one or two of the ways that make real segmentation hard."""
    modes = rng.permutation(["faint", "small", "edge"])[: 1 if rng.random() < 0.7 else 2]
    if "faint" in modes:
        disc = replace(disc, opacity=rng.uniform(0.1, 0.28), cup_scale=disc.cup_scale * 0.7)
    if "small" in modes:
        # At least 0.05 of the retina radius: ~25 px of disc at size 128, enough to segment at all.
        scale = max(rng.uniform(0.5, 0.7), 0.05 * eye.radius / math.sqrt(disc.ax * disc.ay))
        disc = replace(disc, ax=disc.ax * scale, ay=disc.ay * scale)
        disc = replace(disc, edge_blur=rng.uniform(0.4, 0.7) * math.sqrt(disc.ax * disc.ay))
    if "edge" in modes:
        disc = _push_to_rim(rng, eye, grid, disc)
    return disc


def _min_visible_disc_area(eye: _Eye, disc: _Disc) -> float:
    # ~20 px at size 128, scaled with the canvas; at least a third of the disc so the task stays defined.
    return max(20.0 * (eye.size / 128) ** 2, math.pi * disc.ax * disc.ay / 3, 4.0)


def _push_to_rim(rng: np.random.Generator, eye: _Eye, grid: _Grid, disc: _Disc) -> _Disc:
    """Move the disc centre near or over the rim, resampling until enough of it stays visible."""
    mean_radius = math.sqrt(disc.ax * disc.ay)
    needed = _min_visible_disc_area(eye, disc)
    for _ in range(30):
        angle = rng.uniform(-0.7, 0.7)
        distance = eye.radius + mean_radius * rng.uniform(-0.7, 0.3)
        moved = replace(
            disc,
            cx=eye.cx + eye.nasal * distance * math.cos(angle),
            cy=eye.cy + distance * math.sin(angle),
        )
        if np.count_nonzero(_disc_mask(grid, moved, eye)) >= needed:
            return moved
    # Deterministic fallback (the draws above rarely all fail): just inside the rim.
    distance = eye.radius - 1.1 * mean_radius
    return replace(disc, cx=eye.cx + eye.nasal * distance, cy=eye.cy)


def _fovea(eye: _Eye, disc: _Disc, disc_radius: float) -> tuple[float, float]:
    # 2.5 disc diameters temporal of the disc and a little below it, as in real eyes.
    return disc.cx - eye.nasal * 5.0 * disc_radius, disc.cy + 0.3 * disc_radius


def _ellipse_rho(grid: _Grid, disc: _Disc, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """Normalised elliptic radius (1 on the boundary) of the disc scaled by ``scale``.

    ``shift`` moves the centre along the rotated x axis, in units of the disc semi-axis (cups sit temporal).
    """
    cos, sin = math.cos(disc.angle), math.sin(disc.angle)
    cx = disc.cx + shift * disc.ax * cos
    cy = disc.cy + shift * disc.ax * sin
    dx, dy = grid.xx - np.float32(cx), grid.yy - np.float32(cy)
    u = (dx * cos + dy * sin) / np.float32(disc.ax * scale)
    v = (dy * cos - dx * sin) / np.float32(disc.ay * scale)
    return np.sqrt(u * u + v * v)


def _disc_mask(grid: _Grid, disc: _Disc, eye: _Eye) -> np.ndarray:
    """The disc ellipse (without its blur halo) intersected with the retina circle, 0/255."""
    inside = (_ellipse_rho(grid, disc) <= 1.0) & (grid.dist <= eye.radius)
    return inside.astype(np.uint8) * 255


# ------------------------------------------------------------------------------------------ background


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Zero-mean noise with features ~size/cells pixels; drawn on a fixed grid so it ignores ``size``."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    interpolation = cv2.INTER_CUBIC if size >= cells else cv2.INTER_AREA
    return cv2.resize(coarse, (size, size), interpolation=interpolation)


def _background(rng: np.random.Generator, eye: _Eye, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Fundus colour under uneven illumination, plus choroidal texture; returns (image, illumination)."""
    size = eye.size
    # Pigmentation differs a lot between patients: from light orange to dark red-brown.
    red = rng.uniform(0.70, 0.92)
    green = red * rng.uniform(0.32, 0.48)
    blue = green * rng.uniform(0.25, 0.55)
    colour = np.array([red, green, blue], np.float32)

    r = np.minimum(grid.dist / np.float32(eye.radius), 1.1)
    vignette = 1.0 - rng.uniform(0.35, 0.55) * r ** rng.uniform(2.0, 3.2)
    direction = rng.uniform(0, 2 * math.pi)
    gradient = (
        rng.uniform(0.0, 0.12)
        * ((grid.xx - eye.cx) * math.cos(direction) + (grid.yy - eye.cy) * math.sin(direction))
        / np.float32(eye.radius)
    )
    uneven = 0.07 * _smooth_noise(rng, 4, size)
    illumination = (vignette * np.exp(uneven + gradient)).astype(np.float32)

    # Choroidal texture: blotchy at two scales, stronger in red and green (blue carries mostly noise).
    texture = 0.03 * _smooth_noise(rng, 40, size) + 0.03 * _smooth_noise(rng, 110, size)
    weights = np.array([0.8, 1.2, 0.6], np.float32)
    image = colour * illumination[..., None] * (1.0 + texture[..., None] * weights)
    return image.astype(np.float32), illumination


def _draw_macula(
    rng: np.random.Generator, image: np.ndarray, grid: _Grid, fovea: tuple[float, float], disc_radius: float
) -> None:
    d2 = (grid.xx - np.float32(fovea[0])) ** 2 + (grid.yy - np.float32(fovea[1])) ** 2
    macula = rng.uniform(0.25, 0.4) * np.exp(-d2 / np.float32(2 * (1.1 * disc_radius) ** 2))
    pit = rng.uniform(0.08, 0.16) * np.exp(-d2 / np.float32(2 * (0.3 * disc_radius) ** 2))
    # Macular pigment absorbs blue/green more than red: the spot looks darker and browner.
    image *= 1.0 - (macula + pit)[..., None] * np.array([0.75, 1.0, 0.95], np.float32)


def _soft_ellipse(
    grid: _Grid, disc: _Disc, blur: float, scale: float = 1.0, shift: float = 0.0
) -> np.ndarray:
    rho = _ellipse_rho(grid, disc, scale, shift)
    edge_px = min(disc.ax, disc.ay) * scale
    alpha = np.clip((1.0 - rho) * np.float32(edge_px) + 0.5, 0.0, 1.0)  # one-pixel anti-aliased edge
    return cv2.GaussianBlur(alpha, (0, 0), blur) if blur >= 0.3 else alpha


def _draw_disc(
    rng: np.random.Generator, image: np.ndarray, illumination: np.ndarray, grid: _Grid, disc: _Disc
) -> None:
    light = np.sqrt(np.clip(illumination, 0.05, None))[..., None]  # the disc reflects strongly: half-way lit
    rim = np.array([1.0, rng.uniform(0.72, 0.84), rng.uniform(0.48, 0.62)], np.float32)
    alpha = _soft_ellipse(grid, disc, disc.edge_blur) * np.float32(disc.opacity)
    _blend(image, alpha, rim * light)
    cup_blur = max(0.3 * disc.cup_scale * min(disc.ax, disc.ay), disc.edge_blur)
    cup = _soft_ellipse(grid, disc, cup_blur, scale=disc.cup_scale, shift=0.15)
    _blend(image, cup * np.float32(0.85 * disc.opacity), np.array([1.0, 0.96, 0.86], np.float32) * light)


# ----------------------------------------------------------------------------------------------- blend


def _blend(image: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> None:
    """In place: image <- image * (1 - alpha) + target * alpha."""
    a = alpha[..., None]
    image *= 1.0 - a
    image += target * a


def _darken(image: np.ndarray, alpha: np.ndarray, factors: np.ndarray) -> None:
    """In place: blend towards ``image * factors``, i.e. absorption by blood over whatever lies below."""
    image *= 1.0 - alpha[..., None] * (1.0 - factors)


def _layer(size: int, dtype: type = np.float32) -> np.ndarray:
    return np.zeros((size, size), dtype)


def _alpha(layer: np.ndarray, blur: float, opacity: float = 1.0) -> np.ndarray:
    scale = opacity / 255.0 if layer.dtype == np.uint8 else opacity
    alpha = layer.astype(np.float32) * np.float32(scale)
    return cv2.GaussianBlur(alpha, (0, 0), blur) if blur >= 0.3 else alpha


def _fix(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, np.float64) * _FIX).astype(np.int32)


def _stamp(
    layer: np.ndarray, centre: np.ndarray, axes: tuple[float, float], angle: float = 0.0, value: float = 1.0
) -> None:
    """Analytic anti-aliased filled ellipse, max-combined into a float layer.

    cv2 approximates small circles by coarse polygons (a 2 px circle becomes a diamond), and lesions are
    often that small, so blobs are rasterised from the implicit equation on a patch around them.
    """
    a, b = max(axes[0], 0.5), max(axes[1], 0.5)
    reach = max(a, b) + 1.5
    height, width = layer.shape
    x0, x1 = max(int(centre[0] - reach), 0), min(int(math.ceil(centre[0] + reach)) + 1, width)
    y0, y1 = max(int(centre[1] - reach), 0), min(int(math.ceil(centre[1] + reach)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return
    dy, dx = np.indices((y1 - y0, x1 - x0), dtype=np.float32)
    dx += np.float32(x0 - centre[0])
    dy += np.float32(y0 - centre[1])
    cos, sin = math.cos(angle), math.sin(angle)
    rho = np.sqrt(((dx * cos + dy * sin) / a) ** 2 + ((dy * cos - dx * sin) / b) ** 2)
    alpha = np.clip((1.0 - rho) * np.float32(min(a, b)) + 0.5, 0.0, 1.0) * np.float32(value)
    np.maximum(layer[y0:y1, x0:x1], alpha, out=layer[y0:y1, x0:x1])


def _polyline(layer: np.ndarray, fixed: np.ndarray, width: float, value: float) -> None:
    """Anti-aliased polyline through fixed-point ``fixed`` (n, 1, 2); widths under a pixel are drawn one
    pixel wide but proportionally fainter, so thin vessels fade out instead of vanishing."""
    thickness = max(1, int(round(width)))
    shade = int(round(value * min(1.0, width)))
    if shade > 0:
        cv2.polylines(layer, [fixed], False, shade, thickness, cv2.LINE_AA, _SHIFT)


# ---------------------------------------------------------------------------------------------- vessels


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    length: float,
    curvature: float,
    wiggle: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Correlated random walk in retina-radius units; curvature decays so arcades straighten out."""
    n = max(3, int(math.ceil(length / _STEP)) + 1)
    s = np.arange(n - 1) * _STEP
    turns = curvature * np.exp(-s / 0.45) * _STEP + rng.normal(0.0, wiggle, n - 1)
    headings = heading + np.concatenate([[0.0], np.cumsum(turns)])
    steps = _STEP * np.stack([np.cos(headings[1:]), np.sin(headings[1:])], axis=1)
    points = start + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    return points, headings


def _grow(
    rng: np.random.Generator,
    out: list[tuple[np.ndarray, np.ndarray, bool]],
    start: np.ndarray,
    heading: float,
    length: float,
    width: float,
    artery: bool,
    level: int,
    curvature: float,
) -> None:
    points, headings = _walk(rng, start, heading, length, curvature, wiggle=0.045 + 0.025 * level)
    widths = width * (1.0 - 0.4 / (len(points) - 1) * np.arange(len(points)))
    out.append((points, widths, artery))
    if level >= _MAX_LEVEL:
        return
    low, high = ((3, 4), (1, 3), (1, 2))[level]
    count = int(rng.integers(low, high + 1))
    side = 1 if rng.random() < 0.5 else -1
    for t in np.sort(rng.uniform(0.12, 0.85, count)):
        i = int(t * (len(points) - 1))
        _grow(
            rng,
            out,
            points[i],
            headings[i] + side * rng.uniform(0.45, 1.1),  # branches leave at acute angles
            length * rng.uniform(0.35, 0.6),
            widths[i] * rng.uniform(0.55, 0.75),
            artery,
            level + 1,
            curvature=rng.normal(0.0, 1.5),
        )
        side = -side if rng.random() < 0.8 else side  # mostly alternating, like real bifurcations


def _grow_vessel_tree(
    rng: np.random.Generator, eye: _Eye, disc: _Disc, fovea: tuple[float, float], disc_radius: float
) -> list[_Vessel]:
    """Arcades in a local frame (x temporal, y down, units of the retina radius) mapped onto the image.

    Every main vessel starts within a third of a disc radius of the disc centre, so the tree converges on
    the disc. Temporal arcades arch around the macula; nasal ones are shorter and straighter.
    """
    local: list[tuple[np.ndarray, np.ndarray, bool]] = []
    jitter = 0.3 * disc_radius / eye.radius
    vein_width = rng.uniform(0.015, 0.019)
    # (initial heading, curvature sign, length): superior/inferior temporal, superior/inferior nasal.
    arcades = (
        (-1.35, 1, (0.95, 1.2)),
        (1.35, -1, (0.95, 1.2)),
        (-1.95, -1, (0.6, 0.85)),
        (1.95, 1, (0.6, 0.85)),
    )
    for heading, bend, (short, long) in arcades:
        for artery in (False, True):
            start = rng.uniform(-jitter, jitter, 2)
            _grow(
                rng,
                local,
                start,
                heading + rng.normal(0.0, 0.12) + (0.1 if artery else -0.1) * np.sign(heading),
                rng.uniform(short, long),
                vein_width * (0.75 if artery else 1.0),
                artery,
                level=0,
                curvature=bend * rng.uniform(2.2, 3.2),
            )
    # Small papillomacular vessels run straight from the disc towards the fovea.
    towards_fovea = math.atan2(fovea[1] - disc.cy, -eye.nasal * (fovea[0] - disc.cx))
    for _ in range(int(rng.integers(2, 5))):
        _grow(
            rng,
            local,
            rng.uniform(-jitter, jitter, 2),
            towards_fovea + rng.uniform(-0.6, 0.6),
            rng.uniform(0.15, 0.3),
            vein_width * rng.uniform(0.3, 0.45),
            bool(rng.random() < 0.5),
            level=_MAX_LEVEL - 1,
            curvature=rng.normal(0.0, 1.0),
        )
    flip = np.array([-eye.nasal, 1.0]) * eye.radius  # local temporal x points away from the nasal side
    origin = np.array([disc.cx, disc.cy])
    return [_Vessel(origin + points * flip, widths * eye.radius, artery) for points, widths, artery in local]


def _draw_vessels(
    image: np.ndarray, vessels: list[_Vessel], eye: _Eye, grid: _Grid, disc: _Disc, fovea: tuple[float, float]
) -> None:
    layers = {False: _layer(eye.size, np.uint8), True: _layer(eye.size, np.uint8)}
    chunk = 4  # constant width per chunk of a few steps: tapering at a fraction of the per-segment cost
    for vessel in vessels:
        layer = layers[vessel.artery]
        opacity = 215 if vessel.artery else 235
        fixed = _fix(vessel.points).reshape(-1, 1, 2)
        last = len(fixed) - 1
        for begin in range(0, last, chunk):
            # Widths taper linearly, so the middle sample is the chunk's mean width.
            width = float(vessel.widths[min(begin + chunk // 2, last)])
            _polyline(layer, fixed[begin : begin + chunk + 1], width, opacity)
    # The foveal avascular zone: capillaries stop short of the very centre of the macula.
    d2 = (grid.xx - np.float32(fovea[0])) ** 2 + (grid.yy - np.float32(fovea[1])) ** 2
    avascular = 1.0 - np.exp(-d2 / np.float32(2 * (0.045 * eye.radius) ** 2))
    # Vessels dive into the cup: without this fade their overlapping starts form a dark knot at the centre.
    d2 = (grid.xx - np.float32(disc.cx)) ** 2 + (grid.yy - np.float32(disc.cy)) ** 2
    avascular *= 1.0 - 0.6 * np.exp(-d2 / np.float32(2 * (0.3 * min(disc.ax, disc.ay)) ** 2))
    blur = 0.3 + 0.5 * eye.size / 512
    _darken(image, _alpha(layers[False], blur) * avascular, _VEIN)
    _darken(image, _alpha(layers[True], blur) * avascular, _ARTERY)


# ---------------------------------------------------------------------------------------------- lesions


def _count(rng: np.random.Generator, table: tuple[tuple[int, int], ...], grade: int) -> int:
    low, high = table[grade]
    return int(rng.integers(low, high + 1)) if high > 0 else 0


def _sample_points(
    rng: np.random.Generator,
    n: int,
    eye: _Eye,
    disc: _Disc,
    *,
    near: tuple[float, float] | None = None,
    spread: float = 0.0,
    max_r: float = 0.88,
    clearance: float = 1.6,
) -> np.ndarray:
    """``n`` points (px) inside the retina and off the disc; uniform-ish, or Gaussian around ``near``."""
    if n == 0:
        return np.zeros((0, 2))
    disc_keepout = clearance * max(disc.ax, disc.ay)
    found: list[np.ndarray] = []
    total = 0
    for _ in range(50):  # bounded, so a pathological layout cannot hang; the draws stay deterministic
        batch = 4 * n + 8
        if near is None:
            # Biased towards the posterior pole, where diabetic lesions concentrate.
            r = max_r * eye.radius * rng.random(batch) ** 0.75
            theta = rng.uniform(0, 2 * math.pi, batch)
            points = np.stack([eye.cx + r * np.cos(theta), eye.cy + r * np.sin(theta)], axis=1)
        else:
            points = np.asarray(near) + rng.normal(0.0, spread * eye.radius, (batch, 2))
        ok = (np.hypot(points[:, 0] - eye.cx, points[:, 1] - eye.cy) <= max_r * eye.radius) & (
            np.hypot(points[:, 0] - disc.cx, points[:, 1] - disc.cy) > disc_keepout
        )
        found.append(points[ok])
        total += int(ok.sum())
        if total >= n:
            break
    return np.concatenate(found)[:n]


def _draw_lesions(
    rng: np.random.Generator,
    grade: int,
    image: np.ndarray,
    illumination: np.ndarray,
    eye: _Eye,
    disc: _Disc,
    vessels: list[_Vessel],
    fovea: tuple[float, float],
) -> None:
    if grade == 0:
        return
    light = illumination[..., None]
    _microaneurysms(rng, grade, image, eye, disc)
    _haemorrhages(rng, grade, image, eye, disc)
    _hard_exudates(rng, grade, image, light, eye, disc, fovea)
    _cotton_wool_spots(rng, grade, image, light, eye, disc)
    if grade == 4:
        _neovascularisation(rng, image, eye, disc, vessels)
        if rng.random() < 0.5:
            _preretinal_haemorrhage(rng, image, eye, disc)


def _microaneurysms(rng: np.random.Generator, grade: int, image: np.ndarray, eye: _Eye, disc: _Disc) -> None:
    n = _count(rng, _MICROANEURYSMS, grade)
    layer = _layer(eye.size)
    points = _sample_points(rng, n, eye, disc)
    radii = np.maximum(rng.uniform(0.004, 0.008, len(points)) * eye.size, 0.7)  # stay visible at 64 px
    for point, radius in zip(points, radii, strict=True):
        _stamp(layer, point, (radius, radius))
    _darken(image, _alpha(layer, 0.0012 * eye.size, 0.95), _MICROANEURYSM)


def _haemorrhages(rng: np.random.Generator, grade: int, image: np.ndarray, eye: _Eye, disc: _Disc) -> None:
    n = _count(rng, _HAEMORRHAGES, grade)
    if n == 0:
        return
    size = eye.size
    flames = int(round(n * rng.uniform(0.2, 0.45))) if grade >= 3 else 0
    blots = _layer(size)
    for centre in _sample_points(rng, n - flames, eye, disc):
        # Dot/blot haemorrhages are irregular: the union of a few overlapping discs.
        base = rng.uniform(0.008, 0.02) * size
        for _ in range(int(rng.integers(1, 5))):
            radius = max(base * rng.uniform(0.5, 1.0), 0.8)
            _stamp(blots, centre + rng.normal(0.0, 0.45 * base, 2), (radius, radius))
    _darken(image, _alpha(blots, 0.0025 * size, 0.92), _HAEMORRHAGE)
    if flames == 0:
        return
    flame_layer = _layer(size)
    # Flame haemorrhages lie in the nerve-fibre layer, which is thick near the disc; they point along the
    # fibres, i.e. roughly radially away from the disc.
    for centre in _sample_points(rng, flames, eye, disc, near=(disc.cx, disc.cy), spread=0.35):
        angle = math.atan2(centre[1] - disc.cy, centre[0] - disc.cx) + rng.normal(0.0, 0.25)
        axes = (max(rng.uniform(0.018, 0.04) * size, 1.5), max(rng.uniform(0.005, 0.009) * size, 0.7))
        _stamp(flame_layer, centre, axes, angle)
    _darken(image, _alpha(flame_layer, 0.004 * size, 0.85), _FLAME)


def _hard_exudates(
    rng: np.random.Generator,
    grade: int,
    image: np.ndarray,
    light: np.ndarray,
    eye: _Eye,
    disc: _Disc,
    fovea: tuple[float, float],
) -> None:
    n = _count(rng, _EXUDATES, grade)
    if n == 0:
        return
    size = eye.size
    clustered = int(round(n * rng.uniform(0.6, 0.9)))
    groups = []
    for i in range(int(rng.integers(1, 4))):
        # Exudates leak around the macula and collect in clusters (circinate rings in real eyes).
        angle, distance = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.3) * eye.radius
        centre = (fovea[0] + distance * math.cos(angle), fovea[1] + distance * math.sin(angle))
        share = clustered // 3 + (1 if i < clustered % 3 else 0)
        groups.append(_sample_points(rng, share, eye, disc, near=centre, spread=0.04))
    groups.append(_sample_points(rng, n - clustered, eye, disc))
    layer = _layer(size)
    for point in np.concatenate(groups):
        radius = max(rng.uniform(0.003, 0.007) * size, 0.6)
        _stamp(layer, point, (radius, radius * rng.uniform(0.75, 1.0)), rng.uniform(0, math.pi))
    colour = np.array([1.0, rng.uniform(0.85, 0.95), rng.uniform(0.35, 0.55)], np.float32)
    _blend(image, _alpha(layer, 0.0012 * size, 0.95), colour * np.sqrt(light))


def _cotton_wool_spots(
    rng: np.random.Generator, grade: int, image: np.ndarray, light: np.ndarray, eye: _Eye, disc: _Disc
) -> None:
    n = _count(rng, _COTTON_WOOL, grade)
    if n == 0:
        return
    size = eye.size
    layer = _layer(size)
    for centre in _sample_points(rng, n, eye, disc, near=(disc.cx, disc.cy), spread=0.4, clearance=2.0):
        major = rng.uniform(0.015, 0.032) * size
        axes = (max(major, 1.0), max(major * rng.uniform(0.55, 1.0), 0.8))
        _stamp(layer, centre, axes, rng.uniform(0, math.pi), rng.uniform(0.5, 0.75))
    # Fluffy edges: heavy blur, then a patchy modulation so the spots are not clean ellipses.
    fluff = np.clip(1.0 + 0.35 * _smooth_noise(rng, 60, size), 0.3, 1.5)
    alpha = np.clip(_alpha(layer, 0.01 * size) * fluff, 0.0, 0.8)
    _blend(image, alpha, np.array([0.93, 0.86, 0.76], np.float32) * np.sqrt(light))


def _neovascularisation(
    rng: np.random.Generator, image: np.ndarray, eye: _Eye, disc: _Disc, vessels: list[_Vessel]
) -> None:
    """Tufts of fine, tortuous new vessels at the disc (NVD) or along the arcades (NVE)."""
    size = eye.size
    layer = _layer(size, np.uint8)
    mains = vessels[:8]
    disc_radius = math.sqrt(disc.ax * disc.ay)
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:
            angle = rng.uniform(0, 2 * math.pi)
            distance = rng.uniform(1.2, 2.2) * disc_radius
            centre = np.array([disc.cx + distance * math.cos(angle), disc.cy + distance * math.sin(angle)])
        else:
            vessel = mains[int(rng.integers(len(mains)))]
            centre = vessel.points[int(rng.uniform(0.25, 0.6) * (len(vessel.points) - 1))]
        if math.hypot(centre[0] - eye.cx, centre[1] - eye.cy) > 0.85 * eye.radius:
            centre = np.array([eye.cx, eye.cy]) + 0.8 * (np.array([disc.cx, disc.cy]) - [eye.cx, eye.cy])
        extent = rng.uniform(0.05, 0.09) * eye.radius
        for _ in range(int(rng.integers(12, 31))):
            start = centre + rng.normal(0.0, 0.35 * extent, 2)
            # A fast-turning walk, shrunk so its steps are a few pixels: tortuous loops, not smooth curves.
            points, _ = _walk(rng, np.zeros(2), rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.2), 0.0, 0.6)
            fixed = _fix(start + points * 0.35 * eye.radius).reshape(-1, 1, 2)
            _polyline(layer, fixed, max(0.0025 * size, 0.45), 235)
    _darken(image, _alpha(layer, 0.3 + 0.2 * size / 512, 0.9), _NEOVESSEL)


def _preretinal_haemorrhage(rng: np.random.Generator, image: np.ndarray, eye: _Eye, disc: _Disc) -> None:
    size = eye.size
    layer = _layer(size)
    radius = rng.uniform(0.05, 0.09) * eye.radius
    centre = _sample_points(
        rng, 1, eye, disc, max_r=0.7, clearance=1.6 + 1.2 * radius / max(disc.ax, disc.ay)
    )
    if len(centre) == 0:
        return
    centre = centre[0]
    axes = (radius * rng.uniform(1.1, 1.5), radius)
    _stamp(layer, centre, axes, rng.normal(0.0, 0.1))
    # Blood settles under gravity: a flat fluid level on top ("boat-shaped" haemorrhage).
    level = int(round(centre[1] - rng.uniform(0.1, 0.45) * radius))
    layer[: max(level, 0)] = 0
    _darken(image, _alpha(layer, 0.003 * size, 0.95), _PRERETINAL)


# ----------------------------------------------------------------------------------------------- camera


def _camera(
    rng: np.random.Generator, noise_rng: np.random.Generator, image: np.ndarray, eye: _Eye, grid: _Grid
) -> np.ndarray:
    size = eye.size
    sigma = 0.0012 * size
    if sigma >= 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image += noise_rng.standard_normal(image.shape, np.float32) * np.float32(rng.uniform(0.006, 0.014))
    # Field stop: the retina circle with a one-pixel anti-aliased rim, pure black outside.
    field = np.clip(np.float32(eye.radius + 0.5) - grid.dist, 0.0, 1.0)
    image *= field[..., None]
    photo = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    # Exposure and white balance differ between cameras: per-channel gamma and gain (0 stays 0).
    levels = np.arange(256, dtype=np.float64) / 255.0
    gamma = rng.uniform(0.85, 1.18) * rng.uniform(0.95, 1.05, 3)
    gain = rng.uniform(0.9, 1.12) * rng.uniform(0.96, 1.04, 3)
    table = np.stack([np.clip(gain[c] * levels ** gamma[c], 0.0, 1.0) for c in range(3)], axis=1)
    lut = (table * 255.0 + 0.5).astype(np.uint8).reshape(1, 256, 3)
    return cv2.LUT(photo, lut)
