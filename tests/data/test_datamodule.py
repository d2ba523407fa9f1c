import json

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune.data import DetectionDataModule, coco_to_yolo, generate_shapes
from lightning_prune.data.transforms import detection_transforms

TINY = {"num_train": 6, "num_val": 4, "img_size": 64, "batch_size": 3, "num_workers": 0}


@pytest.fixture
def coco_root(tmp_path):
    """A tiny COCO-layout dataset with `train` and `val` splits."""
    root = tmp_path / "coco"
    generate_shapes(root, "train", 6, (48, 80), seed=0)
    generate_shapes(root, "val", 5, (48, 80), seed=0)
    return root


def _check_batch(images, targets, batch_size, size, num_classes):
    assert images.shape == (batch_size, 3, size, size) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert isinstance(targets, list) and len(targets) == batch_size
    for t in targets:
        assert set(t) == {"boxes", "labels", "image_id", "orig_size", "letterbox"}
        assert type(t["boxes"]) is torch.Tensor
        assert t["boxes"].dtype == torch.float32 and t["boxes"].ndim == 2 and t["boxes"].shape[1] == 4
        assert t["labels"].dtype == torch.int64 and t["labels"].shape == (t["boxes"].shape[0],)
        assert ((t["labels"] >= 0) & (t["labels"] < num_classes)).all()
        assert t["image_id"].dtype == torch.int64 and t["image_id"].shape == ()
        assert t["orig_size"].dtype == torch.int64 and t["orig_size"].shape == (2,)
        assert t["letterbox"].dtype == torch.float32 and t["letterbox"].shape == (3,)
        assert (t["boxes"] >= 0).all() and (t["boxes"] <= size + 1e-3).all()


def test_shapes_batches_follow_contract(tmp_path):
    dm = DetectionDataModule(root=str(tmp_path), mosaic=0.5, **TINY)
    assert dm.num_classes == 4  # before setup and before any data exists
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == ["circle", "rectangle", "triangle", "cross"]
    torch.manual_seed(0)
    for images, targets in dm.train_dataloader():
        _check_batch(images, targets, len(targets), 64, 4)
    val_batches = list(dm.val_dataloader())
    assert [len(t) for _, t in val_batches] == [3, 1]  # drop_last=False
    images, targets = val_batches[0]
    _check_batch(images, targets, 3, 64, 4)
    # validation targets map back exactly to the original annotations
    for target, index in zip(targets, range(3)):
        _, raw = dm.val_dataset.load(index)
        scale, pad_x, pad_y = target["letterbox"]
        back = (target["boxes"] - torch.stack([pad_x, pad_y, pad_x, pad_y])) / scale
        torch.testing.assert_close(back, raw["boxes"].as_subclass(torch.Tensor), atol=1e-4, rtol=0)
        assert torch.equal(target["orig_size"], raw["orig_size"])
    # deterministic validation
    again = next(iter(dm.val_dataloader()))
    assert torch.equal(again[0], images)
    assert [len(t) for _, t in [next(iter(dm.test_dataloader())), next(iter(dm.predict_dataloader()))]] == [3, 3]


def test_coco_and_yolo_load_identical_targets(coco_root, tmp_path):
    for split in ("train", "val"):
        coco_to_yolo(coco_root / split, coco_root / "annotations" / f"instances_{split}.json", tmp_path / "yolo", split)
    kwargs = {**TINY, "augment": False}
    coco = DetectionDataModule("coco", str(coco_root), **kwargs)
    yolo = DetectionDataModule("yolo", str(tmp_path / "yolo"), **kwargs)
    assert yolo.num_classes == coco.num_classes == 4
    coco.setup("fit")
    yolo.setup("fit")
    loaders = [(coco.val_dataloader(), yolo.val_dataloader()), (coco.train_dataloader(), yolo.train_dataloader())]
    for loader_c, loader_y in loaders:  # augment=False: the train loaders only letterbox (but shuffle)
        targets_c = {int(t["image_id"]): t for _, batch in loader_c for t in batch}
        targets_y = {int(t["image_id"]): t for _, batch in loader_y for t in batch}
        assert sorted(targets_c) == sorted(targets_y) and len(targets_c) == len(loader_c.dataset)
        for image_id, target in targets_c.items():
            other = targets_y[image_id]
            assert torch.equal(target["labels"], other["labels"])
            torch.testing.assert_close(target["boxes"], other["boxes"], atol=1e-3, rtol=0)
            assert torch.equal(target["orig_size"], other["orig_size"])
            torch.testing.assert_close(target["letterbox"], other["letterbox"])
        assert sum(len(t["labels"]) for t in targets_y.values()) > 0
    torch.testing.assert_close(next(iter(coco.val_dataloader()))[0], next(iter(yolo.val_dataloader()))[0])


def test_num_classes_before_setup_for_coco(coco_root):
    dm = DetectionDataModule("coco", str(coco_root), class_names=["a", "b", "c", "d"], **TINY)
    assert dm.num_classes == 4 and dm.class_names == ["a", "b", "c", "d"]
    dm.setup("validate")
    assert dm.train_dataset is None and dm.class_names == ["a", "b", "c", "d"]


def test_num_classes_mismatch(coco_root, tmp_path):
    dm = DetectionDataModule("coco", str(coco_root), num_classes=80, **TINY)
    with pytest.raises(ValueError, match=r"Expected argument `num_classes` \(80\) to match the 4 classes"):
        _ = dm.num_classes
    with pytest.raises(ValueError, match=r"`num_classes` \(80\) to match the 4 classes"):
        dm.setup("fit")
    dm = DetectionDataModule("coco", str(coco_root), class_names=["a"], **TINY)
    with pytest.raises(ValueError, match="Expected argument `class_names` to have 4 entries like the data but got 1"):
        dm.setup("fit")
    assert DetectionDataModule(root=str(tmp_path), num_classes=3, **TINY).class_names == [
        "circle",
        "rectangle",
        "triangle",
    ]


def test_train_val_class_mismatch(coco_root):
    ann = coco_root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["categories"][0]["name"] = "blob"
    ann.write_text(json.dumps(data))
    dm = DetectionDataModule("coco", str(coco_root), **TINY)
    with pytest.raises(ValueError, match=r"Expected the same classes in splits `train` and `val` but got \['blob'"):
        dm.setup("fit")


def test_data_errors_surface_in_setup(coco_root):
    (coco_root / "annotations" / "instances_train.json").write_text("")
    dm = DetectionDataModule("coco", str(coco_root), **TINY)
    with pytest.raises(ValueError, match=r"instances_train\.json to be a valid COCO json"):
        dm.setup("fit")
    dm = DetectionDataModule("coco", str(coco_root), val_split="test", **TINY)
    with pytest.raises(FileNotFoundError, match=r"annotation file at .*instances_test\.json"):
        dm.setup("validate")


def test_loader_options(tmp_path):
    dm = DetectionDataModule(root=str(tmp_path), **{**TINY, "num_workers": 1})
    loader = dm.train_dataloader()  # sets up on demand
    assert loader.persistent_workers and loader.num_workers == 1 and not loader.drop_last
    assert DetectionDataModule(root=str(tmp_path), **TINY).val_dataloader().persistent_workers is False


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"format": "voc"},
            ValueError,
            r"Expected argument `format` to be one of \['shapes', 'coco', 'yolo'\] but got 'voc'",
        ),
        ({"img_size": 100}, ValueError, "Expected argument `img_size` to be a positive multiple of 32 but got 100"),
        ({"img_size": 0}, ValueError, "`img_size` to be a positive multiple of 32 but got 0"),
        ({"batch_size": 0}, ValueError, "Expected argument `batch_size` to be an int >= 1 but got 0"),
        ({"num_workers": -1}, ValueError, "Expected argument `num_workers` to be an int >= 0 but got -1"),
        ({"num_train": 0}, ValueError, "Expected argument `num_train` to be an int >= 1 but got 0"),
        ({"hflip": 1.5}, ValueError, r"Expected argument `hflip` to be a float in \[0, 1\] but got 1.5"),
        ({"mosaic": -0.1}, ValueError, r"Expected argument `mosaic` to be a float in \[0, 1\] but got -0.1"),
        ({"translate": 2}, ValueError, r"Expected argument `translate` to be a float in \[0, 1\] but got 2"),
        ({"color_jitter": 1.1}, ValueError, r"`color_jitter` to be a float in \[0, 1\] but got 1.1"),
        ({"zoom": 1.0}, ValueError, r"Expected argument `zoom` to be a float in \[0, 1\) but got 1.0"),
        ({"num_classes": 0}, ValueError, "Expected argument `num_classes` to be a positive int or None but got 0"),
        (
            {"num_classes": 9},
            ValueError,
            "Expected argument `num_classes` to be at most 6 for the shapes data but got 9",
        ),
        (
            {"val_split": "val2017"},
            ValueError,
            "Expected argument `val_split` to be 'train' or 'val' for the shapes data but got 'val2017'",
        ),
        (
            {"format": "coco"},
            ValueError,
            "Expected argument `root` to be the dataset folder for format='coco' but got None",
        ),
        ({"format": "yolo", "root": "/does/not/exist"}, FileNotFoundError, "/does/not/exist does not exist"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DetectionDataModule(**kwargs)


class _ReadsNumClasses(pl.LightningModule):
    """Reads the class count from the datamodule in `setup`, as the detectors do."""

    def setup(self, stage: str) -> None:
        self.head = torch.nn.Linear(3, self.trainer.datamodule.num_classes)

    def training_step(self, batch, batch_idx):
        images, _ = batch
        return self.head(images.mean(dim=(2, 3))).sum()

    def validation_step(self, batch, batch_idx):
        _, targets = batch
        self.log("n", float(sum(len(t["boxes"]) for t in targets)), batch_size=len(targets))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_integration(tmp_path):
    dm = DetectionDataModule(root=str(tmp_path / "cache"), **TINY)
    model = _ReadsNumClasses()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=dm)
    assert model.head.out_features == 4
    assert trainer.state.finished


def test_calibration_images_are_the_first_training_images_letterboxed(tmp_path):
    dm = DetectionDataModule(root=str(tmp_path), **{**TINY, "augment": True})
    images = dm.calibration_images(3)
    assert len(images) == 3 and all(x.shape == (1, 3, dm.img_size, dm.img_size) for x in images)
    first = detection_transforms(dm.img_size)(*dm.train_dataset.load(0))[0]
    assert torch.equal(images[0][0], first)  # no augmentation, whatever `augment` says
    assert len(dm.calibration_images(10_000)) == len(dm.train_dataset)
    with pytest.raises(ValueError, match=r"Expected argument `limit` to be an int >= 1 but got 0."):
        dm.calibration_images(0)
