"""Detection dataset readers: COCO json (through pycocotools) and YOLO txt.

Both readers parse and validate *all* annotations at construction, so a broken dataset fails before training
starts, and both return the same sample: ``(image, target)`` with ``image`` a uint8
:class:`~torchvision.tv_tensors.Image` (3, H, W) and ``target`` a dict with

- ``boxes``: :class:`~torchvision.tv_tensors.BoundingBoxes` float32 (N, 4), xyxy pixels of the original image;
- ``labels``: int64 (N,), contiguous class indices;
- ``image_id``: int64 scalar;
- ``orig_size``: int64 (2,) = (h, w).

Example:
    >>> import tempfile
    >>> from lightning_prune.data.shapes import generate_shapes
    >>> root = tempfile.mkdtemp()
    >>> ann = generate_shapes(root, "val", num_images=3)
    >>> ds = CocoDetection(f"{root}/val", ann)
    >>> image, target = ds[0]
    >>> ds.class_names, image.dtype, target["boxes"].shape[1]
    (['circle', 'rectangle', 'triangle', 'cross'], torch.uint8, 4)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

__all__ = ["CocoDetection", "DetectionDataset", "YoloDetection", "read_class_names"]

PathLike = Union[str, "os.PathLike[str]"]
Sample = tuple[tv_tensors.Image, dict[str, Any]]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Boxes may stick out of the image by up to this many pixels (rounding in annotation tools); they are clipped.
BOX_TOLERANCE = 1.0


@dataclass
class _Record:
    path: Path
    image_id: int
    height: int
    width: int
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    labels: np.ndarray  # (N,) int64


def _check_box(box: np.ndarray, width: int, height: int, where: str) -> np.ndarray:
    """Validate one xyxy box against its image; clip it if it sticks out by less than the tolerance."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(
            f"Expected boxes with positive width and height but got xyxy box {[x0, y0, x1, y1]} in {where}."
        )
    tol = BOX_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise ValueError(
            f"Expected boxes inside the {width}x{height} (w x h) image but got xyxy box {[x0, y0, x1, y1]} in {where}."
        )
    return np.clip(box, 0, [width, height, width, height]).astype(np.float32)


def _check_files_exist(paths: Sequence[Path], source: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise FileNotFoundError(
            f"Expected every image listed in {source} to exist but {len(missing)} of {len(paths)} are missing,"
            f" e.g. {shown}."
        )


def read_class_names(path: PathLike) -> list[str]:
    """Read class names, one per line (blank lines ignored), e.g. a YOLO ``classes.txt``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it lists no names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected a class names file at {path} but it does not exist.")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"Expected at least one class name in {path} but the file is empty.")
    return names


class DetectionDataset(Dataset):
    """A list of validated image records; the readers below only differ in how they build it.

    Args:
        records: One entry per image.
        class_names: Class names in label order.
        transforms: Optional callable ``(image, target) -> (image, target)`` applied to each sample.
    """

    def __init__(
        self,
        records: list[_Record],
        class_names: list[str],
        transforms: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.records = records
        self.class_names = list(class_names)
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Sample:
        """Return sample ``index`` without transforms."""
        rec = self.records[index]
        with Image.open(rec.path) as pil:
            image = tv_tensors.Image(F.pil_to_tensor(pil.convert("RGB")))
        if tuple(image.shape[-2:]) != (rec.height, rec.width):
            raise ValueError(
                f"Expected image {rec.path} to be {rec.height}x{rec.width} (h x w) as annotated but got"
                f" {image.shape[-2]}x{image.shape[-1]}."
            )
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(rec.boxes).reshape(-1, 4), format="XYXY", canvas_size=(rec.height, rec.width)
            ),
            "labels": torch.from_numpy(rec.labels).long(),
            "image_id": torch.tensor(rec.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([rec.height, rec.width], dtype=torch.int64),
        }
        return image, target

    def __getitem__(self, index: int) -> Any:
        image, target = self.load(index)
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target


class CocoDetection(DetectionDataset):
    """Images in a folder with a COCO ``instances`` json, read through pycocotools.

    Category ids are mapped to contiguous labels in increasing id order (``category_ids[label]`` is the COCO id);
    ``iscrowd`` annotations are skipped; images without annotations are kept.

    Args:
        images_dir: Folder the json's ``file_name`` entries are relative to.
        ann_file: COCO instances json.
        transforms: Optional callable ``(image, target) -> (image, target)``.

    Raises:
        FileNotFoundError: If the json, the folder or any listed image is missing.
        ValueError: If the json is not valid COCO, lists no images, or has an invalid box.
    """

    def __init__(
        self, images_dir: PathLike, ann_file: PathLike, transforms: Callable[[Any, Any], Any] | None = None
    ) -> None:
        from pycocotools.coco import COCO

        images_dir, ann_file = Path(images_dir), Path(ann_file)
        data = _load_coco_json(ann_file, images_dir)
        if not images_dir.is_dir():
            raise FileNotFoundError(f"Expected an image folder at {images_dir} for {ann_file} but it does not exist.")
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        self.coco = coco
        self.category_ids: list[int] = sorted(coco.cats)
        id_to_label = {cat_id: label for label, cat_id in enumerate(self.category_ids)}
        records = []
        for image_id in coco.getImgIds():
            info = coco.imgs[image_id]
            where = f"{ann_file} (image id {image_id}, {info.get('file_name')})"
            if not all(key in info for key in ("file_name", "height", "width")):
                raise ValueError(
                    f"Expected image entries with `file_name`, `height` and `width` but got {info} in {where}."
                )
            height, width = int(info["height"]), int(info["width"])
            if height <= 0 or width <= 0:
                raise ValueError(f"Expected a positive image size but got {height}x{width} (h x w) in {where}.")
            boxes, labels = [], []
            for ann in coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    continue
                if ann["category_id"] not in id_to_label:
                    raise ValueError(
                        f"Expected `category_id` to be one of {self.category_ids} but got {ann['category_id']}"
                        f" in {where}."
                    )
                x, y, w, h = (float(v) for v in ann["bbox"])
                boxes.append(_check_box(np.array([x, y, x + w, y + h]), width, height, where))
                labels.append(id_to_label[ann["category_id"]])
            records.append(
                _Record(
                    path=images_dir / info["file_name"],
                    image_id=int(image_id),
                    height=height,
                    width=width,
                    boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, dtype=np.int64),
                )
            )
        _check_files_exist([r.path for r in records], str(ann_file))
        names = [str(coco.cats[i]["name"]) for i in self.category_ids]
        super().__init__(records, names, transforms)


def _load_coco_json(ann_file: Path, images_dir: Path) -> dict[str, Any]:
    if not ann_file.is_file():
        raise FileNotFoundError(f"Expected a COCO annotation file at {ann_file} but it does not exist.")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Expected {ann_file} to be a valid COCO json but it could not be parsed: {err}") from err
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"Expected {ann_file} to be a COCO json with an `images` key but it has none.")
    if not data["images"]:
        raise ValueError(f"Expected at least one image in {ann_file} for {images_dir} but got an empty dataset.")
    if not data.get("categories"):
        raise ValueError(f"Expected {ann_file} to list its `categories` but it has none.")
    data.setdefault("annotations", [])
    known = {img["id"] for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("image_id") not in known:
            raise ValueError(
                f"Expected every annotation to refer to a listed image but annotation {ann.get('id')} refers to"
                f" image id {ann.get('image_id')!r} in {ann_file}."
            )
    return data


class YoloDetection(DetectionDataset):
    """A YOLO-txt dataset: ``root/images/{split}/*.jpg|png`` and ``root/labels/{split}/*.txt``.

    Each label line is ``class cx cy w h`` normalized to [0, 1]; an image without a label file has no objects.
    ``image_id`` is the file stem when every stem is an integer (as for COCO exports), else the sorted index.

    Args:
        root: Dataset root.
        split: Split folder name.
        class_names: Class names; read from ``root/classes.txt`` when omitted.
        transforms: Optional callable ``(image, target) -> (image, target)``.

    Raises:
        FileNotFoundError: If the image folder or the class names file is missing.
        ValueError: If there are no images, or a label line is malformed, out of range or has an invalid box.
    """

    def __init__(
        self,
        root: PathLike,
        split: str,
        class_names: Sequence[str] | None = None,
        transforms: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        root = Path(root)
        names = list(class_names) if class_names is not None else read_class_names(root / "classes.txt")
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Expected an image folder at {image_dir} but it does not exist.")
        paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise ValueError(f"Expected images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir} but the folder has none.")
        numeric = all(p.stem.isdigit() for p in paths) and len({int(p.stem) for p in paths}) == len(paths)
        records = []
        for index, path in enumerate(paths):
            with Image.open(path) as pil:  # reads the header only
                width, height = pil.size
            label_file = label_dir / f"{path.stem}.txt"
            boxes, labels = _read_yolo_labels(label_file, width, height, len(names))
            records.append(_Record(path, int(path.stem) if numeric else index, height, width, boxes, labels))
        super().__init__(records, names, transforms)


def _read_yolo_labels(label_file: Path, width: int, height: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    boxes, labels = [], []
    if label_file.is_file():
        for lineno, line in enumerate(label_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{label_file}:{lineno}"
            fields = line.split()
            try:
                if len(fields) != 5:
                    raise ValueError
                cls_f, cx, cy, w, h = (float(v) for v in fields)
            except ValueError:
                raise ValueError(f"Expected a line `class cx cy w h` but got {line.strip()!r} in {where}.") from None
            if not cls_f.is_integer() or not 0 <= cls_f < num_classes:
                raise ValueError(
                    f"Expected a class index in [0, {num_classes}) but got {fields[0]} in {where}."
                    " HINT: check `class_names` / classes.txt."
                )
            box = np.array([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
            boxes.append(_check_box(box, width, height, where))
            labels.append(int(cls_f))
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)
