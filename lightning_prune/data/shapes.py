"""The built-in ``shapes`` detection dataset: procedurally generated COCO-format scenes.

Each image is a textured background (a smooth colour field, a gradient, thin lines and sensor noise) with 0-6
geometric shapes of random colour. The class is the *shape* (circle, rectangle, triangle, cross, star, ring), never
the colour, so a detector has to learn geometry. Later shapes occlude earlier ones; a shape is never hidden by more
than :data:`MAX_OCCLUSION` of its pixels, and its box is the full (unoccluded) shape's box.

Datasets are generated once, deterministically from their parameters, into a cache folder whose name is a hash of
those parameters, and reused afterwards.

Example:
    >>> import tempfile
    >>> root = shapes_root(num_train=4, num_val=2, cache_root=tempfile.mkdtemp())
    >>> sorted(p.name for p in root.iterdir())
    ['annotations', 'meta.json', 'train', 'val']
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPE_NAMES", "default_cache_root", "generate_shapes", "shapes_root"]

#: Class names in label order; category ids in the json are ``index + 1``.
SHAPE_NAMES: tuple[str, ...] = ("circle", "rectangle", "triangle", "cross", "star", "ring")
#: A shape is dropped (re-sampled) if a later shape would hide more than this fraction of its pixels.
MAX_OCCLUSION = 0.7
#: Bump when the generator changes so that cached datasets are regenerated.
_GENERATOR_VERSION = 2
_MIN_SIZE, _MAX_SIZE = 0.03, 0.5  # object side as a fraction of the image's short side
_EMPTY_FRACTION = 0.1  # share of images with no objects
_MAX_OBJECTS = 6
# aspect ratio (w / h) ranges per shape; circles and stars stay near-isotropic so they keep their identity
_ASPECT = {
    "circle": (0.75, 1.33),
    "rectangle": (0.4, 2.5),
    "triangle": (0.6, 1.6),
    "cross": (0.7, 1.4),
    "star": (0.8, 1.25),
    "ring": (0.75, 1.33),
}

PathLike = Union[str, "os.PathLike[str]"]


def default_cache_root() -> Path:
    """Return ``$LIGHTNING_PRUNE_CACHE`` or ``~/.cache/lightning_prune``."""
    return Path(os.environ.get("LIGHTNING_PRUNE_CACHE", Path.home() / ".cache" / "lightning_prune"))


def _check_args(num_images: int, image_size: tuple[int, int], num_classes: int) -> None:
    if not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"Expected argument `num_images` to be a non-negative int but got {num_images!r}.")
    if (
        len(image_size) != 2
        or not all(isinstance(s, int) for s in image_size)
        or not 32 <= image_size[0] <= image_size[1]
    ):
        raise ValueError(
            f"Expected argument `image_size` to be a pair of ints (min, max) with 32 <= min <= max but got"
            f" {image_size!r}."
        )
    if not isinstance(num_classes, int) or not 1 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(
            f"Expected argument `num_classes` to be an int in [1, {len(SHAPE_NAMES)}] but got {num_classes!r}."
        )


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour field + a linear gradient, as float32 (h, w, 3) in [0, 255]."""
    # smooth blobs: a coarse random grid upsampled bilinearly (cheap compared to blurring at full size)
    gh, gw = rng.integers(2, 6, size=2)
    coarse = rng.uniform(40, 215, size=(gh, gw, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    xx = np.arange(w, dtype=np.float32)[None, :, None] * np.float32(np.cos(angle) / w)
    yy = np.arange(h, dtype=np.float32)[:, None, None] * np.float32(np.sin(angle) / h)
    field += (xx + yy) * rng.uniform(-40, 40, size=3).astype(np.float32)  # linear gradient, (h, w, 3)
    return np.clip(field, 0, 255, out=field)


def _draw_lines(rng: np.random.Generator, image: Image.Image) -> None:
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(rng.integers(0, 5)):
        xy = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line(xy, fill=colour, width=int(rng.integers(1, 3)))


def _shape_polygon(name: str, x0: float, y0: float, bw: float, bh: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices (K, 2) of a polygonal shape filling the box (x0, y0, bw, bh) before rotation."""
    if name == "rectangle":
        pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif name == "triangle":
        apex = rng.uniform(0.2, 0.8)
        pts = [(apex, 0), (1, 1), (0, 1)]
    elif name == "cross":
        t = rng.uniform(0.28, 0.4)  # arm thickness as a fraction of the box
        a, b = 0.5 - t / 2, 0.5 + t / 2
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    elif name == "star":
        k = np.arange(10)
        radius = np.where(k % 2 == 0, 0.5, 0.5 * rng.uniform(0.38, 0.5))
        theta = -np.pi / 2 + k * np.pi / 5
        pts = list(zip(0.5 + radius * np.cos(theta), 0.5 + radius * np.sin(theta)))
    else:
        raise AssertionError(f"not a polygon: {name}")
    poly = np.asarray(pts, dtype=np.float64) * [bw, bh]
    # rotate by a small random angle around the centre; flips make triangles point in four directions
    if name == "triangle" and rng.random() < 0.5:
        poly[:, 1] = bh - poly[:, 1]
    if name == "triangle" and rng.random() < 0.5:
        poly = poly[:, ::-1] * [bw / bh, bh / bw]
    angle = np.deg2rad(rng.uniform(-15, 15))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([bw / 2, bh / 2])
    return (poly - centre) @ rot.T + centre + [x0, y0]


def _shape_mask(
    name: str, size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Sample a shape of class ``name`` in an image of ``size`` = (w, h).

    Returns its boolean mask over a window around the shape and the window's top-left corner (x, y), or None when
    the sampled shape does not fit.
    """
    w, h = size
    side = min(w, h)
    # most objects mid-size, a quarter spread log-uniformly over the full range so that small objects exist
    if rng.random() < 0.25:
        frac = float(np.exp(rng.uniform(np.log(_MIN_SIZE), np.log(_MAX_SIZE))))
    else:
        frac = float(rng.uniform(0.08, 0.4))
    aspect = float(np.exp(rng.uniform(*np.log(_ASPECT[name]))))
    bw = float(np.clip(frac * side * np.sqrt(aspect), _MIN_SIZE * side, _MAX_SIZE * side))
    bh = float(np.clip(frac * side / np.sqrt(aspect), _MIN_SIZE * side, _MAX_SIZE * side))
    # a +-15 degree rotation grows a box by at most 0.13 * its long side on each side: keep it inside the image
    margin = 0.14 * max(bw, bh)
    if bw + 2 * margin >= w or bh + 2 * margin >= h:
        return None
    x0 = float(rng.uniform(margin, w - bw - margin))
    y0 = float(rng.uniform(margin, h - bh - margin))
    # draw in a window around the shape only: per-object work then scales with the object, not the image
    wx0, wy0 = max(0, int(x0 - margin) - 1), max(0, int(y0 - margin) - 1)
    wx1, wy1 = min(w, int(x0 + bw + margin) + 2), min(h, int(y0 + bh + margin) + 2)
    mask = Image.new("L", (wx1 - wx0, wy1 - wy0), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0 = x0 - wx0, y0 - wy0
    if name == "circle":
        draw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=255)
    elif name == "ring":
        width = max(2, round(min(bw, bh) * rng.uniform(0.15, 0.25)))
        draw.ellipse([x0, y0, x0 + bw, y0 + bh], outline=255, width=width)
    else:
        draw.polygon([tuple(p) for p in _shape_polygon(name, x0, y0, bw, bh, rng)], fill=255)
    arr = np.asarray(mask) > 0
    return (arr, (wx0, wy0)) if arr.sum() >= 4 else None


def _render_image(rng: np.random.Generator, size: tuple[int, int], num_objects: int, names: tuple[str, ...]):
    """Render one scene; return (PIL image, list of (label, [x, y, w, h], area))."""
    w, h = size
    image = Image.fromarray(_background(rng, h, w).astype(np.uint8))
    _draw_lines(rng, image)
    canvas = np.asarray(image, dtype=np.float32).copy()  # (h, w, 3)
    owner = np.full((h, w), -1, dtype=np.int16)  # index of the object that owns each pixel
    objects: list[tuple[int, list[float], float]] = []
    areas = np.zeros(0, dtype=np.int64)
    visible = np.zeros(0, dtype=np.int64)  # visible pixels per object so far
    for _ in range(num_objects):
        for _attempt in range(20):
            label = int(rng.integers(len(names)))
            sampled = _shape_mask(names[label], size, rng)
            if sampled is None:
                continue
            mask, (wx, wy) = sampled
            window = (slice(wy, wy + mask.shape[0]), slice(wx, wx + mask.shape[1]))
            own = owner[window]
            # reject a shape that would hide more than MAX_OCCLUSION of an earlier one
            hidden = np.bincount(own[mask & (own >= 0)], minlength=len(objects))
            if np.any(visible - hidden < (1 - MAX_OCCLUSION) * areas):
                continue
            # colour: far enough from the local background that the shape is always visible
            pixels = canvas[window]
            local = pixels[mask].mean(axis=0)
            for _c in range(10):
                colour = rng.integers(0, 256, size=3).astype(np.float32)
                if np.abs(colour - local).sum() > 120:
                    break
            pixels[mask] = colour
            own[mask] = len(objects)
            area = int(mask.sum())
            visible = np.append(visible - hidden, area)
            areas = np.append(areas, area)
            # the box of the full shape (as drawn), in pixel-edge coordinates
            cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
            x0, y0 = wx + int(cols[0]), wy + int(rows[0])
            bbox = [float(x0), float(y0), float(wx + cols[-1] + 1 - x0), float(wy + rows[-1] + 1 - y0)]
            objects.append((label, bbox, float(area)))
            break
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    np.clip(canvas, 0, 255, out=canvas)
    return Image.fromarray(canvas.astype(np.uint8)), objects


def generate_shapes(
    root: PathLike,
    split: str,
    num_images: int,
    image_size: tuple[int, int] = (256, 384),
    seed: int = 0,
    num_classes: int = 4,
) -> Path:
    """Generate one split of the shapes dataset into ``root`` in the COCO layout.

    Writes ``root/{split}/{image_id:06d}.jpg`` and ``root/annotations/instances_{split}.json``. The result depends
    only on the arguments: the same ``seed`` gives identical files, and each split draws from its own stream.
    The annotation file is written last (atomically), so its presence means the split is complete.

    Args:
        root: Dataset folder (created if missing).
        split: Split name, e.g. ``"train"``.
        num_images: Number of images; about 10% of them have no objects.
        image_size: ``(min, max)`` side length in pixels; width and height are drawn independently.
        seed: Random seed.
        num_classes: Number of shape classes, the first ``num_classes`` of :data:`SHAPE_NAMES`.

    Returns:
        The path of the annotation json.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> import tempfile
        >>> ann = generate_shapes(tempfile.mkdtemp(), "val", num_images=2, seed=1)
        >>> ann.name
        'instances_val.json'
    """
    image_size = tuple(image_size)  # type: ignore[assignment]
    _check_args(num_images, image_size, num_classes)
    root = Path(root)
    names = SHAPE_NAMES[:num_classes]
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode())]))
    empty = set(rng.permutation(num_images)[: round(_EMPTY_FRACTION * num_images)].tolist())
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        w, h = (int(s) for s in rng.integers(image_size[0], image_size[1] + 1, size=2))
        num_objects = 0 if index in empty else int(rng.integers(1, _MAX_OBJECTS + 1))
        image, objects = _render_image(rng, (w, h), num_objects, names)
        file_name = f"{image_id:06d}.jpg"
        image.save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for label, bbox, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(names)]
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ann_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    os.replace(tmp, ann_file)
    return ann_file


def shapes_root(
    num_train: int = 1000,
    num_val: int = 200,
    seed: int = 0,
    image_size: tuple[int, int] = (256, 384),
    num_classes: int = 4,
    cache_root: PathLike | None = None,
) -> Path:
    """Return the folder of a shapes dataset with ``train`` and ``val`` splits, generating it if needed.

    The folder is ``cache_root/shapes-{hash}`` where the hash covers every generation parameter, so changing one
    gives a new dataset and an existing one is reused as is. Generation happens in a temporary folder renamed into
    place at the end, so an interrupted run never leaves a partial dataset behind.

    Args:
        num_train: Number of training images.
        num_val: Number of validation images.
        seed: Random seed (the val split uses a different stream than train).
        image_size: ``(min, max)`` image side in pixels.
        num_classes: Number of shape classes.
        cache_root: Parent folder; defaults to :func:`default_cache_root`.

    Returns:
        The dataset folder, with ``train/``, ``val/`` and ``annotations/instances_{train,val}.json``.

    Raises:
        ValueError: If an argument is out of range.
    """
    image_size = tuple(image_size)  # type: ignore[assignment]
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected argument `{name}` to be a positive int but got {value!r}.")
    _check_args(num_train, image_size, num_classes)
    params: dict[str, Any] = {
        "version": _GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "image_size": list(image_size),
        "num_classes": num_classes,
    }
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = cache_root / f"shapes-{digest}"
    if (final / "meta.json").is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".shapes-{digest}-", dir=cache_root))
    try:
        generate_shapes(tmp, "train", num_train, image_size, seed, num_classes)
        generate_shapes(tmp, "val", num_val, image_size, seed, num_classes)
        (tmp / "meta.json").write_text(json.dumps(params, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:
            # another process finished the same dataset first; theirs is identical
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
