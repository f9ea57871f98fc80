"""Motion-only video datasets for the quickstart: a single frame says nothing about the class.

Two of them, rendered differently (`prep.synthetic.kind`): `shapes`, the quickstart's, described here, and
`dots`, a held-out second motion source for checking that what was tuned on `shapes` carries over (see
`render_dots_video`).

Each video shows a static textured background and one or two textured objects that all move the way
their class says (translate up, down, sideways or diagonally, rotate, zoom in or out).

Every class is closed under horizontal mirroring, which the loader applies to half the training clips:
a mirror turns left into right and clockwise into counterclockwise, so "sideways" holds both directions
(one drawn per video) and "rotate" both senses. Classes such as "left" against "right" would have half
their training clips mislabelled.

Frame-level appearance is the same for every class by construction:

- object centres start uniformly on the frame and move on a torus (they wrap around the edges),
  so every frame's centre is uniform;
- orientations start uniformly in [0, 2 pi), so every frame's angle is uniform;
- object sizes follow log r = c + o: zoom classes sweep o = +-rate * (t - mid) over the video, the other
  classes hold o fixed at a value drawn from that same sweep, so the size of a random frame has one
  distribution for every class (zoom in and zoom out are each other's time reversal).

So only motion, i.e. optical flow or frame differences, separates the classes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from d3d_cluster.spec import SyntheticSpec
from dataprep.video import write_h264

CLASSES = ("up", "down", "sideways", "rotate", "zoom_in", "zoom_out", "diagonal_up", "diagonal_down")
# The motions of each class, one drawn per video, as (dx, dy, spin, zoom): image coordinates, y down;
# positive spin turns clockwise on screen. Mirroring maps (dx, dy, spin, zoom) to (-dx, dy, -spin, zoom).
MOTIONS = {
    "up": ((0, -1, 0, 0),),
    "down": ((0, 1, 0, 0),),
    "sideways": ((-1, 0, 0, 0), (1, 0, 0, 0)),
    "rotate": ((0, 0, 1, 0), (0, 0, -1, 0)),
    "zoom_in": ((0, 0, 0, 1),),
    "zoom_out": ((0, 0, 0, -1),),
    "diagonal_up": ((-1, -1, 0, 0), (1, -1, 0, 0)),
    "diagonal_down": ((-1, 1, 0, 0), (1, 1, 0, 0)),
}
FPS = 25
# Small, slow objects keep motion hard to see in RGB (frame differences are about 3% of the pixel spread),
# the regime D3D is about; with larger, faster ones the RGB-only baseline learned motion without a teacher.
SPEED_PX = (1.0, 3.0)  # per frame, at 64 px; scaled with the frame size
SPIN_DEG = (3.0, 8.0)  # per frame
ZOOM_RATE = (0.02, 0.04)  # log-size per frame, capped so a whole video zooms at most e^ZOOM_TOTAL
ZOOM_TOTAL = 0.6
RADIUS = (0.12, 0.2)  # mid-video object radius, as a fraction of the frame size
SPRITE_RADIUS = 0.4  # objects are drawn at this radius and only ever shrunk


def object_track(rng: np.random.Generator, motion: tuple[int, int, int, int], frames: int,
                 size: int) -> dict[str, np.ndarray]:
    """Per-frame centre (F, 2) as x, y; angle (F,) in radians; radius (F,) in pixels of one object."""
    dx, dy, spin, zoom = motion
    t = np.arange(frames, dtype=np.float64)
    mid = (frames - 1) / 2
    speed = rng.uniform(*SPEED_PX) * size / 64
    omega = np.deg2rad(rng.uniform(*SPIN_DEG))
    rate = min(rng.uniform(*ZOOM_RATE), ZOOM_TOTAL / (frames - 1))
    held = rng.choice((-1.0, 1.0)) * rate * (rng.integers(frames) - mid)
    centre = (rng.uniform(0, size, 2) + np.outer(t, (dx * speed, dy * speed))) % size
    angle = (rng.uniform(0, 2 * np.pi) + spin * omega * t) % (2 * np.pi)
    offset = zoom * rate * (t - mid) if zoom else np.full(frames, held)
    radius = np.exp(np.log(rng.uniform(*RADIUS) * size) + offset)
    return {"centre": centre, "angle": angle, "radius": radius}


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth blobs between two random colours plus finer luminance detail, so flow has edges to track."""
    coarse = cv2.resize(rng.random((rng.integers(2, 6),) * 2), (size, size), interpolation=cv2.INTER_CUBIC)
    fine = cv2.resize(rng.random((rng.integers(8, 17),) * 2), (size, size), interpolation=cv2.INTER_CUBIC)
    low, high = rng.uniform(0, 255, (2, 3))
    image = low + (high - low) * np.clip(coarse, 0, 1)[..., None] + 60 * (fine - 0.5)[..., None]
    return np.clip(image, 0, 255).astype(np.float32)


def _sprite(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured ellipse or random polygon centred on a size x size canvas, RGBA with alpha premultiplied."""
    radius = SPRITE_RADIUS * size
    centre = size / 2
    mask = np.zeros((size, size), np.uint8)
    if rng.random() < 0.5:
        axes = (round(radius), round(radius * rng.uniform(0.5, 0.9)))
        cv2.ellipse(mask, (round(centre), round(centre)), axes, 0, 0, 360, 255, -1, cv2.LINE_AA)
    else:
        corners = rng.integers(3, 7)
        theta = np.arange(corners) * 2 * np.pi / corners + rng.uniform(-0.3, 0.3, corners)
        reach = radius * rng.uniform(0.7, 1.0, corners)
        points = np.stack([centre + reach * np.cos(theta), centre + reach * np.sin(theta)], axis=1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 255, cv2.LINE_AA)
    alpha = mask.astype(np.float32)[..., None] / 255
    return np.concatenate([_texture(rng, size) * alpha, alpha], axis=2)


def render_video(rng: np.random.Generator, label: str, frames: int, size: int) -> np.ndarray:
    """(F, size, size, 3) uint8 frames of one video of class `label`."""
    background = _texture(rng, size)
    motion = MOTIONS[label][rng.integers(len(MOTIONS[label]))]
    objects = [(_sprite(rng, size), object_track(rng, motion, frames, size)) for _ in range(rng.integers(1, 3))]
    video = np.empty((frames, size, size, 3), np.uint8)
    for index in range(frames):
        frame = background.copy()
        for sprite, track in objects:
            # warp around the canvas centre plus the sub-pixel part, then roll by whole pixels: wrap-around
            shift = track["centre"][index] - size / 2
            whole = np.floor(shift)
            scale = track["radius"][index] / (SPRITE_RADIUS * size)
            cos, sin = scale * np.cos(track["angle"][index]), scale * np.sin(track["angle"][index])
            linear = np.array([[cos, -sin], [sin, cos]])
            offset = size / 2 + (shift - whole) - linear @ np.full(2, size / 2)
            warped = cv2.warpAffine(sprite, np.hstack([linear, offset[:, None]]), (size, size), flags=cv2.INTER_LINEAR)
            warped = np.roll(warped, (int(whole[1]), int(whole[0])), axis=(0, 1))
            frame = frame * (1 - warped[..., 3:]) + warped[..., :3]
        video[index] = np.clip(np.rint(frame), 0, 255)
    return video


DIRECTIONS = {"east": (1, 0), "west": (-1, 0), "north": (0, -1), "south": (0, 1), "north_east": (1, -1),
              "south_west": (-1, 1), "north_west": (-1, -1), "south_east": (1, 1)}  # image coordinates, y down
# A mirror turns east into west (north and south into themselves): train `dots` with mirroring off, or with
# the mirrored pairs as data.mirror_pairs.
DOT_SPEED_PX = (0.5, 1.5)  # per frame, at 64 px: slower than the shapes
DOT_COHERENCE = (0.5, 0.8)  # share of dots moving the class's way; the others drift in random directions
DOT_COUNT = (30, 70)
DOT_RADIUS_PX = (1.0, 2.5)
DOT_LIFETIME = (6, 12)  # frames before a dot reappears elsewhere, so no dot's track spans a whole clip


def _noise_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Pixel noise, lightly blurred, between two colours: no large shapes, unlike the `shapes` backgrounds."""
    noise = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), rng.uniform(0.5, 1.5))
    noise = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-6)
    low, high = rng.uniform(0, 255, (2, 3))
    return (low + (high - low) * noise[..., None]).astype(np.float32)


def dot_tracks(rng: np.random.Generator, direction: tuple[int, int], frames: int, size: int) -> np.ndarray:
    """(F, dots, 2) x, y of every dot: a coherent share moves along `direction` (at one speed along its heading,
    so diagonals are as fast as the rest), the others each their own random way; each dot lives a few frames
    and then reappears at a uniform position, so every frame's dots are uniform on the frame."""
    count = rng.integers(*DOT_COUNT, endpoint=True)
    speed = rng.uniform(*DOT_SPEED_PX) * size / 64
    heading = np.arctan2(direction[1], direction[0])
    coherent = rng.random(count) < rng.uniform(*DOT_COHERENCE)
    angles = np.where(coherent, heading, rng.uniform(0, 2 * np.pi, count))
    velocity = speed * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    lifetime = rng.integers(*DOT_LIFETIME, endpoint=True, size=count)
    age = rng.integers(0, lifetime)  # staggered, so dots do not all reappear on one frame
    position = rng.uniform(0, size, (count, 2))
    tracks = np.empty((frames, count, 2))
    for index in range(frames):
        tracks[index] = position
        age += 1
        reborn = age >= lifetime
        position = np.where(reborn[:, None], rng.uniform(0, size, (count, 2)), (position + velocity) % size)
        age[reborn] = 0
    return tracks


def render_dots_video(rng: np.random.Generator, label: str, frames: int, size: int) -> np.ndarray:
    """(F, size, size, 3) uint8 frames of one `dots` video: a random-dot kinematogram over a static noise
    background, the dots (small discs of solid colour) drifting in the class's compass direction."""
    background = _noise_background(rng, size)
    tracks = dot_tracks(rng, DIRECTIONS[label], frames, size)
    colours = rng.uniform(0, 255, (tracks.shape[1], 3))
    radii = rng.uniform(*DOT_RADIUS_PX, tracks.shape[1]) * size / 64
    shift = 4  # cv2 draws at 1/16 px with `shift`, so slow dots move smoothly
    video = np.empty((frames, size, size, 3), np.uint8)
    for index in range(frames):
        frame = background.copy()
        for (x, y), colour, radius in zip(tracks[index], colours, radii):
            for dx in (-size, 0, size):  # wrap-around: draw the copies a disc at an edge shows
                for dy in (-size, 0, size):
                    if -radius <= x + dx < size + radius and -radius <= y + dy < size + radius:
                        centre = (round((x + dx) * 2**shift), round((y + dy) * 2**shift))
                        cv2.circle(frame, centre, round(radius * 2**shift), colour.tolist(), -1, cv2.LINE_AA, shift)
        video[index] = np.clip(np.rint(frame), 0, 255)
    return video


KINDS = {"shapes": (CLASSES, render_video), "dots": (tuple(DIRECTIONS), render_dots_video)}


def make_motion_dataset(spec: SyntheticSpec, out_dir: Path, seed: int) -> Path:
    """Writes `videos/<label>_NNNN.mp4` and `labels.csv` (path,label,split) under out_dir; returns the CSV.

    Every video draws from its own generator seeded by (seed, class, number), so the dataset is
    deterministic and any one video can be regenerated alone. Val videos are chosen per class.
    """
    if spec.size % 2:
        raise ValueError(f"synthetic size must be even for H.264 4:2:0, got {spec.size}")
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    count = spec.videos_per_class
    n_val = min(count - 1, max(1, round(spec.val_fraction * count)))
    rows = []
    classes, render = KINDS[spec.kind]
    for class_index, label in enumerate(classes[: spec.classes]):
        val = set(np.random.default_rng([seed, class_index]).permutation(count)[:n_val].tolist())
        for number in range(count):
            rng = np.random.default_rng([seed, class_index, number])
            relative = f"videos/{label}_{number:04d}.mp4"
            write_h264(out_dir / relative, render(rng, label, spec.frames, spec.size), FPS)
            rows.append((relative, label, "val" if number in val else "train"))
    labels = out_dir / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label", "split"))
        writer.writerows(rows)
    return labels
