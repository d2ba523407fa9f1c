import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_prune.data import shapes as shapes_mod
from lightning_prune.data.shapes import SHAPE_NAMES, generate_shapes, shapes_root

SMALL = (96, 128)


def _load(ann: Path) -> dict:
    return json.loads(ann.read_text())


def test_generate_is_deterministic_by_seed(tmp_path):
    a = generate_shapes(tmp_path / "a", "train", 6, SMALL, seed=3)
    b = generate_shapes(tmp_path / "b", "train", 6, SMALL, seed=3)
    c = generate_shapes(tmp_path / "c", "train", 6, SMALL, seed=4)
    assert a.read_text() == b.read_text()
    for img in _load(a)["images"]:
        assert (tmp_path / "a" / "train" / img["file_name"]).read_bytes() == (
            tmp_path / "b" / "train" / img["file_name"]
        ).read_bytes()
    assert a.read_text() != c.read_text()
    pixels_a = np.asarray(Image.open(tmp_path / "a" / "train" / "000001.jpg"))
    pixels_c = np.asarray(Image.open(tmp_path / "c" / "train" / "000001.jpg"))
    assert pixels_a.shape != pixels_c.shape or not np.array_equal(pixels_a, pixels_c)


def test_splits_differ(tmp_path):
    train = _load(generate_shapes(tmp_path, "train", 5, SMALL, seed=0))
    val = _load(generate_shapes(tmp_path, "val", 5, SMALL, seed=0))
    assert train["annotations"] != val["annotations"]


def test_dataset_statistics(tmp_path):
    n = 60
    data = _load(generate_shapes(tmp_path, "train", n, (128, 192), seed=0))
    images = {img["id"]: img for img in data["images"]}
    assert [c["name"] for c in data["categories"]] == list(SHAPE_NAMES[:4])
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=n + 1)[1:]
    assert (counts == 0).sum() == round(0.1 * n)
    assert counts.max() <= 6
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4}
    fractions = []
    for ann in data["annotations"]:
        img = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= img["width"] and y + h <= img["height"]
        fractions.append(max(w, h) / min(img["width"], img["height"]))
    assert min(fractions) < 0.06
    assert max(fractions) > 0.4
    assert 0.12 < float(np.median(fractions)) < 0.35  # mostly mid-size
    sizes = {(img["width"], img["height"]) for img in data["images"]}
    assert len(sizes) > 1 and any(w != h for w, h in sizes)


def test_num_classes(tmp_path):
    data = _load(generate_shapes(tmp_path, "train", 30, SMALL, seed=0, num_classes=6))
    assert [c["name"] for c in data["categories"]] == list(SHAPE_NAMES)
    assert max(a["category_id"] for a in data["annotations"]) == 6


def test_shapes_root_generates_once(tmp_path, monkeypatch):
    calls = []
    original = shapes_mod.generate_shapes

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(shapes_mod, "generate_shapes", counting)
    root = shapes_root(num_train=3, num_val=2, image_size=SMALL, cache_root=tmp_path)
    assert calls == ["train", "val"]
    mtime = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    again = shapes_root(num_train=3, num_val=2, image_size=SMALL, cache_root=tmp_path)
    assert again == root
    assert calls == ["train", "val"]
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == mtime
    assert len(list((root / "train").iterdir())) == 3
    assert len(list((root / "val").iterdir())) == 2
    other = shapes_root(num_train=3, num_val=2, image_size=SMALL, seed=1, cache_root=tmp_path)
    assert other != root
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([root.name, other.name])


def test_shapes_root_env_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path / "cache"))
    root = shapes_root(num_train=2, num_val=1, image_size=SMALL)
    assert root.parent == tmp_path / "cache"


def test_shapes_root_interrupted_leaves_nothing(tmp_path, monkeypatch):
    original = shapes_mod.generate_shapes

    def failing(root, split, *args, **kwargs):
        if split == "val":
            raise KeyboardInterrupt
        return original(root, split, *args, **kwargs)

    monkeypatch.setattr(shapes_mod, "generate_shapes", failing)
    with pytest.raises(KeyboardInterrupt):
        shapes_root(num_train=2, num_val=1, image_size=SMALL, cache_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, r"Expected argument `num_classes` to be an int in \[1, 6\] but got 0"),
        ({"num_classes": 7}, r"`num_classes` .* but got 7"),
        ({"image_size": (128, 64)}, r"Expected argument `image_size` to be a pair of ints .* but got \(128, 64\)"),
        ({"num_images": -1}, r"Expected argument `num_images` to be a non-negative int but got -1"),
    ],
)
def test_generate_bad_args(tmp_path, kwargs, match):
    args = {"root": tmp_path, "split": "train", "num_images": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_shapes(**args)


def test_shapes_root_bad_args(tmp_path):
    with pytest.raises(ValueError, match="Expected argument `num_val` to be a positive int but got 0"):
        shapes_root(num_train=1, num_val=0, cache_root=tmp_path)
