"""Convert a COCO detection dataset to the YOLO-txt layout.

Example:
    >>> import tempfile
    >>> from lightning_prune.data.shapes import generate_shapes
    >>> src = tempfile.mkdtemp()
    >>> ann = generate_shapes(src, "val", num_images=2)
    >>> out = coco_to_yolo(f"{src}/val", ann, tempfile.mkdtemp(), split="val")
    >>> sorted(p.name for p in out.iterdir())
    ['classes.txt', 'images', 'labels']
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Union

from lightning_prune.data.datasets import CocoDetection

__all__ = ["coco_to_yolo"]

PathLike = Union[str, "os.PathLike[str]"]


def coco_to_yolo(
    images_dir: PathLike, ann_file: PathLike, out_root: PathLike, split: str = "train", copy: bool = False
) -> Path:
    """Write ``out_root/images/{split}``, ``out_root/labels/{split}/*.txt`` and ``out_root/classes.txt``.

    The COCO data is read (and validated) with :class:`~lightning_prune.data.datasets.CocoDetection`: category
    ids become contiguous class indices in increasing id order and ``iscrowd`` annotations are dropped. Each label
    line is ``class cx cy w h`` normalized to [0, 1] with 6 decimals; images without objects get an empty file.

    Args:
        images_dir: COCO image folder.
        ann_file: COCO instances json.
        out_root: Output root; several splits may share it if they have the same classes.
        split: Split name for the output folders.
        copy: Copy images instead of symlinking them.

    Returns:
        ``out_root``.

    Raises:
        ValueError: If ``out_root/classes.txt`` exists with other classes, or two images share a file stem.
    """
    dataset = CocoDetection(images_dir, ann_file)
    out_root = Path(out_root)
    classes_file = out_root / "classes.txt"
    classes_text = "".join(f"{name}\n" for name in dataset.class_names)
    if classes_file.is_file() and classes_file.read_text() != classes_text:
        raise ValueError(
            f"Expected {classes_file} to list the classes of {ann_file} ({dataset.class_names}) but it lists"
            f" {classes_file.read_text().split()}. HINT: convert datasets with different classes to different roots."
        )
    image_out, label_out = out_root / "images" / split, out_root / "labels" / split
    image_out.mkdir(parents=True, exist_ok=True)
    label_out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Path] = {}
    for rec in dataset.records:
        if rec.path.stem in seen:
            raise ValueError(
                f"Expected unique image file stems but got {seen[rec.path.stem]} and {rec.path} in {ann_file}."
            )
        seen[rec.path.stem] = rec.path
        dst = image_out / rec.path.name
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if copy:
            shutil.copy2(rec.path, dst)
        else:
            os.symlink(rec.path.resolve(), dst)
        lines = []
        for (x0, y0, x1, y1), label in zip(rec.boxes.tolist(), rec.labels.tolist()):
            cx, cy = (x0 + x1) / 2 / rec.width, (y0 + y1) / 2 / rec.height
            w, h = (x1 - x0) / rec.width, (y1 - y0) / rec.height
            lines.append(f"{label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
        (label_out / f"{rec.path.stem}.txt").write_text("".join(lines))
    classes_file.write_text(classes_text)
    return out_root
