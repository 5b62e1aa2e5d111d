"""Procedural top-down tabletop scenes for KALIE's five tasks.

Every scene draws the task's objects at a random pose (anywhere on the table, any rotation, varied size, shape
proportions and colours) plus distractor shapes on a textured table, and places the five keypoints by the task
definitions of KALIE's fine-tuning prompts. Objects are drawn as polygons in a 2x supersampled canvas and
downsampled, so edges are anti-aliased like a photograph; each object's binary mask is returned for the synthesis stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from affordvla.formats.kalie_tasks import TASKS

SUPERSAMPLE = 2
MARGIN = 0.06  # keypoints and objects stay this far (normalised) inside the image


@dataclass
class Scene:
    """One procedural tabletop scene: the image, its KALIE task, the five keypoints and the objects' masks."""

    image: np.ndarray  # HxWx3 uint8
    task: str
    keypoints: np.ndarray  # (5, 2) normalised (x, y), KALIE_POINT_NAMES order
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # object name -> HxW bool


class _Canvas:
    """Draws polygons in normalised coordinates onto an RGB image and per-object masks."""

    def __init__(self, size: int, background: Image.Image):
        self.size = size
        self.scale = size * SUPERSAMPLE
        self.image = background.resize((self.scale, self.scale), Image.BILINEAR)
        self.draw = ImageDraw.Draw(self.image)
        self.masks: dict[str, Image.Image] = {}

    def _px(self, points: np.ndarray) -> list[tuple[float, float]]:
        return [(float(x) * self.scale, float(y) * self.scale) for x, y in points]

    def polygon(self, points: np.ndarray, colour, owner: str | None = None, outline=None) -> None:
        self.draw.polygon(self._px(points), fill=tuple(colour), outline=None if outline is None else tuple(outline))
        if owner is not None:
            mask = self.masks.setdefault(owner, Image.new("L", (self.scale, self.scale), 0))
            ImageDraw.Draw(mask).polygon(self._px(points), fill=255)

    def ellipse(self, centre, rx: float, ry: float, angle: float, colour, owner: str | None = None) -> None:
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        local = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
        self.polygon(_place(local, centre, angle), colour, owner)

    def finish(self, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        image = self.image.filter(ImageFilter.GaussianBlur(radius=0.6 * SUPERSAMPLE * rng.uniform(0.3, 1.0)))
        image = image.resize((self.size, self.size), Image.LANCZOS)
        array = np.asarray(image, dtype=np.float32)
        array += rng.normal(0.0, rng.uniform(1.0, 5.0), array.shape)  # sensor noise
        masks = {
            name: np.asarray(m.resize((self.size, self.size), Image.BILINEAR)) >= 128 for name, m in self.masks.items()
        }
        return np.clip(array, 0, 255).astype(np.uint8), masks


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _place(local: np.ndarray, centre, angle: float) -> np.ndarray:
    """Rotate object-frame points by `angle` and move them to `centre` (all normalised)."""
    return np.asarray(local, dtype=np.float64) @ _rotation(angle).T + np.asarray(centre, dtype=np.float64)


def _rect(length: float, width: float, x0: float = 0.0) -> np.ndarray:
    """Rectangle along the local x axis from x0 to x0 + length, centred on y = 0."""
    return np.array([[x0, -width / 2], [x0 + length, -width / 2], [x0 + length, width / 2], [x0, width / 2]])


def _blob(rng: np.random.Generator, radius: float, n: int = 9) -> np.ndarray:
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = radius * rng.uniform(0.65, 1.0, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _colour(rng: np.random.Generator, avoid=None, min_distance: float = 90.0) -> np.ndarray:
    """A random saturated-or-not colour far enough from `avoid` (the table) to stay visible."""
    for _ in range(50):
        c = rng.integers(0, 256, 3)
        if avoid is None or np.linalg.norm(c - np.asarray(avoid)) >= min_distance:
            return c
    return 255 - np.asarray(avoid)


def _shade(colour, factor: float) -> np.ndarray:
    return np.clip(np.asarray(colour) * factor, 0, 255).astype(int)


def _table(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """Textured table: base colour, low-frequency shading, optional wood grain or tiles."""
    base = rng.integers(40, 230, 3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    shading = 1.0 + gx * (xx - 0.5) + gy * (yy - 0.5)
    image = base[None, None, :] * shading[..., None]
    style = rng.integers(0, 3)
    if style == 1:  # wood grain
        angle = rng.uniform(0, math.pi)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        image *= (1.0 + 0.07 * np.sin(u * rng.uniform(40, 90) + 3 * np.sin(u * 7)))[..., None]
    elif style == 2:  # tiles
        n = rng.integers(3, 7)
        tiles = ((xx * n).astype(int) + (yy * n).astype(int)) % 2
        image *= (1.0 - 0.08 * tiles)[..., None]
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), base


def _draw_distractors(canvas: _Canvas, rng: np.random.Generator, table_colour, count: int) -> None:
    """Clutter that shares no shape with a task object (triangles, crosses, stars, rings), so every scene has
    one right answer."""
    for _ in range(count):
        centre = rng.uniform(0.05, 0.95, 2)
        angle = rng.uniform(0, 2 * math.pi)
        colour = _colour(rng, table_colour, 60)
        kind = rng.integers(0, 4)
        s = rng.uniform(0.03, 0.07)
        if kind == 0:
            tri = np.array([[s, 0], [-s, 0.8 * s], [-s, -0.8 * s]])
            canvas.polygon(_place(tri, centre, angle), colour)
        elif kind == 1:
            for bar in (_rect(2 * s, 0.6 * s, -s), _rect(2 * s, 0.6 * s, -s) @ _rotation(math.pi / 2).T):
                canvas.polygon(_place(bar, centre, angle), colour)
        elif kind == 2:
            t = np.arange(10) * math.pi / 5
            radius = np.where(np.arange(10) % 2 == 0, s, 0.45 * s)
            canvas.polygon(_place(np.stack([radius * np.cos(t), radius * np.sin(t)], 1), centre, angle), colour)
        else:
            hole = _table_sample(canvas, centre)
            canvas.ellipse(centre, s, s, 0.0, colour)
            canvas.ellipse(centre, 0.5 * s, 0.5 * s, 0.0, hole)


def _table_sample(canvas: _Canvas, centre) -> tuple[int, int, int]:
    """The table colour under `centre`, to punch the hole of a ring."""
    x, y = (int(min(canvas.scale - 1, max(0, c * canvas.scale))) for c in centre)
    return canvas.image.getpixel((x, y))[:3]


# --- the five tasks -------------------------------------------------------------------------------------------
# Each drawer returns the keypoints (5, 2) and draws its objects; all geometry is in normalised units, in the
# object's frame (x along its main axis), placed by _place.


def _sweeping(canvas: _Canvas, rng, table, layout) -> np.ndarray:
    brush_c, trash_c = layout
    handle_len, handle_w = rng.uniform(0.16, 0.26), rng.uniform(0.03, 0.045)
    head_len, head_w = rng.uniform(0.05, 0.08), rng.uniform(0.09, 0.15)
    direction = trash_c - brush_c
    angle = math.atan2(direction[1], direction[0]) + rng.uniform(-0.4, 0.4)
    # brush frame: handle from -handle_len to 0, head from 0 to head_len
    handle = _place(_rect(handle_len, handle_w, -handle_len), brush_c, angle)
    head = _place(_rect(head_len, head_w, 0.0), brush_c, angle)
    handle_colour, head_colour = _colour(rng, table), _colour(rng, table)
    canvas.polygon(handle, handle_colour, owner="brush")
    canvas.polygon(head, head_colour, owner="brush")
    for k in range(5):  # bristle lines
        y = (k - 2) / 5 * head_w
        line = _place(_rect(head_len * 0.8, head_w * 0.04, head_len * 0.1) + [0, y], brush_c, angle)
        canvas.polygon(line, _shade(head_colour, 0.6))
    # trash: a little pile of scraps (3-6 bits) around trash_c; the Target Point is the pile's centre
    trash_colour = _colour(rng, table)
    spread = rng.uniform(0.025, 0.04)
    for _ in range(int(rng.integers(3, 7))):
        bit_centre = trash_c + rng.uniform(-spread, spread, 2)
        bit = _place(_blob(rng, rng.uniform(0.012, 0.02), n=6), bit_centre, rng.uniform(0, 2 * math.pi))
        canvas.polygon(bit, _shade(trash_colour, rng.uniform(0.8, 1.2)), owner="trash")
    grasp = _place([[-0.7 * handle_len, 0.0]], brush_c, angle)[0]
    function = _place([[head_len, 0.0]], brush_c, angle)[0]
    sweep = (trash_c - function) / (np.linalg.norm(trash_c - function) + 1e-9)
    pre = trash_c - 0.08 * sweep
    post = trash_c + 0.12 * sweep
    return np.stack([grasp, function, trash_c, pre, post])


def _drawer(canvas: _Canvas, rng, table, layout) -> np.ndarray:
    (centre,) = layout
    angle = rng.uniform(0, 2 * math.pi)
    body_l, body_w = rng.uniform(0.22, 0.32), rng.uniform(0.2, 0.3)
    open_depth = rng.uniform(0.08, 0.14)
    drawer_w = body_w * rng.uniform(0.6, 0.85)
    body_colour = _colour(rng, table)
    # cabinet from -body_l to 0 along x; the drawer slides out along +x
    canvas.polygon(_place(_rect(body_l, body_w, -body_l), centre, angle), body_colour, owner="open drawer")
    canvas.polygon(_place(_rect(open_depth, drawer_w, 0.0), centre, angle), _shade(body_colour, 0.75),
                   owner="open drawer")
    inner = _rect(open_depth * 0.8, drawer_w * 0.8, open_depth * 0.05)
    canvas.polygon(_place(inner, centre, angle), _shade(body_colour, 0.45))
    handle_colour = _colour(rng, body_colour, 70)
    canvas.polygon(_place(_rect(0.018, drawer_w * 0.45, open_depth), centre, angle), handle_colour,
                   owner="open drawer")
    grasp = _place([[open_depth + 0.009, 0.0]], centre, angle)[0]
    pre = _place([[open_depth + 0.08, 0.0]], centre, angle)[0]
    post = _place([[0.009, 0.0]], centre, angle)[0]
    return np.stack([grasp, grasp, grasp, pre, post])


def _towel(canvas: _Canvas, rng, table, layout) -> np.ndarray:
    cloth_c, rack_c = layout
    rack_angle = rng.uniform(0, 2 * math.pi)
    bar_len, bar_w = rng.uniform(0.22, 0.34), rng.uniform(0.028, 0.04)
    rack_colour = _colour(rng, table)
    canvas.polygon(_place(_rect(bar_len, bar_w, -bar_len / 2), rack_c, rack_angle), rack_colour, owner="rack")
    for end in (-bar_len / 2, bar_len / 2):
        canvas.ellipse(_place([[end, 0.0]], rack_c, rack_angle)[0], 0.022, 0.022, 0.0, _shade(rack_colour, 0.7),
                       owner="rack")
    w, h = rng.uniform(0.1, 0.18), rng.uniform(0.08, 0.14)
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2 + rng.normal(0, 0.008, (4, 2))
    cloth_angle = rng.uniform(0, 2 * math.pi)
    cloth_colour = _colour(rng, table)
    canvas.polygon(_place(corners, cloth_c, cloth_angle), cloth_colour, owner="cloth")
    stripe = np.array([[-w / 2, -0.01], [w / 2, -0.01], [w / 2, 0.01], [-w / 2, 0.01]])
    canvas.polygon(_place(stripe, cloth_c, cloth_angle), _colour(rng, cloth_colour, 60))
    # The cloth is hung over the bar point closest to it; waypoints sit on either side of the bar.
    normal = _rotation(rack_angle) @ np.array([0.0, 1.0])
    side = 1.0 if np.dot(cloth_c - rack_c, normal) >= 0 else -1.0
    target = rack_c
    return np.stack([cloth_c, cloth_c, target, target + side * 0.07 * normal, target - side * 0.07 * normal])


def _pouring(canvas: _Canvas, rng, table, layout) -> np.ndarray:
    scoop_c, bowl_c = layout
    angle = rng.uniform(0, 2 * math.pi)
    handle_len, handle_w = rng.uniform(0.12, 0.2), rng.uniform(0.028, 0.04)
    scoop_r = rng.uniform(0.04, 0.06)
    scoop_colour = _colour(rng, table)
    canvas.polygon(_place(_rect(handle_len, handle_w, -handle_len), scoop_c, angle), scoop_colour,
                   owner="scooper with small items in it")
    cup = _place([[scoop_r, 0.0]], scoop_c, angle)[0]
    canvas.ellipse(cup, scoop_r, scoop_r * 0.85, angle, _shade(scoop_colour, 0.8),
                   owner="scooper with small items in it")
    item_colour = _colour(rng, scoop_colour, 80)
    for _ in range(int(rng.integers(3, 7))):
        offset = rng.uniform(-0.5, 0.5, 2) * scoop_r
        canvas.ellipse(cup + offset, 0.008, 0.008, 0.0, item_colour)
    bowl_r = rng.uniform(0.07, 0.1)
    bowl_colour = _colour(rng, table)
    canvas.ellipse(bowl_c, bowl_r, bowl_r, 0.0, bowl_colour, owner="bowl")
    canvas.ellipse(bowl_c, bowl_r * 0.75, bowl_r * 0.75, 0.0, _shade(bowl_colour, 0.6))
    grasp = _place([[-0.6 * handle_len, 0.0]], scoop_c, angle)[0]
    return np.stack([grasp, cup, bowl_c, bowl_c, bowl_c])


def _unplugging(canvas: _Canvas, rng, table, layout) -> np.ndarray:
    (centre,) = layout
    angle = rng.uniform(0, 2 * math.pi)
    body_l, body_w = rng.uniform(0.22, 0.3), rng.uniform(0.16, 0.22)
    body_colour = _colour(rng, table)
    # laptop base from -body_l to 0 along x; its right side (x = 0) holds the usb port
    canvas.polygon(_place(_rect(body_l, body_w, -body_l), centre, angle), body_colour, owner="computer")
    keys = _rect(body_l * 0.7, body_w * 0.55, -body_l * 0.85)
    canvas.polygon(_place(keys, centre, angle), _shade(body_colour, 0.6))
    port_y = rng.uniform(-0.3, 0.3) * body_w
    stick_len, stick_w = rng.uniform(0.05, 0.08), rng.uniform(0.02, 0.03)
    stick = _rect(stick_len, stick_w, -0.01) + [0.0, port_y]
    canvas.polygon(_place(stick, centre, angle), _colour(rng, table), owner="usb stick")
    grasp = _place([[stick_len * 0.55, port_y]], centre, angle)[0]
    pull = _rotation(angle) @ np.array([1.0, 0.0])
    target = grasp + 0.1 * pull
    return np.stack([grasp, grasp, target, grasp + 0.05 * pull, target + 0.05 * pull])


_DRAWERS = {
    "trash_sweeping": (_sweeping, (0.2, 0.12)),
    "drawer_closing": (_drawer, (0.2,)),
    "towel_hanging": (_towel, (0.12, 0.18)),
    "pouring": (_pouring, (0.15, 0.12)),
    "unplugging": (_unplugging, (0.2,)),
}


def _layout(rng: np.random.Generator, radii) -> list[np.ndarray]:
    """Object centres anywhere on the table, far enough apart not to overlap (rejection sampled)."""
    while True:
        centres = [rng.uniform(MARGIN + r, 1 - MARGIN - r, 2) for r in radii]
        if len(centres) == 1:
            return centres
        gap = np.linalg.norm(centres[0] - centres[1])
        if radii[0] + radii[1] + 0.02 <= gap <= 0.6:
            return centres


def make_scene(rng: np.random.Generator, task: str, size: int = 128, max_distractors: int = 3) -> Scene:
    """One scene of `task`; retried until every keypoint lies inside the image margin."""
    drawer, radii = _DRAWERS[task]
    for _ in range(100):
        background, table_colour = _table(rng, size)  # upsampled by the canvas; texture needs no 2x detail
        canvas = _Canvas(size, background)
        _draw_distractors(canvas, rng, table_colour, int(rng.integers(0, max_distractors + 1)))
        keypoints = drawer(canvas, rng, table_colour, _layout(rng, radii))
        if np.all((keypoints >= MARGIN) & (keypoints <= 1 - MARGIN)):
            image, masks = canvas.finish(rng)
            ordered = {name: masks[name] for name in TASKS[task].objects}
            return Scene(image, task, keypoints.astype(np.float32), ordered)
    raise RuntimeError(f"could not place a {task} scene with keypoints inside the image in 100 tries")


def make_scenes(seed: int, count: int, size: int = 128, tasks=tuple(TASKS)):
    """`count` scenes cycling through `tasks`, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        yield make_scene(rng, tasks[i % len(tasks)], size)

