"""Parametric face renderer and image operators of the built-in synthetic benchmark.

Every function here is pure: its output depends only on its arguments (parameters and, where
randomness is needed, a `numpy.random.Generator`), so a seed fixes the pixels. Shapes are drawn
with OpenCV's integer rasteriser on a supersampled canvas and box-averaged down; every later
operation is float64 numpy arithmetic on short, fixed-order sums (no BLAS, no threads), so the
output does not depend on the number of threads or workers. JPEG uses OpenCV's libjpeg with its
default integer DCT.

Coordinates: a face is drawn in its own frame (x right, y down, unit = image width, origin at the
face centre); `Scene` places that frame in the image (centre, scale, roll).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

Colour = tuple[float, float, float]  # RGB in [0, 1]

_SHIFT = 4  # OpenCV sub-pixel bits for drawing
_ONE = 1 << _SHIFT

# Palettes (RGB 0-255) the identities are drawn from.
_SKIN_TONES = np.array(
    [
        [255, 224, 200],
        [238, 193, 160],
        [214, 160, 120],
        [176, 120, 84],
        [120, 78, 52],
        [84, 54, 38],
    ],
    dtype=np.float64,
)
HAIR_COLOURS = np.array(
    [
        [25, 20, 18],
        [60, 40, 28],
        [105, 70, 40],
        [170, 125, 70],
        [225, 195, 130],
        [150, 60, 30],
        [140, 140, 140],
        [230, 230, 225],
    ],
    dtype=np.float64,
)
_HAIR_WEIGHTS = np.array([0.28, 0.24, 0.16, 0.1, 0.08, 0.05, 0.06, 0.03])
_IRIS_COLOURS = np.array(
    [[70, 45, 25], [110, 75, 40], [60, 100, 150], [80, 120, 80], [110, 110, 120]], dtype=np.float64
)
_HAIR_STYLES = ("short", "long", "bald", "curly")
_HAIR_STYLE_WEIGHTS = (0.42, 0.34, 0.1, 0.14)


@dataclass(frozen=True)
class Identity:
    """What stays fixed for one person: shape, colours, features (lengths in image widths)."""

    face_a: float  # half width of the head
    face_b: float  # half height of the head
    chin_taper: float  # 0 = elliptic jaw, larger = narrower chin
    skin: Colour
    hair: Colour
    hair_style: str  # one of _HAIR_STYLES
    hair_volume: float  # hair outline / head outline
    hairline: float  # forehead hairline height, fraction of face_b above the centre
    parting: float  # horizontal offset of the parting, fraction of face_a
    eye_y: float  # eye line, fraction of face_b (negative = above the centre)
    eye_dx: float  # eye centre distance from the midline, fraction of face_a
    eye_w: float  # eye half width, fraction of face_a
    eye_h: float  # eye half height / eye half width
    iris: Colour
    brow_gap: float  # eye-to-brow distance, fraction of face_b
    brow_thick: float  # fraction of face_b
    brow_arch: float  # fraction of face_b
    nose_len: float  # nose tip below the eye line, fraction of face_b
    nose_w: float  # fraction of face_a
    mouth_y: float  # fraction of face_b
    mouth_w: float  # half width, fraction of face_a
    lip_thick: float  # fraction of face_b
    lips: Colour
    beard: bool
    glasses: bool
    glasses_colour: Colour
    clothes: Colour


@dataclass(frozen=True)
class Scene:
    """What changes from one picture of a person to the next: pose, expression, light, room."""

    cx: float  # face centre in image widths
    cy: float
    scale: float
    roll: float  # radians, positive = clockwise on screen
    yaw: float  # horizontal shift of the features inside the outline, fraction of face_a
    light_angle: float  # radians, direction the light comes from
    light: float  # strength of the lighting gradient
    mouth_open: float  # fraction of face_b
    smile: float  # corner lift, -1..1
    eye_open: float  # 0..1
    gaze: float  # iris shift, fraction of the eye width
    brow_raise: float  # fraction of face_b
    bg_top: Colour
    bg_bottom: Colour
    bg_shapes: tuple[tuple[float, float, float, float, float, float, float, float], ...]
    bokeh: bool  # background blurred (portrait look of face generators)


def _colour(rgb: np.ndarray) -> Colour:
    c = np.clip(rgb / 255.0, 0.0, 1.0)
    return (float(c[0]), float(c[1]), float(c[2]))


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one person's parameters."""
    u = rng.uniform
    tone = u(0.0, len(_SKIN_TONES) - 1)
    lo = int(math.floor(tone))
    hi = min(lo + 1, len(_SKIN_TONES) - 1)
    skin = _SKIN_TONES[lo] + (tone - lo) * (_SKIN_TONES[hi] - _SKIN_TONES[lo])
    skin = skin + rng.normal(0.0, 6.0, 3)
    hair = HAIR_COLOURS[rng.choice(len(HAIR_COLOURS), p=_HAIR_WEIGHTS)] + rng.normal(0, 8, 3)
    style = _HAIR_STYLES[rng.choice(len(_HAIR_STYLES), p=_HAIR_STYLE_WEIGHTS)]
    iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 6, 3)
    lips = 0.55 * skin + 0.45 * np.array([190.0, 70.0, 80.0]) + rng.normal(0, 6, 3)
    face_a = u(0.25, 0.29)
    return Identity(
        face_a=face_a,
        face_b=face_a * u(1.22, 1.4),
        chin_taper=u(0.15, 0.45),
        skin=_colour(skin),
        hair=_colour(hair),
        hair_style=style,
        hair_volume=u(1.04, 1.16),
        hairline=u(0.5, 0.72),
        parting=u(-0.35, 0.35),
        eye_y=-u(0.06, 0.16),
        eye_dx=u(0.36, 0.44),
        eye_w=u(0.17, 0.22),
        eye_h=u(0.42, 0.56),
        iris=_colour(iris),
        brow_gap=u(0.14, 0.2),
        brow_thick=u(0.035, 0.06),
        brow_arch=u(0.01, 0.05),
        nose_len=u(0.24, 0.34),
        nose_w=u(0.2, 0.28),
        mouth_y=u(0.48, 0.58),
        mouth_w=u(0.3, 0.4),
        lip_thick=u(0.035, 0.06),
        lips=_colour(lips),
        beard=bool(u() < 0.15),
        glasses=bool(u() < 0.12),
        glasses_colour=_colour(rng.uniform(10, 120, 3)),
        clothes=_colour(rng.uniform(20, 235, 3)),
    )


def sample_scene(rng: np.random.Generator, *, generated: bool = False) -> Scene:
    """Draw pose, expression, light and background for one picture.

    `generated=True` gives the look of face generators' outputs: centred, frontal, aligned faces
    in front of a blurred background (as in FFHQ-style data).
    """
    u = rng.uniform
    jitter = 0.3 if generated else 1.0
    top = np.clip(rng.uniform(35, 225) + rng.normal(0, 28, 3), 0, 255)  # muted indoor colours
    bottom = np.clip(top + rng.normal(0, 30, 3), 0, 255)
    shapes = []
    for _ in range(int(rng.integers(1, 5))):
        shade = np.clip(0.5 * (top + bottom) + rng.normal(0, 35, 3), 0, 255) / 255.0
        shapes.append(
            (
                float(u(0.0, 1.0)),
                float(u(0.0, 1.0)),
                float(u(0.05, 0.35)),
                float(u(0.05, 0.35)),
                float(u(0.0, 180.0)),
                float(shade[0]),
                float(shade[1]),
                float(shade[2]),
            )
        )
    return Scene(
        cx=0.5 + jitter * u(-0.035, 0.035),
        cy=0.47 + jitter * u(-0.03, 0.03),
        scale=1.0 + jitter * u(-0.07, 0.07),
        roll=jitter * float(np.clip(rng.normal(0.0, 0.08), -0.18, 0.18)),
        yaw=jitter * u(-0.08, 0.08),
        light_angle=u(0.0, 2 * math.pi),
        light=u(0.05, 0.3),
        mouth_open=float(max(0.0, u(-0.06, 0.08))),
        smile=u(-0.3, 0.8),
        eye_open=u(0.7, 1.0),
        gaze=u(-0.25, 0.25),
        brow_raise=u(-0.02, 0.03),
        bg_top=_colour(top),
        bg_bottom=_colour(bottom),
        bg_shapes=tuple(shapes),
        bokeh=bool(generated),
    )


def sample_expression(rng: np.random.Generator, scene: Scene) -> dict[str, float]:
    """A new expression clearly different from the scene's, with some of the driving frame's
    lighting (used by reenactment)."""
    u = rng.uniform
    mouth_open = u(0.08, 0.16) if scene.mouth_open < 0.03 else u(0.0, 0.015)
    smile = scene.smile + (u(0.6, 1.1) if scene.smile < 0.25 else -u(0.6, 1.1))
    return {
        "light_angle": float(scene.light_angle + rng.normal(0.0, 0.8)),
        "light": float(u(0.05, 0.3)),
        "mouth_open": float(mouth_open),
        "smile": float(np.clip(smile, -0.5, 1.0)),
        "eye_open": float(u(0.45, 1.0)),
        "gaze": float(u(-0.35, 0.35)),
        "brow_raise": float(u(-0.03, 0.05)),
    }


class _Frame:
    """Maps face-frame points to OpenCV's shifted integer canvas coordinates."""

    def __init__(self, scene: Scene, canvas: int):
        self.px = canvas * scene.scale  # face units -> canvas pixels
        self.c = np.array([scene.cx * canvas, scene.cy * canvas])
        cos, sin = math.cos(scene.roll), math.sin(scene.roll)
        self.rot = np.array([[cos, -sin], [sin, cos]])
        self.angle = math.degrees(scene.roll)

    def pts(self, xy: np.ndarray) -> np.ndarray:
        world = self.c + self.px * (np.asarray(xy, dtype=np.float64).reshape(-1, 2) @ self.rot.T)
        return np.rint(world * _ONE).astype(np.int32)

    def ellipse(self, img, centre, axes, colour, angle=0.0, start=0, end=360, thickness=-1):
        c = self.pts(np.array(centre))[0]
        ax = (
            max(1, int(round(axes[0] * self.px * _ONE))),
            max(1, int(round(axes[1] * self.px * _ONE))),
        )
        cv2.ellipse(
            img,
            (int(c[0]), int(c[1])),
            ax,
            self.angle + angle,
            start,
            end,
            colour,
            thickness,
            cv2.LINE_AA,
            _SHIFT,
        )

    def poly(self, img, xy, colour):
        cv2.fillPoly(img, [self.pts(xy)], colour, cv2.LINE_AA, _SHIFT)

    def line(self, img, xy, colour, thickness):
        t = max(1, int(round(thickness * self.px)))
        cv2.polylines(img, [self.pts(xy)], False, colour, t, cv2.LINE_AA, _SHIFT)


def _rgb255(c: Colour, k: float = 1.0) -> tuple[int, int, int]:
    return tuple(min(255, max(0, int(round(v * 255 * k)))) for v in c)


def _mix(c1: Colour, c2: Colour, t: float) -> Colour:
    return tuple((1 - t) * a + t * b for a, b in zip(c1, c2))


def _face_outline(idn: Identity, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = idn.face_a * np.cos(t)
    y = idn.face_b * np.sin(t)
    lower = np.clip(y / idn.face_b, 0, 1)
    x = x * (1 - idn.chin_taper * lower**2)
    return np.stack([x, y], 1)


def _hair_cap(idn: Identity) -> np.ndarray:
    a, b, v = idn.face_a, idn.face_b, idn.hair_volume
    side_y = idn.eye_y * b - 0.12 * b
    top_y = -b * idn.hairline
    # outer contour over the top of the head, from the left temple to the right one
    t0 = math.asin(np.clip((side_y + 0.05 * b) / (b * v), -1, 1))
    t = np.linspace(math.pi - t0, 2 * math.pi + t0, 28)
    outer = np.stack([a * v * np.cos(t), -0.05 * b + b * v * np.sin(t)], 1)
    # hairline from the right temple back to the left one, rising over the forehead
    xs = np.linspace(0.93 * a, -0.93 * a, 21)
    rel = np.abs(xs - idn.parting * a * 0.3) / (0.93 * a)
    ys = top_y + (side_y - top_y) * np.clip(rel, 0, 1) ** 3
    return np.concatenate([outer, np.stack([xs, ys], 1)], 0)


def _mouth_curves(idn: Identity, sc: Scene, mx: float) -> tuple[np.ndarray, ...]:
    a, b = idn.face_a, idn.face_b
    w = idn.mouth_w * a
    xs = np.linspace(-1, 1, 17)
    lift = sc.smile * 0.1 * b * xs**2
    yc = idn.mouth_y * b
    bulge = np.sqrt(np.clip(1 - xs**2, 0, 1))
    open_h = sc.mouth_open * b * bulge
    top_line = yc - lift - 0.5 * open_h
    bot_line = yc - lift + 0.5 * open_h
    cupid = 1 - 0.35 * np.exp(-((xs / 0.18) ** 2))
    upper = top_line - idn.lip_thick * b * bulge**0.7 * cupid
    lower = bot_line + 1.25 * idn.lip_thick * b * bulge**0.8
    x = mx + w * xs
    return x, top_line, bot_line, upper, lower


def render_face(
    idn: Identity,
    sc: Scene,
    size: int,
    *,
    masks: Sequence[str] = (),
    inner_scale: float = 1.0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one face: float64 RGB [size, size, 3] in [0, 1] plus the requested soft masks.

    Mask names: "face" (head skin and ears), "hair", "inner" (the swap region: brows to chin,
    scaled by `inner_scale`), "expression" (eyes, brows and the lower face), "glasses" (the eye
    band where glasses sit, drawn or not), "person".
    """
    ss = 4 if size <= 128 else 2  # supersampling factor
    cs = size * ss
    fr = _Frame(sc, cs)
    a, b = idn.face_a, idn.face_b
    yaw = sc.yaw * a
    want = set(masks) | {"face"}
    mk = {name: np.zeros((cs, cs), np.uint8) for name in want}

    # background: vertical gradient plus a few blurred objects
    ramp = np.linspace(0.0, 1.0, cs)[:, None, None]
    bg = (1 - ramp) * np.array(sc.bg_top) + ramp * np.array(sc.bg_bottom)
    img = np.repeat(np.rint(bg * 255).astype(np.uint8), cs, axis=1)
    for x, y, w, h, ang, r, g, bb in sc.bg_shapes:
        cv2.ellipse(
            img,
            (int(x * cs * _ONE), int(y * cs * _ONE)),
            (int(w * cs * _ONE), int(h * cs * _ONE)),
            ang,
            0,
            360,
            (int(r * 255), int(g * 255), int(bb * 255)),
            -1,
            cv2.LINE_AA,
            _SHIFT,
        )
    k = (cs // 8) | 1 if sc.bokeh else (cs // 32) | 1
    img = cv2.blur(img, (k, k))

    skin = idn.skin
    skin_dark = _rgb255(skin, 0.82)
    hair = _rgb255(idn.hair)

    # shoulders and neck
    fr.ellipse(img, (0.0, 2.05 * b), (2.3 * a, 0.75 * b), _rgb255(idn.clothes))
    neck = np.array(
        [[-0.5 * a, 0.5 * b], [0.5 * a, 0.5 * b], [0.55 * a, 1.5 * b], [-0.55 * a, 1.5 * b]]
    )
    fr.poly(img, neck, skin_dark)
    fr.ellipse(img, (0.0, 1.45 * b), (0.56 * a, 0.12 * b), _rgb255(idn.clothes, 0.8))

    # hair behind the head
    v = idn.hair_volume
    hair_masks = [mk[n] for n in ("hair", "person") if n in mk]
    if idn.hair_style == "long":
        back = np.array(
            [
                [-a * v, -0.1 * b],
                [-1.12 * a * v, 1.0 * b],
                [-0.95 * a * v, 1.45 * b],
                [0.95 * a * v, 1.45 * b],
                [1.12 * a * v, 1.0 * b],
                [a * v, -0.1 * b],
            ]
        )
        for m, col in [(img, hair)] + [(m, 255) for m in hair_masks]:
            fr.poly(m, back, col)
            fr.ellipse(m, (0.0, -0.05 * b), (a * v, b * v), col)
    elif idn.hair_style in ("short", "curly"):
        for m, col in [(img, hair)] + [(m, 255) for m in hair_masks]:
            fr.ellipse(m, (0.0, -0.05 * b), (a * v * 0.98, b * v * 0.97), col, start=180, end=360)

    # ears and head
    outline = _face_outline(idn)
    for s in (-1, 1):
        ear = (s * 0.97 * a, idn.eye_y * b + 0.12 * b)
        for m, col in [(img, _rgb255(skin, 0.9)), (mk["face"], 255)]:
            fr.ellipse(m, ear, (0.14 * a, 0.2 * b), col)
        fr.ellipse(img, ear, (0.07 * a, 0.12 * b), _rgb255(skin, 0.7))
    for m, col in [(img, _rgb255(skin)), (mk["face"], 255)]:
        fr.poly(m, outline, col)
    if idn.beard:
        jaw = outline[(outline[:, 1] > (idn.mouth_y - 0.25) * b)]
        jaw = jaw[np.argsort(np.arctan2(jaw[:, 1], jaw[:, 0]))]
        top = np.array(
            [[jaw[-1, 0], (idn.mouth_y - 0.25) * b], [jaw[0, 0], (idn.mouth_y - 0.25) * b]]
        )
        fr.poly(img, np.concatenate([jaw, top]), _rgb255(_mix(skin, idn.hair, 0.25)))

    # front hair
    if idn.hair_style in ("short", "long", "curly"):
        cap = _hair_cap(idn)
        for m, col in [(img, hair)] + [(m, 255) for m in hair_masks]:
            fr.poly(m, cap, col)
        if idn.hair_style == "curly":
            t = np.linspace(math.pi * 0.95, math.pi * 2.05, 13)
            for ti in t:
                centre = (a * v * math.cos(ti), -0.05 * b + b * v * math.sin(ti))
                for m, col in [(img, hair)] + [(m, 255) for m in hair_masks]:
                    fr.ellipse(m, centre, (0.16 * a, 0.13 * b), col)
        # a darker strand line along the parting gives the hair some texture
        px = idn.parting * a * 0.3
        fr.line(
            img,
            np.array([[px, -b * idn.hairline], [px * 0.5, -b * v * 1.0]]),
            _rgb255(idn.hair, 0.7),
            0.012,
        )

    # features
    brow_col = _rgb255(_mix(idn.hair, (0.1, 0.08, 0.07), 0.4))
    eye_y = idn.eye_y * b
    brow_y = eye_y - (idn.brow_gap + sc.brow_raise) * b
    ew = idn.eye_w * a
    eh = ew * idn.eye_h
    mx = yaw
    expr_parts = []
    for s in (-1, 1):
        ex = s * idn.eye_dx * a + yaw
        # brow: an arched band from the inner to the outer end
        t = np.linspace(0, 1, 9)
        xs = ex + s * (-1.15 * ew + 2.5 * ew * t)
        top = brow_y - idn.brow_arch * b * np.sin(np.pi * t) - 0.5 * idn.brow_thick * b
        bot = top + idn.brow_thick * b * (1 - 0.5 * t)
        fr.poly(
            img,
            np.concatenate([np.stack([xs, top], 1), np.stack([xs[::-1], bot[::-1]], 1)]),
            brow_col,
        )
        # socket shadow, sclera, iris, pupil, lids
        fr.ellipse(img, (ex, eye_y), (1.25 * ew, 1.5 * eh), _rgb255(skin, 0.88))
        oh = max(eh * sc.eye_open, 0.12 * eh)
        fr.ellipse(img, (ex, eye_y), (ew, oh), _rgb255((0.93, 0.92, 0.9)))
        ir = min(0.95 * eh, 0.55 * ew)
        ix = ex + sc.gaze * 0.45 * ew
        fr.ellipse(img, (ix, eye_y + 0.05 * eh), (ir, min(ir, oh)), _rgb255(idn.iris))
        fr.ellipse(img, (ix, eye_y + 0.05 * eh), (0.45 * ir, min(0.45 * ir, oh)), (12, 10, 10))
        fr.ellipse(
            img,
            (ex, eye_y),
            (ew, oh),
            (35, 25, 22),
            start=180,
            end=360,
            thickness=max(1, int(round(0.018 * fr.px))),
        )
        fr.ellipse(
            img,
            (ex, eye_y),
            (ew * 0.92, oh),
            _rgb255(skin, 0.7),
            start=20,
            end=160,
            thickness=max(1, int(round(0.008 * fr.px))),
        )
        expr_parts.append(
            ((ex, 0.5 * (eye_y + brow_y)), (1.45 * ew, 0.5 * (eye_y - brow_y) + 1.7 * eh))
        )

    # nose: shaded side, tip, nostrils
    tip_y = eye_y + idn.nose_len * b
    nw = idn.nose_w * a
    side = np.array(
        [
            [yaw + 0.12 * nw, eye_y + 0.15 * b],
            [yaw + 0.45 * nw, tip_y - 0.02 * b],
            [yaw + 0.2 * nw, tip_y + 0.02 * b],
        ]
    )
    fr.line(img, side, _rgb255(skin, 0.8), 0.014)
    fr.ellipse(img, (1.15 * yaw, tip_y), (0.42 * nw, 0.07 * b), _rgb255(skin, 0.9))
    for s in (-1, 1):
        fr.ellipse(
            img,
            (1.15 * yaw + s * 0.38 * nw, tip_y + 0.03 * b),
            (0.16 * nw, 0.035 * b),
            _rgb255(skin, 0.45),
        )

    # mouth
    x, top_line, bot_line, upper, lower = _mouth_curves(idn, sc, mx * 1.1)
    if sc.mouth_open > 0.005:
        gap = np.concatenate([np.stack([x, top_line], 1), np.stack([x[::-1], bot_line[::-1]], 1)])
        fr.poly(img, gap, (45, 18, 20))
        teeth_bot = top_line + 0.35 * (bot_line - top_line)
        fr.poly(
            img,
            np.concatenate(
                [
                    np.stack([x[3:-3], top_line[3:-3]], 1),
                    np.stack([x[3:-3][::-1], teeth_bot[3:-3][::-1]], 1),
                ]
            ),
            (225, 222, 210),
        )
    lip = _rgb255(idn.lips)
    fr.poly(
        img,
        np.concatenate([np.stack([x, upper], 1), np.stack([x[::-1], top_line[::-1]], 1)]),
        _rgb255(idn.lips, 0.9),
    )
    fr.poly(
        img, np.concatenate([np.stack([x, bot_line], 1), np.stack([x[::-1], lower[::-1]], 1)]), lip
    )
    fr.line(img, np.stack([x, 0.5 * (top_line + bot_line)], 1), (70, 30, 30), 0.008)
    # the lower face from below the nose to the chin: what a reenactment re-renders
    low_top, low_bot = tip_y + 0.07 * b, max(0.93 * b, lower.max() + 0.08 * b)
    expr_parts.append(
        (
            (mx, 0.5 * (low_top + low_bot)),
            (max(0.62 * a, 1.3 * idn.mouth_w * a), 0.5 * (low_bot - low_top)),
        )
    )

    if idn.glasses:
        col = _rgb255(idn.glasses_colour)
        th = 0.02
        for s in (-1, 1):
            ex = s * idn.eye_dx * a + yaw
            fr.ellipse(
                img,
                (ex, eye_y),
                (1.45 * ew, 1.6 * eh + 0.02 * b),
                col,
                thickness=max(1, int(round(th * fr.px))),
            )
            fr.line(
                img,
                np.array([[ex + s * 1.45 * ew, eye_y], [s * 0.98 * a, eye_y + 0.02 * b]]),
                col,
                th,
            )
        bridge = np.array(
            [[yaw - idn.eye_dx * a + 1.45 * ew, eye_y], [yaw + idn.eye_dx * a - 1.45 * ew, eye_y]]
        )
        fr.line(img, bridge, col, th)

    # masks that follow geometry rather than drawn pixels
    if "inner" in mk:
        fr.ellipse(
            mk["inner"], (yaw, 0.1 * b), (0.8 * a * inner_scale, 0.68 * b * inner_scale), 255
        )
    if "glasses" in mk:  # the eye band an accessory edit re-renders
        fr.ellipse(
            mk["glasses"], (yaw, eye_y), (idn.eye_dx * a + 1.8 * ew, 2.0 * eh + 0.05 * b), 255
        )
    if "expression" in mk:
        for centre, axes in expr_parts:
            fr.ellipse(mk["expression"], centre, axes, 255)
    if "person" in mk:
        mk["person"] |= mk["face"]
        fr.ellipse(mk["person"], (0.0, 2.05 * b), (2.3 * a, 0.75 * b), 255)
        fr.poly(mk["person"], neck, 255)

    out = downsample_box(img, ss) / 255.0
    soft = {name: downsample_box(m, ss) / 255.0 for name, m in mk.items()}
    out = _shade(out, soft["face"], idn, sc, size)
    return out, {name: soft[name] for name in masks}


def _shade(img: np.ndarray, face: np.ndarray, idn: Identity, sc: Scene, size: int) -> np.ndarray:
    """Round the face with a radial falloff and light the scene from one side."""
    grid = (np.arange(size) + 0.5) / size
    wx = grid[None, :] - sc.cx
    wy = grid[:, None] - sc.cy
    cos, sin = math.cos(sc.roll), math.sin(sc.roll)
    lx = (cos * wx + sin * wy) / sc.scale
    ly = (-sin * wx + cos * wy) / sc.scale
    r2 = (lx / idn.face_a) ** 2 + (ly / idn.face_b) ** 2
    dx, dy = math.cos(sc.light_angle), math.sin(sc.light_angle)
    facing = (
        1.0
        - 0.22 * np.clip(r2, 0, 1.3)
        + 0.8 * sc.light * (dx * lx / idn.face_a + dy * ly / idn.face_b)
    )
    scene_light = 1.0 + 0.6 * sc.light * (dx * wx + dy * wy)
    gain = scene_light * (1.0 + face * (facing - 1.0))
    return np.clip(img * gain[:, :, None], 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# image operators


def downsample_box(img: np.ndarray, f: int) -> np.ndarray:
    """Average f x f blocks (float64)."""
    if f == 1:
        return img.astype(np.float64)
    h, w = img.shape[:2]
    blocks = img.reshape(h // f, f, w // f, f, *img.shape[2:])
    if img.dtype == np.uint8 and f <= 16:  # exact integer sums of strided slices are fast
        rows = sum(img[i::f].astype(np.uint16) for i in range(f))
        return sum(rows[:, j::f] for j in range(f)) / float(f * f)
    return blocks.astype(np.float64).mean(axis=(1, 3))


def _filter_axis(img: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    r = len(kernel) // 2
    pad = [(0, 0)] * img.ndim
    pad[axis] = (r, r)
    p = np.pad(img, pad, mode="reflect")
    n = img.shape[axis]
    out = np.zeros_like(img, dtype=np.float64)
    for i, k in enumerate(kernel):
        out += k * np.take(p, np.arange(i, i + n), axis=axis)
    return out


def gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    k = gaussian_kernel(sigma)
    return _filter_axis(_filter_axis(img, k, 0), k, 1)


def _cubic(a: float) -> Callable[[np.ndarray], np.ndarray]:
    def k(x):
        x = np.abs(x)
        return np.where(
            x <= 1,
            (a + 2) * x**3 - (a + 3) * x**2 + 1,
            np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0),
        )

    return k


def _lanczos(n: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.where(np.abs(x) < n, np.sinc(x) * np.sinc(x / n), 0.0)


# name -> (kernel, support radius in source pixels)
RESAMPLE_KERNELS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "nearest": (lambda x: ((x >= -0.5) & (x < 0.5)).astype(np.float64), 0.5),
    "bilinear": (lambda x: np.clip(1 - np.abs(x), 0, None), 1.0),
    "cubic-0.5": (_cubic(-0.5), 2.0),
    "cubic-0.75": (_cubic(-0.75), 2.0),
    "cubic-1.0": (_cubic(-1.0), 2.0),
    "lanczos2": (_lanczos(2), 2.0),
    "lanczos3": (_lanczos(3), 3.0),
}


@lru_cache(maxsize=256)
def _resample_taps(n: int, out_len: int, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights [out_len, taps] of a 1-D resampling (read-only, cached)."""
    fn, support = RESAMPLE_KERNELS[kernel]
    scale = max(1.0, n / out_len)  # widen the kernel when shrinking (anti-aliasing)
    src = (np.arange(out_len) + 0.5) * n / out_len - 0.5
    if kernel == "nearest":
        taps = np.floor(src + 0.5).astype(int)[:, None]
        w = np.ones_like(taps, dtype=np.float64)
    else:
        radius = int(math.ceil(support * scale))
        taps = np.floor(src).astype(int)[:, None] + np.arange(-radius + 1, radius + 1)[None, :]
        w = fn((src[:, None] - taps) / scale)
        w = w / w.sum(axis=1, keepdims=True)
    taps = np.clip(taps, 0, n - 1)
    taps.setflags(write=False)
    w.setflags(write=False)
    return taps, w


def _resample_axis(img: np.ndarray, out_len: int, kernel: str, axis: int) -> np.ndarray:
    taps, w = _resample_taps(img.shape[axis], out_len, kernel)
    moved = np.moveaxis(img, axis, 0)
    out = np.zeros((out_len, *moved.shape[1:]), dtype=np.float64)
    for j in range(taps.shape[1]):
        wj = w[:, j].reshape(-1, *([1] * (moved.ndim - 1)))
        out += wj * moved[taps[:, j]]
    return np.moveaxis(out, 0, axis)


def resize(img: np.ndarray, size: int, kernel: str = "bilinear") -> np.ndarray:
    """Separable resampling to size x size with one of `RESAMPLE_KERNELS`."""
    return _resample_axis(_resample_axis(img, size, kernel, 0), size, kernel, 1)


@lru_cache(maxsize=256)
def _ring_gain(size: int, centre: float, width: float, angle: float, aniso: float) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    r = np.sqrt(fx**2 + fy**2)
    theta = np.arctan2(fy, fx)
    gain = np.exp(-0.5 * ((r - centre) / width) ** 2) * (1 + aniso * np.cos(2 * (theta - angle)))
    gain[0, 0] = 0.0
    gain.setflags(write=False)
    return gain


def filtered_noise(
    size: int, rng: np.random.Generator, centre: float, width: float, angle: float, aniso: float
) -> np.ndarray:
    """Unit-std noise field whose spectrum is a ring (radius `centre`, cycles/pixel) of width
    `width`, optionally stretched along `angle` (aniso in [0, 1))."""
    white = rng.standard_normal((size, size))
    gain = _ring_gain(size, centre, width, angle, aniso)
    field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=(size, size))
    return field / max(float(field.std()), 1e-12)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at `quality` and decode again (float64 in, float64 out)."""
    bgr = np.ascontiguousarray(to_uint8(img)[:, :, ::-1])
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return dec[:, :, ::-1].astype(np.float64) / 255.0


def camera_capture(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Optics and sensor of a camera: slight blur, then signal-dependent and read noise."""
    blurred = gaussian_blur(img, float(rng.uniform(0.35, 0.75)))
    read = rng.uniform(1.5, 3.5) / 255.0
    shot = rng.uniform(1.0, 2.5) / 255.0
    sigma = np.sqrt(read**2 + shot**2 * blurred)
    luma = rng.standard_normal(img.shape[:2])[:, :, None]
    chroma = rng.standard_normal(img.shape)
    return np.clip(blurred + sigma * (0.6 * luma + 0.8 * chroma), 0.0, 1.0)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an 8-bit RGB image with stored (uncompressed) deflate blocks.

    Compressed PNG output depends on the zlib build (zlib vs zlib-ng give different bytes for
    the same pixels); stored blocks make the file bytes, and so the manifest hashes, identical on
    every machine.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png wants uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()
    blocks = []
    for start in range(0, len(raw), 65535):
        part = raw[start : start + 65535]
        final = 1 if start + 65535 >= len(raw) else 0
        blocks.append(struct.pack("<BHH", final, len(part), len(part) ^ 0xFFFF) + part)
    idat = b"\x78\x01" + b"".join(blocks) + struct.pack(">I", zlib.adler32(raw))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
