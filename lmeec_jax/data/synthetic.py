"""Synthetic ego-exo correspondence data in the processed EgoExo4D layout.

Each take is a small 3-D scene rendered with numpy ray casting (analytic ray /
primitive intersection, per-pixel z-buffer, so masks respect occlusion):

* a room (tiled floor, panelled walls with coloured posters, ceiling) and a table;
* 4-7 objects on the table (boxes, vertical cylinders, spheres) with procedural
  textures (solid, stripes, checker, dots, grid), including look-alike distractors
  (same shape, size, texture and colour as another object) and small objects;
  one object may be picked up and carried by a hand during the take;
* a person beside the table: body cylinder + head sphere (seen by the exo cameras
  only) and two hand spheres (seen by every camera, occluding objects);
* an egocentric camera ``aria01`` at the person's eyes, walking a little and turning
  the head (yaw sweep of +-45..90 deg, 90 deg field of view), so objects leave and
  enter the ego view; frames 704x704;
* ``n_exo`` fixed exocentric cameras ``cam01``, ``cam02``, ... around the table looking
  at it (50-65 deg horizontal field of view); frames 960x540.

Rendering happens at ``1/render_div`` of the JPEG resolution (default 2: ego 352x352,
exo 480x270). JPEGs are nearest-upsampled (PIL) to 704x704 / 960x540; masks are
nearest-upsampled straight into COCO RLE at the cameras' *raw* resolution, as in
EgoExo4D (ego 1408x1408, exo 3840x2160: 2x / 4x the JPEG size, which is what the
official preprocessing leaves), or at the JPEG size with ``raw_masks=False``.

Annotations follow EgoExo4D's convention: an object/camera/frame key exists when
the object is visible in that camera (>= ``min_pixels`` rendered pixels); with
probability ``p_empty_key`` an invisible frame still gets a key with an empty mask.
``annotation.json`` additionally carries ``"annotated_frames": {obj: {cam: [ints]}}``
(every frame, as the raw relations file would list them; readers ignore it).

Everything is a pure function of (seed, take index): the same seed writes identical
bytes, and a take already written (its ``annotation.json`` exists) is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from lmeec_jax.data.errors import DataError
from lmeec_jax.io import atomic_write, read_json, write_json_atomic

EGO_SIZE = (704, 704)  # (W, H) of processed ego JPEGs
EXO_SIZE = (960, 540)  # (W, H) of processed exo JPEGs
EGO_RAW_SCALE = 2  # raw / processed (official preprocessing: aria /2, exo /4)
EXO_RAW_SCALE = 4
FRAME_STEP = 30
TABLE_TOP = 0.75

# ----------------------------------------------------------------------------- scene description

COLOURS = {
    "red": (0.80, 0.12, 0.10),
    "green": (0.15, 0.62, 0.22),
    "blue": (0.12, 0.28, 0.80),
    "yellow": (0.93, 0.82, 0.15),
    "orange": (0.95, 0.50, 0.10),
    "purple": (0.50, 0.20, 0.65),
    "white": (0.92, 0.92, 0.90),
    "black": (0.10, 0.10, 0.11),
    "cyan": (0.15, 0.75, 0.80),
    "pink": (0.95, 0.55, 0.70),
    "brown": (0.45, 0.28, 0.14),
    "gray": (0.50, 0.50, 0.52),
}
NOUNS = {"box": ("box", "book", "carton", "block"), "cyl": ("mug", "can", "jar", "bottle"), "sphere": ("ball", "orange", "globe")}
PATTERNS = ("solid", "stripes", "checker", "dots", "grid")
SKIN = (0.86, 0.66, 0.52)


@dataclasses.dataclass
class Texture:
    kind: str
    c1: Tuple[float, float, float]
    c2: Tuple[float, float, float]
    freq: float = 20.0  # cycles per metre
    angle: float = 0.0


@dataclasses.dataclass
class Prim:
    """A primitive. box: ``size`` = half extents, centre ``pos``; cyl: ``size`` = (r, r, height),
    ``pos`` = centre of the bottom face; sphere: ``size`` = (r, r, r), centre ``pos``."""

    kind: str
    pos: np.ndarray
    size: np.ndarray
    yaw: float
    tex: Texture

    def moved(self, pos) -> "Prim":
        return dataclasses.replace(self, pos=np.asarray(pos, np.float64))

    def aabb(self) -> Tuple[np.ndarray, np.ndarray]:
        p, s = self.pos, self.size
        if self.kind == "box":
            c, sn = abs(math.cos(self.yaw)), abs(math.sin(self.yaw))
            ex = np.array([c * s[0] + sn * s[1], sn * s[0] + c * s[1], s[2]])
            return p - ex, p + ex
        if self.kind == "cyl":
            return p - np.array([s[0], s[0], 0.0]), p + np.array([s[0], s[0], s[2]])
        return p - s, p + s


@dataclasses.dataclass
class CameraSpec:
    name: str
    out_wh: Tuple[int, int]  # JPEG (W, H)
    hfov: float  # radians
    poses: List[Tuple[np.ndarray, np.ndarray]]  # per frame (R world->cam rows [right, down, fwd], centre)
    is_ego: bool

    def intrinsics(self, render_div: int):
        w, h = self.out_wh[0] // render_div, self.out_wh[1] // render_div
        f = (w / 2.0) / math.tan(self.hfov / 2.0)
        return w, h, f, w / 2.0, h / 2.0


@dataclasses.dataclass
class SceneObject:
    name: Optional[str]  # None: clutter, not annotated
    prim: Prim
    path: Optional[List[np.ndarray]] = None  # per-frame position if the object moves


@dataclasses.dataclass
class Take:
    take_id: str
    n_frames: int
    room: Tuple[float, float, float]  # half sizes x, y and height z
    room_tex: dict
    table: Prim
    objects: List[SceneObject]
    body: List[Prim]  # per frame: [body, head] (exo cameras only)
    hands: List[List[Prim]]  # per frame
    cameras: List[CameraSpec]

    def prims(self, i: int, ego: bool) -> Tuple[List[Prim], List[int], List[bool]]:
        """Primitives at frame i, their labels (object index, or -2 for scene parts) and
        whether they move during the take."""
        prims, labels, moving = [self.table], [-2], [False]
        for k, o in enumerate(self.objects):
            prims.append(o.prim.moved(o.path[i]) if o.path is not None else o.prim)
            labels.append(k)
            moving.append(o.path is not None)
        for h in self.hands[i]:
            prims.append(h)
            labels.append(-2)
            moving.append(True)
        if not ego:
            for b in self.body[i]:
                prims.append(b)
                labels.append(-2)
                moving.append(True)
        return prims, labels, moving


def _look(fwd: np.ndarray, roll: float = 0.0) -> np.ndarray:
    f = fwd / np.linalg.norm(fwd)
    right = np.cross(f, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(f, right)
    if roll:
        c, s = math.cos(roll), math.sin(roll)
        right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, f])


def _yaw_pitch(yaw: float, pitch: float) -> np.ndarray:
    return np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)])


def _rand_colour(rng, exclude=()):
    names = [c for c in COLOURS if c not in exclude]
    return names[int(rng.integers(len(names)))]


def _rand_texture(rng, cname: str, patterns: Sequence[str] = PATTERNS) -> Texture:
    kind = patterns[int(rng.integers(len(patterns)))]
    c1 = np.array(COLOURS[cname])
    c2name = _rand_colour(rng, exclude=(cname,))
    c2 = 0.5 * c1 + 0.5 * np.array(COLOURS[c2name]) if rng.random() < 0.5 else np.array(COLOURS[c2name])
    return Texture(kind, tuple(c1), tuple(c2), float(rng.uniform(18, 45)), float(rng.uniform(0, math.pi)))


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    n_frames: int = 16
    n_exo: int = 1
    render_div: int = 2
    raw_masks: bool = True
    min_pixels: int = 4
    p_empty_key: float = 0.05
    jpeg_quality: int = 90
    object_scale: float = 1.0  # x object sizes (the built-in training run uses larger objects)
    exo_distance: Tuple[float, float] = (1.7, 2.5)  # exocentric camera distance range (m)
    p_lookalike: float = 0.3  # an object is a copy of an earlier one (same shape, size, texture)
    p_small: float = 0.25  # an object is small (1.5-2.5 cm)
    patterns: Tuple[str, ...] = PATTERNS  # object textures to draw from
    distinct_colours: bool = False  # no two objects share a main colour (look-alikes aside)

    def __post_init__(self):
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad or not self.patterns:
            raise ValueError(f"unknown texture pattern(s) {bad or '(none given)'}; choose from {', '.join(PATTERNS)}")


def build_take(take_id: str, rng: np.random.Generator, cfg: SynthConfig = SynthConfig()) -> Take:
    """Random scene, motion and cameras of one take (``cfg.n_frames`` frames, ``cfg.n_exo``
    exocentric cameras, scene knobs ``object_scale`` ... ``distinct_colours`` of ``cfg``)."""
    rx, ry, rz = rng.uniform(2.6, 3.4), rng.uniform(2.6, 3.4), rng.uniform(2.5, 2.9)
    room_tex = dict(
        floor1=tuple(rng.uniform(0.35, 0.75, 3)),
        floor2=tuple(rng.uniform(0.2, 0.6, 3)),
        tile=float(rng.uniform(0.3, 0.7)),
        wall=tuple(rng.uniform(0.55, 0.9, 3)),
        wall2=tuple(rng.uniform(0.4, 0.8, 3)),
        posters=[tuple(COLOURS[_rand_colour(rng)]) for _ in range(8)],
        panel=float(rng.uniform(0.6, 1.2)),
    )
    tw, td = rng.uniform(0.55, 0.8), rng.uniform(0.38, 0.5)  # table half sizes
    table_tex = Texture("stripes", tuple(rng.uniform(0.45, 0.7, 3) * [1, 0.75, 0.5]), tuple(rng.uniform(0.3, 0.5, 3) * [1, 0.75, 0.5]),
                        float(rng.uniform(8, 14)), 0.0)
    table = Prim("box", np.array([0.0, 0.0, TABLE_TOP / 2]), np.array([tw, td, TABLE_TOP / 2]), 0.0, table_tex)

    # ---- objects
    n_obj = int(rng.integers(4, 8))
    specs = []
    used_names: Dict[str, int] = {}
    while len(specs) < n_obj:
        if specs and rng.random() < cfg.p_lookalike:  # look-alike of an earlier object
            base = specs[int(rng.integers(len(specs)))]
            specs.append(dict(base))
            continue
        kind = ("box", "cyl", "sphere")[int(rng.integers(3))]
        small = rng.random() < cfg.p_small
        s = (rng.uniform(0.015, 0.025) if small else rng.uniform(0.045, 0.12)) * cfg.object_scale
        if kind == "box":
            size = np.array([s, s * rng.uniform(0.6, 1.4), s * rng.uniform(0.5, 1.3)])
        elif kind == "cyl":
            size = np.array([s * 0.8, s * 0.8, s * rng.uniform(1.5, 4.0)])
        else:
            size = np.array([s, s, s])
        cname = _rand_colour(rng, exclude=[sp["cname"] for sp in specs] if cfg.distinct_colours else ())
        noun = NOUNS[kind][int(rng.integers(len(NOUNS[kind])))]
        specs.append(dict(kind=kind, size=size, cname=cname, tex=_rand_texture(rng, cname, cfg.patterns), label=f"{'small ' if small else ''}{cname} {noun}"))
    objects: List[SceneObject] = []
    placed: List[Tuple[float, float, float]] = []
    for sp in specs:
        r = float(np.hypot(sp["size"][0], sp["size"][1]))
        for _ in range(200):
            x, y = rng.uniform(-tw + r + 0.02, tw - r - 0.02), rng.uniform(-td + r + 0.02, td - r - 0.02)
            if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + 0.03) ** 2 for px, py, pr in placed):
                break
        else:
            continue  # table full
        placed.append((x, y, r))
        z = TABLE_TOP + (sp["size"][2] if sp["kind"] in ("box", "sphere") else 0.0)
        prim = Prim(sp["kind"], np.array([x, y, z]), sp["size"], float(rng.uniform(0, math.pi)), sp["tex"])
        k = used_names.get(sp["label"], 0)
        used_names[sp["label"]] = k + 1
        name = f"{sp['label']}_{k}" if rng.random() < 0.9 else None  # a few unannotated clutter objects
        objects.append(SceneObject(name, prim))
    if not any(o.name for o in objects):
        objects[0].name = "object_0"

    # ---- person and ego camera
    T = cfg.n_frames
    taus = np.linspace(0.0, 1.0, T) if T > 1 else np.zeros(1)
    side = rng.uniform(-math.pi, math.pi)  # where around the table the person stands
    dist = rng.uniform(0.25, 0.45)
    p0 = np.array([math.cos(side) * (tw + dist), math.sin(side) * (td + dist)])
    tangent = np.array([-math.sin(side), math.cos(side)])
    drift = rng.uniform(-0.5, 0.5)
    head_z = rng.uniform(1.5, 1.72)
    amp, freq, phase = math.radians(rng.uniform(45, 90)), rng.uniform(0.8, 1.6), rng.uniform(0, 2 * math.pi)
    pitch0, roll_amp = math.radians(rng.uniform(-58, -38)), math.radians(rng.uniform(0, 6))
    ego_poses, body, person_xy = [], [], []
    for tau in taus:
        pxy = p0 + tangent * drift * tau
        person_xy.append(pxy)
        face = math.atan2(-pxy[1], -pxy[0])  # towards the table centre
        yaw = face + amp * math.sin(2 * math.pi * freq * tau + phase)
        pitch = pitch0 + math.radians(15) * math.sin(2 * math.pi * 0.7 * freq * tau + 1.3 * phase)
        fwd = _yaw_pitch(yaw, pitch)
        head = np.array([pxy[0], pxy[1], head_z])
        eye = head + np.array([math.cos(yaw), math.sin(yaw), 0.0]) * 0.09
        ego_poses.append((_look(fwd, roll_amp * math.sin(5 * tau + phase)), eye))
        body.append([
            Prim("cyl", np.array([pxy[0], pxy[1], 0.0]), np.array([0.17, 0.17, head_z - 0.2]), 0.0,
                 Texture("stripes", tuple(rng.uniform(0.1, 0.6, 3)), tuple(rng.uniform(0.1, 0.6, 3)), 6.0, 1.57)),
            Prim("sphere", head, np.array([0.11, 0.11, 0.11]), 0.0, Texture("solid", SKIN, SKIN)),
        ])

    # ---- hands (and maybe one carried object)
    def rest(i, s):
        pxy = person_xy[i]
        face = math.atan2(-pxy[1], -pxy[0])
        f = np.array([math.cos(face), math.sin(face)])
        lat = np.array([-f[1], f[0]])
        return np.array([*(pxy + f * 0.32 + lat * 0.2 * s), TABLE_TOP + 0.18])

    hand_r = 0.045
    hands_pos = [[rest(i, 1.0), rest(i, -1.0)] for i in range(T)]
    annotated = [k for k, o in enumerate(objects) if o.name]
    if T >= 4 and rng.random() < 0.6:
        k = annotated[int(rng.integers(len(annotated)))]
        obj = objects[k]
        a = obj.prim.pos.copy()
        b = a.copy()
        b[:2] = [rng.uniform(-tw * 0.8, tw * 0.8), rng.uniform(-td * 0.8, td * 0.8)]
        t1, t2, t3 = sorted(rng.uniform(0.05, 0.95, 3))
        top = float(obj.prim.aabb()[1][2] - obj.prim.pos[2])
        path = []
        for i, tau in enumerate(taus):
            if tau < t2:
                pos = a
            elif tau < t3:
                u = (tau - t2) / max(t3 - t2, 1e-6)
                pos = a + (b - a) * u + np.array([0, 0, 0.15 * math.sin(math.pi * u)])
            else:
                pos = b
            path.append(pos.copy())
            grip = pos + np.array([0, 0, top + hand_r * 0.9])
            r0 = rest(i, 1.0)
            if tau < t1:
                hpos = r0
            elif tau < t2:
                hpos = r0 + (grip - r0) * (tau - t1) / max(t2 - t1, 1e-6)
            elif tau < t3:
                hpos = grip
            else:
                u = min((tau - t3) / 0.15, 1.0)
                hpos = grip + (r0 - grip) * u
            hands_pos[i][0] = hpos
        obj.path = path
    hand_tex = Texture("solid", SKIN, SKIN)
    hands = [[Prim("sphere", p, np.full(3, hand_r), 0.0, hand_tex) for p in hp] for hp in hands_pos]

    # ---- cameras
    cams = [CameraSpec("aria01", EGO_SIZE, math.radians(90.0), ego_poses, True)]
    for j in range(cfg.n_exo):
        az = rng.uniform(-math.pi, math.pi)
        d = rng.uniform(*cfg.exo_distance)
        pos = np.array([math.cos(az) * d, math.sin(az) * d, rng.uniform(1.3, 2.0)])
        pos[0] = np.clip(pos[0], -rx + 0.2, rx - 0.2)
        pos[1] = np.clip(pos[1], -ry + 0.2, ry - 0.2)
        target = np.array([rng.uniform(-0.25, 0.25), rng.uniform(-0.2, 0.2), TABLE_TOP])
        R = _look(target - pos, math.radians(rng.uniform(-3, 3)))
        cams.append(CameraSpec(f"cam{j + 1:02d}", EXO_SIZE, math.radians(rng.uniform(50, 65)), [(R, pos)] * T, False))
    return Take(take_id, T, (rx, ry, rz), room_tex, table, objects, body, hands, cams)


# ----------------------------------------------------------------------------- rendering

_LIGHT = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])
_INF = np.float32(np.inf)


def _texture(tex: Texture, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    c1 = np.asarray(tex.c1, np.float32)
    if tex.kind == "solid":
        return np.broadcast_to(c1, u.shape + (3,))
    c2 = np.asarray(tex.c2, np.float32)
    f = np.float32(tex.freq)
    if tex.kind == "stripes":
        ca, sa = np.float32(math.cos(tex.angle)), np.float32(math.sin(tex.angle))
        sel = np.sin((u * ca + v * sa) * (f * np.float32(2 * math.pi))) > 0
    elif tex.kind == "checker":
        sel = ((np.floor(u * f) + np.floor(v * f)).astype(np.int32) & 1) == 0
    elif tex.kind == "dots":
        fu, fv = u * f - np.floor(u * f) - 0.5, v * f - np.floor(v * f) - 0.5
        sel = fu * fu + fv * fv > 0.09
    else:  # grid
        fu, fv = u * f - np.floor(u * f), v * f - np.floor(v * f)
        sel = (fu > 0.15) & (fv > 0.15)
    return c2 + sel[..., None].astype(np.float32) * (c1 - c2)


def _isect(p: Prim, o: np.ndarray, dx, dy, dz) -> np.ndarray:
    """Ray parameter t (distance in units of the ray's camera-z) of the first hit, inf if none."""
    f32 = np.float32
    if p.kind == "sphere":
        px, py, pz = (o - p.pos).astype(np.float32)
        r = f32(p.size[0])
        a = dx * dx + dy * dy + dz * dz
        b = dx * px + dy * py + dz * pz
        c = px * px + py * py + pz * pz - r * r
        disc = b * b - a * c
        t = (-b - np.sqrt(np.maximum(disc, 0))) / a
        return np.where((disc >= 0) & (t > 0), t, _INF)
    if p.kind == "box":
        cy, sy = f32(math.cos(p.yaw)), f32(math.sin(p.yaw))
        rel = (o - p.pos).astype(np.float32)
        lo = (cy * rel[0] + sy * rel[1], -sy * rel[0] + cy * rel[1], rel[2])
        ld = (cy * dx + sy * dy, -sy * dx + cy * dy, dz)
        tn = tf = None
        for ax in range(3):
            h = f32(p.size[ax])
            d = ld[ax]
            inv = f32(1.0) / np.where(np.abs(d) < 1e-9, f32(1e-9), d)
            t1 = (-h - lo[ax]) * inv
            t2 = (h - lo[ax]) * inv
            a, b = np.minimum(t1, t2), np.maximum(t1, t2)
            tn = a if tn is None else np.maximum(tn, a)
            tf = b if tf is None else np.minimum(tf, b)
        return np.where((tf >= tn) & (tn > 0), tn, _INF)
    # vertical cylinder: side + top cap
    px, py = f32(o[0] - p.pos[0]), f32(o[1] - p.pos[1])
    z0, z1, r = f32(p.pos[2]), f32(p.pos[2] + p.size[2]), f32(p.size[0])
    oz = f32(o[2])
    a = dx * dx + dy * dy
    b = dx * px + dy * py
    c = px * px + py * py - r * r
    disc = b * b - a * c
    ts = (-b - np.sqrt(np.maximum(disc, 0))) / np.maximum(a, f32(1e-12))
    zs = oz + ts * dz
    ts = np.where((disc >= 0) & (ts > 0) & (zs >= z0) & (zs <= z1), ts, _INF)
    tt = (z1 - oz) / np.where(np.abs(dz) < 1e-9, f32(1e-9), dz)
    xt, yt = px + tt * dx, py + tt * dy
    tt = np.where((tt > 0) & (xt * xt + yt * yt <= r * r), tt, _INF)
    return np.minimum(ts, tt)


def _shade(p: Prim, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Colour (N, 3) of hit points (X, Y, Z) (1-D float32 arrays) on primitive p."""
    f32 = np.float32
    rx, ry, rz = X - f32(p.pos[0]), Y - f32(p.pos[1]), Z - f32(p.pos[2])
    L = _LIGHT.astype(np.float32)
    if p.kind == "sphere":
        r = f32(p.size[0])
        lam = (rx * L[0] + ry * L[1] + rz * L[2]) / r
        u = np.arctan2(ry, rx) * r
        v = rz
    elif p.kind == "box":
        cy, sy = f32(math.cos(p.yaw)), f32(math.sin(p.yaw))
        lx, ly, lz = cy * rx + sy * ry, cy * ry - sy * rx, rz
        ax, ay, az = np.abs(lx) * f32(1 / p.size[0]), np.abs(ly) * f32(1 / p.size[1]), np.abs(lz) * f32(1 / p.size[2])
        onz = (az >= ax) & (az >= ay)
        onx = ~onz & (ax >= ay)
        # world normal = the hit face's local axis rotated by yaw
        nx = np.where(onx, np.sign(lx) * cy, np.where(onz, f32(0), -np.sign(ly) * sy))
        ny = np.where(onx, np.sign(lx) * sy, np.where(onz, f32(0), np.sign(ly) * cy))
        nz = np.where(onz, np.sign(lz), f32(0))
        lam = nx * L[0] + ny * L[1] + nz * L[2]
        u = np.where(onx, ly, lx)
        v = np.where(onz, ly, lz)
    else:
        top = rz > f32(p.size[2] - 1e-4)
        r = f32(p.size[0])
        lam = np.where(top, L[2], (rx * L[0] + ry * L[1]) / r)
        u = np.where(top, rx, np.arctan2(ry, rx) * r)
        v = np.where(top, ry, rz)
    col = _texture(p.tex, u, v)
    return col * (f32(0.5) + f32(0.5) * np.maximum(lam, f32(0)))[:, None]


def _room(take: Take, o: np.ndarray, dx, dy, dz) -> np.ndarray:
    """Colour of the room box seen along rays (dx, dy, dz) from o: tiled floor, panelled
    walls with a dado rail and posters, ceiling. A palette index per pixel, one gather;
    floor and wall patterns are evaluated only on the pixels that see them."""
    f32 = np.float32
    rx, ry, rz = (f32(v) for v in take.room)
    ox, oy, oz = (f32(v) for v in o)
    rt = take.room_tex
    shape = dx.shape
    dx, dy, dz = dx.ravel(), dy.ravel(), dz.ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = (np.copysign(rx, dx) - ox) / dx
        ty = (np.copysign(ry, dy) - oy) / dy
        down = dz < 0
        tz = (np.where(down, f32(0), rz) - oz) / dz
    onx = tx <= ty
    txy = np.minimum(tx, ty)
    horiz = tz <= txy
    idx = np.full(dx.shape, 3, np.uint8)  # ceiling
    # floor: two-colour tiles with grout lines
    fl = np.flatnonzero(horiz & down)
    t = tz[fl]
    s = f32(1.0 / rt["tile"])
    fx, fy = (ox + t * dx[fl]) * s, (oy + t * dy[fl]) * s
    ix, iy = np.floor(fx), np.floor(fy)
    fidx = ((ix + iy).astype(np.int32) & 1).astype(np.uint8)
    grout = (np.abs(fx - ix - f32(0.5)) > f32(0.47)) | (np.abs(fy - iy - f32(0.5)) > f32(0.47))
    fidx[grout] = 2
    idx[fl] = fidx
    # walls: panels, a dado rail, posters on two panels out of three
    wl = np.flatnonzero(~horiz)
    t, wx = txy[wl], onx[wl]
    x, y, z = ox + t * dx[wl], oy + t * dy[wl], oz + t * dz[wl]
    along = np.where(wx, y + np.copysign(f32(7), dx[wl]), x + np.copysign(f32(3), dy[wl]))
    q = along * f32(1.0 / rt["panel"])
    cell = np.floor(q)
    frac = q - cell
    ci = cell.astype(np.int32)
    widx = (4 + (ci & 1)).astype(np.uint8)
    widx[(z > f32(0.88)) & (z < f32(0.92))] = 6
    pp = np.flatnonzero((z > f32(1.15)) & (z < f32(1.75)) & (np.abs(frac - f32(0.5)) < f32(0.3)) & ((ci & 3) != 1))
    stripe = np.sin(z[pp] * f32(40.0) + frac[pp] * f32(9.0)) > f32(0.3)
    widx[pp] = (7 + (ci[pp] & 7) + 8 * (~stripe)).astype(np.uint8)
    idx[wl] = widx
    pal = np.empty((23, 3), np.float32)
    pal[0], pal[1], pal[2], pal[3] = rt["floor1"], rt["floor2"], 0.25, 0.93
    pal[4], pal[5], pal[6] = rt["wall"], rt["wall2"], 0.3
    posters = np.asarray(rt["posters"], np.float32)
    pal[7:15] = posters
    pal[15:23] = posters[(np.arange(8) + 3) % 8] * f32(0.6)
    return np.take(pal, idx, axis=0).reshape(shape + (3,))


def _draw(prims, plabels, geom, rgb, depth, labels) -> None:
    """Z-buffer ``prims`` into ``depth`` (in place; pixels must already hold the depth of
    what is behind them) and paint the winners' colours and labels into ``rgb``/``labels``."""
    R, C, f, cx, cy, w, h, dx, dy, dz = geom
    pid = np.full((h, w), -1, np.int16)
    boxes = []
    for k, p in enumerate(prims):
        lo, hi = p.aabb()
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        pc = (corners - C) @ R.T
        if np.all(pc[:, 2] <= 1e-3):
            boxes.append(None)
            continue
        if np.any(pc[:, 2] <= 1e-2):
            x0, x1, y0, y1 = 0, w, 0, h
        else:
            u = f * pc[:, 0] / pc[:, 2] + cx
            v = f * pc[:, 1] / pc[:, 2] + cy
            x0, x1 = max(int(math.floor(u.min())) - 1, 0), min(int(math.ceil(u.max())) + 1, w)
            y0, y1 = max(int(math.floor(v.min())) - 1, 0), min(int(math.ceil(v.max())) + 1, h)
        if x0 >= x1 or y0 >= y1:
            boxes.append(None)
            continue
        sl = (slice(y0, y1), slice(x0, x1))
        t = _isect(p, C, dx[sl], dy[sl], dz[sl])
        dsub = depth[sl]
        closer = t < dsub
        if not closer.any():
            boxes.append(None)
            continue
        np.copyto(dsub, t, where=closer)
        np.copyto(pid[sl], np.int16(k), where=closer)
        boxes.append(sl)
    cf = C.astype(np.float32)
    for k, sl in enumerate(boxes):
        if sl is None:
            continue
        sel = pid[sl] == k
        if not sel.any():
            continue
        t = depth[sl][sel]
        col = _shade(prims[k], cf[0] + t * dx[sl][sel], cf[1] + t * dy[sl][sel], cf[2] + t * dz[sl][sel])
        rgb[sl][sel] = col
        labels[sl][sel] = plabels[k]


def render_view(take: Take, cam: CameraSpec, i: int, render_div: int = 2, only: Optional[Sequence[int]] = None,
                cache: Optional[dict] = None):
    """Render camera ``cam`` at frame ``i``.

    Returns ``(rgb, labels)``: float32 (h, w, 3) in [0, 1] and int16 (h, w) label map
    (object index into ``take.objects``, -1 room, -2 table / person / hands), at the
    render resolution. ``only``: keep just these object indices (scene parts stay),
    for tests. ``cache``: a dict kept across the frames of one take; for a fixed
    (exocentric) camera the rays, the room and everything that does not move are
    rendered once and only the moving parts are drawn per frame (same pixels).
    """
    w, h, f, cx, cy = cam.intrinsics(render_div)
    R, C = cam.poses[i]
    prims, plabels, moving = take.prims(i, cam.is_ego)
    keep = [only is None or lab < 0 or lab in only for lab in plabels]
    key = (cam.name, render_div, None if only is None else tuple(only))
    if cache is not None and not cam.is_ego and key in cache:
        geom, rgb0, depth0, labels0 = cache[key]
        todo = [k for k in range(len(prims)) if keep[k] and moving[k]]
    else:
        xs = ((np.arange(w, dtype=np.float32) + 0.5) - cx) / f
        ys = ((np.arange(h, dtype=np.float32) + 0.5) - cy) / f
        Rf = R.astype(np.float32)
        dx = Rf[0, 0] * xs[None, :] + Rf[1, 0] * ys[:, None] + Rf[2, 0]
        dy = Rf[0, 1] * xs[None, :] + Rf[1, 1] * ys[:, None] + Rf[2, 1]
        dz = Rf[0, 2] * xs[None, :] + Rf[1, 2] * ys[:, None] + Rf[2, 2]
        geom = (R, C, f, cx, cy, w, h, dx, dy, dz)
        rgb0 = _room(take, C, dx, dy, dz)
        depth0 = np.full((h, w), _INF, np.float32)  # every primitive is inside the room
        labels0 = np.full((h, w), -1, np.int16)
        todo = [k for k in range(len(prims)) if keep[k]]
        if cache is not None and not cam.is_ego:
            static = [k for k in todo if not moving[k]]
            _draw([prims[k] for k in static], [plabels[k] for k in static], geom, rgb0, depth0, labels0)
            cache[key] = (geom, rgb0, depth0, labels0)
            todo = [k for k in todo if moving[k]]
    rgb, depth, labels = rgb0.copy(), depth0.copy(), labels0.copy()
    _draw([prims[k] for k in todo], [plabels[k] for k in todo], geom, rgb, depth, labels)
    return rgb, labels


# ----------------------------------------------------------------------------- RLE


def rle_upsampled(mask: np.ndarray, sy: int, sx: int) -> dict:
    """COCO compressed RLE of ``mask`` (h, w) nearest-upsampled by (sy, sx), without
    building the big mask: runs of the column-major sequence, restricted to the
    mask's columns. Returns ``{"size": [h*sy, w*sx], "counts": str}``."""
    from pycocotools import mask as mask_utils

    h, w = mask.shape
    H, W = h * sy, w * sx
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        counts = [H * W]
    else:
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        seq = np.repeat(mask[:, c0:c1].T, sx, axis=0).ravel()  # column-major, each column sx times
        change = np.flatnonzero(seq[1:] != seq[:-1]) + 1
        runs = (np.diff(np.concatenate(([0], change, [seq.size]))) * sy).tolist()
        pre, post = c0 * sx * H, (w - c1) * sx * H
        if seq[0]:
            runs = [pre] + runs
        else:
            runs[0] += pre
        if len(runs) % 2 == 0:  # last run is foreground
            if post:
                runs.append(post)
        else:
            runs[-1] += post
        counts = runs
    rle = mask_utils.frPyObjects({"size": [H, W], "counts": counts}, H, W)
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


# ----------------------------------------------------------------------------- writing


def take_uid(seed: int, index: int) -> str:
    """Deterministic UUID-shaped take id for (seed, index)."""
    return str(uuid.UUID(bytes=hashlib.sha256(f"lmeec-synthetic:{seed}:{index}".encode()).digest()[:16], version=4))


def write_take(out_dir: str, seed: int, index: int, cfg: SynthConfig = SynthConfig()) -> Tuple[str, bool]:
    """Render and write take ``index`` of ``seed``; returns (take id, written?)."""
    take_id = take_uid(seed, index)
    take_dir = os.path.join(out_dir, take_id)
    ann_path = os.path.join(take_dir, "annotation.json")
    if os.path.isfile(ann_path):
        return take_id, False
    rng = np.random.default_rng([int(seed), int(index), 0x5EED])
    take = build_take(take_id, rng, cfg)
    key_rng = np.random.default_rng([int(seed), int(index), 0xA11])
    names = [o.name for o in take.objects]
    masks: Dict[str, Dict[str, Dict[str, dict]]] = {n: {} for n in names if n}
    frames = [str(FRAME_STEP * i) for i in range(take.n_frames)]
    cache: dict = {}
    for cam in take.cameras:
        cam_dir = os.path.join(take_dir, cam.name)
        os.makedirs(cam_dir, exist_ok=True)
        raw = (EGO_RAW_SCALE if cam.is_ego else EXO_RAW_SCALE) if cfg.raw_masks else 1
        s = cfg.render_div * raw
        for i, fname in enumerate(frames):
            rgb, labels = render_view(take, cam, i, cfg.render_div, cache=cache)
            img = Image.fromarray((rgb * 255.0 + 0.5).astype(np.uint8))
            if cfg.render_div != 1:  # nearest: JPEG pixels line up with the mask pixels
                img = img.resize(cam.out_wh, Image.NEAREST)
            img.save(os.path.join(cam_dir, fname + ".jpg"), quality=cfg.jpeg_quality)
            counts = np.bincount((labels.ravel() + 2).astype(np.intp), minlength=len(names) + 2)[2:]
            for k, n in enumerate(names):
                if not n:
                    continue
                if counts[k] >= cfg.min_pixels:
                    masks[n].setdefault(cam.name, {})[fname] = rle_upsampled(labels == k, s, s)
                elif key_rng.random() < cfg.p_empty_key:
                    masks[n].setdefault(cam.name, {})[fname] = rle_upsampled(np.zeros(labels.shape, bool), s, s)
    ann = {
        "masks": {n: {c.name: masks[n][c.name] for c in take.cameras if c.name in masks[n]} for n in masks},
        "subsample_idx": [FRAME_STEP * i for i in range(take.n_frames)],
        "annotated_frames": {n: {c.name: [FRAME_STEP * i for i in range(take.n_frames)] for c in take.cameras} for n in masks},
    }
    write_json_atomic(ann_path, ann)
    return take_id, True


GENERATOR_RECORD = "synthetic.json"


def _check_generator_record(out_dir: str, seed: int, cfg: SynthConfig) -> None:
    """Takes already in ``out_dir`` are reused, so they must come from the same generator
    settings: ``out_dir/synthetic.json`` records them; a mismatch is an error naming both."""
    rec = {"seed": seed, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}}
    path = os.path.join(out_dir, GENERATOR_RECORD)
    if os.path.isfile(path):
        try:
            old = read_json(path, what="generator record")
        except DataError as e:
            raise DataError(f"{e.problem}; delete it or the directory", path=path) from None
        diff = {k: (old.get(k), v) for k, v in rec.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out_dir} holds synthetic takes made with other settings "
                             f"({', '.join(f'{k}: {a!r} there, {b!r} asked' for k, (a, b) in diff.items())}); "
                             "use another directory or delete it")
        return
    write_json_atomic(path, rec, indent=1)


def _worker(args):
    out_dir, seed, index, cfg = args
    return write_take(out_dir, seed, index, cfg)


def make_synthetic_split(
    out_dir,
    n_takes: int,
    seed: int = 0,
    n_frames: int = 16,
    n_exo: int = 1,
    workers: Optional[int] = None,
    render_div: int = 2,
    raw_masks: bool = True,
    progress: bool = False,
    split_name: str = "train",
    **cfg_kwargs,
) -> List[str]:
    """Write ``n_takes`` synthetic takes into ``out_dir`` (the split directory).

    Takes already written are skipped (idempotent). Also writes ``out_dir/takes.txt``
    (one take id per line, LM-EEC's ``--video_list_file``) and ``out_dir/split.json``
    (``{split_name: [takes]}``, the official split format). Returns the take ids.
    ``workers``: processes (default: min(2, cpu count); 1 = in this process).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cfg = SynthConfig(n_frames=n_frames, n_exo=n_exo, render_div=render_div, raw_masks=raw_masks, **cfg_kwargs)
    _check_generator_record(out_dir, int(seed), cfg)
    jobs = [(out_dir, int(seed), i, cfg) for i in range(n_takes)]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    ids: Dict[int, str] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_takes, desc="synthetic takes", unit="take")
    if workers <= 1 or n_takes <= 1:
        for j in jobs:
            ids[j[2]] = _worker(j)[0]
            if bar is not None:
                bar.update(1)
    else:
        import multiprocessing as mp

        # spawn: safe even when the caller has already started JAX threads
        with mp.get_context("spawn").Pool(workers) as pool:
            for j, (tid, _) in zip(jobs, pool.imap(_worker, jobs, chunksize=1)):
                ids[j[2]] = tid
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    takes = [ids[i] for i in range(n_takes)]
    with atomic_write(os.path.join(out_dir, "takes.txt"), "w") as f:
        f.write("".join(t + "\n" for t in takes))
    write_json_atomic(os.path.join(out_dir, "split.json"), {split_name: takes})
    return takes
