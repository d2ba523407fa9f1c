import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_prune.data.convert import coco_to_yolo
from lightning_prune.data.datasets import CocoDetection, YoloDetection, read_class_names
from lightning_prune.data.shapes import generate_shapes


def _write_coco(tmp_path: Path, annotations: list, sizes=((40, 60), (30, 50), (20, 20)), categories=None) -> Path:
    """Write images of the given (h, w) sizes and a COCO json; return the json path."""
    (tmp_path / "img").mkdir(exist_ok=True)
    images = []
    for i, (h, w) in enumerate(sizes, start=1):
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(tmp_path / "img" / f"{i:04d}.png")
        images.append({"id": i, "file_name": f"{i:04d}.png", "height": h, "width": w})
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file


def _ann(image_id, bbox, category_id=3, iscrowd=0, ann_id=None):
    return {
        "id": ann_id or image_id,
        "image_id": image_id,
        "bbox": bbox,
        "category_id": category_id,
        "iscrowd": iscrowd,
    }


def test_coco_reader(tmp_path):
    anns = [
        _ann(1, [10, 5, 20, 10], 7, ann_id=1),
        _ann(1, [0, 0, 60, 40], 3, ann_id=2),
        _ann(1, [1, 1, 5, 5], 3, iscrowd=1, ann_id=3),
        _ann(2, [49.5, 29.5, 1.2, 1.0], 3, ann_id=4),  # sticks out by 0.7 px: clipped
    ]
    ds = CocoDetection(tmp_path / "img", _write_coco(tmp_path, anns))
    assert ds.class_names == ["cat", "dog"]
    assert ds.category_ids == [3, 7]
    assert len(ds) == 3
    image, target = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8
    assert target["boxes"].dtype == torch.float32
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([[10.0, 5, 30, 15], [0, 0, 60, 40]])
    )
    assert target["labels"].tolist() == [1, 0]  # category 7 -> label 1, iscrowd skipped
    assert target["image_id"].item() == 1 and target["image_id"].dtype == torch.int64
    assert target["orig_size"].tolist() == [40, 60]
    _, target = ds[1]
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[49.5, 29.5, 50.0, 30.0]]))
    _, target = ds[2]  # no objects is valid
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_coco_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Expected a COCO annotation file at .*nope\.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"Expected .*bad\.json to be a valid COCO json but it could not be parsed"),
        ("{not json", r"bad\.json to be a valid COCO json"),
        ('{"annotations": []}', r"Expected .*bad\.json to be a COCO json with an `images` key"),
        ('{"images": [], "categories": [{"id": 1, "name": "a"}]}', r"Expected at least one image in .*bad\.json"),
        (
            '{"images": [{"id": 1, "file_name": "a.png", "height": 2, "width": 2}]}',
            r"bad\.json to list its `categories`",
        ),
    ],
)
def test_coco_corrupt_json(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        CocoDetection(tmp_path, tmp_path / "bad.json")


def test_coco_missing_images(tmp_path):
    ann_file = _write_coco(tmp_path, [])
    (tmp_path / "img" / "0002.png").unlink()
    (tmp_path / "img" / "0003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 3 are missing, e\.g\. .*0002\.png, .*0003\.png"):
        CocoDetection(tmp_path / "img", ann_file)


def test_coco_missing_image_folder(tmp_path):
    ann_file = _write_coco(tmp_path, [])
    with pytest.raises(FileNotFoundError, match=r"Expected an image folder at .*other"):
        CocoDetection(tmp_path / "other", ann_file)


@pytest.mark.parametrize(
    ("bbox", "match"),
    [
        (
            [50, 10, 12, 5],
            r"Expected boxes inside the 60x40 \(w x h\) image but got xyxy box \[50.0, 10.0, 62.0, 15.0\]",
        ),
        ([-2, 10, 5, 5], r"inside the 60x40 .* image .*0001\.png"),
        ([10, 10, 0, 5], r"Expected boxes with positive width and height but got xyxy box \[10.0, 10.0, 10.0, 15.0\]"),
        ([10, 10, 5, -1], r"positive width and height .*image id 1"),
    ],
)
def test_coco_bad_boxes(tmp_path, bbox, match):
    ann_file = _write_coco(tmp_path, [_ann(1, bbox)])
    with pytest.raises(ValueError, match=match):
        CocoDetection(tmp_path / "img", ann_file)


def test_coco_bad_references(tmp_path):
    ann_file = _write_coco(tmp_path, [_ann(1, [1, 1, 2, 2], category_id=5)])
    with pytest.raises(ValueError, match=r"Expected `category_id` to be one of \[3, 7\] but got 5"):
        CocoDetection(tmp_path / "img", ann_file)
    ann_file = _write_coco(tmp_path, [_ann(9, [1, 1, 2, 2])])
    with pytest.raises(ValueError, match=r"annotation 9 refers to image id 9"):
        CocoDetection(tmp_path / "img", ann_file)


def test_coco_bad_image_entry(tmp_path):
    (tmp_path / "a.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "categories": [{"id": 1, "name": "a"}]})
    )
    with pytest.raises(ValueError, match=r"Expected image entries with `file_name`, `height` and `width` but got"):
        CocoDetection(tmp_path, tmp_path / "a.json")
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x.png", "height": 0, "width": 3}],
                "categories": [{"id": 1, "name": "a"}],
            }
        )
    )
    with pytest.raises(ValueError, match=r"Expected a positive image size but got 0x3 \(h x w\) in .*a\.json"):
        CocoDetection(tmp_path, tmp_path / "a.json")


def test_coco_image_size_mismatch(tmp_path):
    ann_file = _write_coco(tmp_path, [])
    Image.new("RGB", (7, 7)).save(tmp_path / "img" / "0001.png")
    ds = CocoDetection(tmp_path / "img", ann_file)
    with pytest.raises(ValueError, match=r"Expected image .*0001\.png to be 40x60 \(h x w\) as annotated but got 7x7"):
        ds[0]


def _write_yolo(root: Path, lines: dict, classes=("a", "b")) -> None:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for stem, text in lines.items():
        Image.new("RGB", (100, 50)).save(root / "images" / "train" / f"{stem}.jpg")
        if text is not None:
            (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_yolo_reader(tmp_path):
    _write_yolo(tmp_path, {"7": "1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.2 0.2\n", "3": None, "5": ""})
    ds = YoloDetection(tmp_path, "train")
    assert ds.class_names == ["a", "b"]
    assert [r.image_id for r in ds.records] == [3, 5, 7]
    _, target = ds[2]
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([[40.0, 15.0, 60.0, 35.0], [0.0, 0.0, 20.0, 10.0]])
    )
    assert target["labels"].tolist() == [1, 0]
    assert target["orig_size"].tolist() == [50, 100]
    assert ds[0][1]["boxes"].shape == (0, 4)
    assert YoloDetection(tmp_path, "train", class_names=["x", "y", "z"]).class_names == ["x", "y", "z"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n", r"Expected a class index in \[0, 2\) but got 2 in .*1\.txt:2"),
        ("-1 0.5 0.5 0.2 0.2\n", r"class index in \[0, 2\) but got -1 in .*1\.txt:1"),
        ("0 0.5 0.5 0.2\n", r"Expected a line `class cx cy w h` but got '0 0.5 0.5 0.2' in .*1\.txt:1"),
        ("0 0.5 abc 0.2 0.2\n", r"Expected a line `class cx cy w h` .*1\.txt:1"),
        ("0 0.95 0.5 0.2 0.2\n", r"Expected boxes inside the 100x50 \(w x h\) image .*1\.txt:1"),
        ("0 0.5 0.5 0.0 0.2\n", r"Expected boxes with positive width and height .*1\.txt:1"),
    ],
)
def test_yolo_bad_labels(tmp_path, text, match):
    _write_yolo(tmp_path, {"1": text})
    with pytest.raises(ValueError, match=match):
        YoloDetection(tmp_path, "train")


def test_yolo_bad_layout(tmp_path):
    _write_yolo(tmp_path, {}, classes=None)
    with pytest.raises(FileNotFoundError, match=r"Expected a class names file at .*classes\.txt"):
        YoloDetection(tmp_path, "train")
    (tmp_path / "classes.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"Expected at least one class name in .*classes\.txt"):
        read_class_names(tmp_path / "classes.txt")
    with pytest.raises(ValueError, match=r"Expected images \(.*\) in .*images/train but the folder has none"):
        YoloDetection(tmp_path, "train", class_names=["a"])
    with pytest.raises(FileNotFoundError, match=r"Expected an image folder at .*images/val"):
        YoloDetection(tmp_path, "val", class_names=["a"])


def test_coco_to_yolo_round_trip(tmp_path):
    ann = generate_shapes(tmp_path / "coco", "val", 8, (64, 96), seed=2)
    out = coco_to_yolo(tmp_path / "coco" / "val", ann, tmp_path / "yolo", split="val")
    coco, yolo = CocoDetection(tmp_path / "coco" / "val", ann), YoloDetection(out, "val")
    assert yolo.class_names == coco.class_names
    assert (out / "images" / "val" / "000001.jpg").is_symlink()
    assert len(yolo) == len(coco) == 8
    for (img_c, tgt_c), (img_y, tgt_y) in zip(coco, yolo):
        assert torch.equal(img_c, img_y)
        assert tgt_c["image_id"] == tgt_y["image_id"]
        assert torch.equal(tgt_c["labels"], tgt_y["labels"])
        np.testing.assert_allclose(tgt_c["boxes"].numpy(), tgt_y["boxes"].numpy(), atol=1e-3)
        assert torch.equal(tgt_c["orig_size"], tgt_y["orig_size"])
    assert sum(len(r.labels) for r in yolo.records) > 0


def test_coco_to_yolo_copy_and_class_mismatch(tmp_path):
    ann = generate_shapes(tmp_path / "coco", "val", 2, (64, 96), seed=2)
    out = coco_to_yolo(tmp_path / "coco" / "val", ann, tmp_path / "yolo", split="val", copy=True)
    assert not (out / "images" / "val" / "000001.jpg").is_symlink()
    assert (out / "classes.txt").read_text().split() == ["circle", "rectangle", "triangle", "cross"]
    (out / "classes.txt").write_text("x\n")
    with pytest.raises(ValueError, match=r"Expected .*classes\.txt to list the classes of .* but it lists \['x'\]"):
        coco_to_yolo(tmp_path / "coco" / "val", ann, out, split="val")
