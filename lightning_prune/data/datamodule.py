"""``DetectionDataModule``: the built-in shapes data, COCO or YOLO-txt datasets behind one LightningDataModule.

Batches are ``(images, targets)``: ``images`` float (B, 3, S, S) in [0, 1], letterboxed; ``targets`` a list of B
dicts with ``boxes`` float32 (N, 4) xyxy pixels of the letterboxed input, ``labels`` int64 (N,), ``image_id`` int64
scalar, ``orig_size`` int64 (h, w) and ``letterbox`` float32 (scale, pad_x, pad_y) with
``original = (letterboxed - pad) / scale``.

Example:
    >>> import tempfile
    >>> dm = DetectionDataModule(root=tempfile.mkdtemp(), num_train=4, num_val=2, img_size=64, num_workers=0)
    >>> dm.num_classes
    4
    >>> dm.setup("fit")
    >>> images, targets = next(iter(dm.val_dataloader()))
    >>> images.shape
    torch.Size([2, 3, 64, 64])
"""

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_prune.data.datasets import CocoDetection, DetectionDataset, YoloDetection
from lightning_prune.data.shapes import SHAPE_NAMES, shapes_root
from lightning_prune.data.transforms import Mosaic, detection_transforms

__all__ = ["DetectionDataModule", "detection_collate"]

_FORMATS = ("shapes", "coco", "yolo")
_DEFAULT_SHAPES_CLASSES = 4


def detection_collate(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, list[dict[str, Any]]]:
    """Stack images (all S x S after letterboxing) and keep targets as a list of dicts."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


class _TransformedDataset(Dataset):
    """Apply ``transforms`` to a dataset's raw samples, replacing a sample by a mosaic with probability ``mosaic``."""

    def __init__(self, base: DetectionDataset, transforms: Any, mosaic: float = 0.0, img_size: int = 320) -> None:
        self.base = base
        self.transforms = transforms
        self.mosaic_p = mosaic
        self.mosaic = Mosaic(img_size)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        # torch's RNG: seeded per worker by the DataLoader (and by `seed_everything(workers=True)`)
        if self.mosaic_p > 0 and torch.rand(()) < self.mosaic_p:
            others = torch.randint(len(self.base), (3,)).tolist()
            sample = self.mosaic([self.base.load(i) for i in [index, *others]])
        else:
            sample = self.base.load(index)
        return self.transforms(*sample)


class DetectionDataModule(pl.LightningDataModule):
    """Detection data for training and evaluating YOLO detectors.

    Args:
        format: ``"shapes"`` (built-in generated data), ``"coco"`` (``root/{split}/`` images and
            ``root/annotations/instances_{split}.json``) or ``"yolo"`` (``root/images/{split}``,
            ``root/labels/{split}``).
        root: Dataset root; for ``"shapes"`` the cache folder (default ``$LIGHTNING_PRUNE_CACHE`` or
            ``~/.cache/lightning_prune``).
        train_split: Training split name, e.g. ``"train2017"``.
        val_split: Validation split name; also used by ``test_dataloader`` and ``predict_dataloader``.
        class_names: Class names; overrides the names in the data (same count). Required for ``"yolo"`` unless
            ``root/classes.txt`` exists.
        img_size: Square input side S, a positive multiple of 32.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        augment: Whether to augment training data (validation is never augmented).
        hflip: Horizontal flip probability.
        zoom: Random zoom magnitude, zoom in ``[1 - zoom, 1 + zoom]``; in [0, 1).
        translate: Random shift as a fraction of S; in [0, 1].
        color_jitter: Brightness/contrast/saturation jitter (hue gets a twentieth of it); in [0, 1].
        mosaic: Probability of a 4-image mosaic per training sample.
        num_train: Number of generated training images (``"shapes"`` only).
        num_val: Number of generated validation images (``"shapes"`` only).
        seed: Generation seed (``"shapes"`` only).
        num_classes: Expected number of classes; checked against the data. For ``"shapes"`` it chooses how many
            shape classes to generate (default 4).

    Raises:
        ValueError: If an argument is out of range or ``root`` is missing for ``"coco"``/``"yolo"``.
        FileNotFoundError: If ``root`` does not exist for ``"coco"``/``"yolo"``.
    """

    def __init__(
        self,
        format: Literal["shapes", "coco", "yolo"] = "shapes",
        root: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        class_names: list[str] | None = None,
        img_size: int = 320,
        batch_size: int = 16,
        num_workers: int = 2,
        augment: bool = True,
        hflip: float = 0.5,
        zoom: float = 0.5,
        translate: float = 0.1,
        color_jitter: float = 0.3,
        mosaic: float = 0.0,
        num_train: int = 1000,
        num_val: int = 200,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        _check_args(locals())
        # `num_classes` is checked against the model, not logged twice (Lightning refuses differing duplicate hparams)
        self.save_hyperparameters(ignore=["num_classes"])
        self.format = format
        self.root = root
        self.train_split, self.val_split = train_split, val_split
        self.user_class_names = list(class_names) if class_names is not None else None
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.augment = augment
        self.hflip, self.zoom, self.translate = hflip, zoom, translate
        self.color_jitter, self.mosaic = color_jitter, mosaic
        self.num_train, self.num_val, self.seed = num_train, num_val, seed
        self.expected_num_classes = num_classes
        self.train_dataset: DetectionDataset | None = None
        self.val_dataset: DetectionDataset | None = None
        self._class_names: list[str] | None = None

    # ------------------------------------------------------------------ classes
    @property
    def class_names(self) -> list[str]:
        """Class names in label order; read from the data on first access (before ``setup`` if needed)."""
        if self._class_names is None:
            names = self._read_class_names()
            self._class_names = self._check_class_names(names)
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of classes, available before ``setup``."""
        return len(self.class_names)

    def _read_class_names(self) -> list[str]:
        if self.format == "shapes" and self.val_dataset is None:
            # known without generating the data
            return list(SHAPE_NAMES[: self.expected_num_classes or _DEFAULT_SHAPES_CLASSES])
        if self.val_dataset is None:
            # the val split is usually the small one; reading it validates it and `setup` reuses it
            self.val_dataset = self._load(self.val_split)
        return self.val_dataset.class_names

    def _check_class_names(self, names: list[str]) -> list[str]:
        if self.user_class_names is not None:
            if len(self.user_class_names) != len(names):
                raise ValueError(
                    f"Expected argument `class_names` to have {len(names)} entries like the data but got"
                    f" {len(self.user_class_names)}."
                )
            names = self.user_class_names
        if self.expected_num_classes is not None and self.expected_num_classes != len(names):
            raise ValueError(
                f"Expected argument `num_classes` ({self.expected_num_classes}) to match the {len(names)} classes"
                f" found in the data."
            )
        return list(names)

    # ------------------------------------------------------------------ data
    @property
    def _root(self) -> str:
        assert self.root is not None  # checked in __init__ for coco/yolo
        return self.root

    def _coco_paths(self, split: str) -> tuple[Path, Path]:
        root = Path(self._root)
        return root / split, root / "annotations" / f"instances_{split}.json"

    def _shapes_root(self) -> Path:
        return shapes_root(
            num_train=self.num_train,
            num_val=self.num_val,
            seed=self.seed,
            num_classes=self.expected_num_classes or _DEFAULT_SHAPES_CLASSES,
            cache_root=self.root,
        )

    def _load(self, split: str) -> DetectionDataset:
        if self.format == "yolo":
            return YoloDetection(self._root, split, class_names=self.user_class_names)
        if self.format == "shapes":
            root = self._shapes_root()
            return CocoDetection(root / split, root / "annotations" / f"instances_{split}.json")
        return CocoDetection(*self._coco_paths(split))

    @override
    def prepare_data(self) -> None:
        if self.format == "shapes":
            self._shapes_root()

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.val_dataset is None:
            self.val_dataset = self._load(self.val_split)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._load(self.train_split)
            if self.train_dataset.class_names != self.val_dataset.class_names:
                raise ValueError(
                    f"Expected the same classes in splits `{self.train_split}` and `{self.val_split}` but got"
                    f" {self.train_dataset.class_names} and {self.val_dataset.class_names}."
                )
        self._class_names = self._check_class_names(self.val_dataset.class_names)

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=detection_collate,
            pin_memory=torch.cuda.is_available(),
        )

    def _require(self, dataset: DetectionDataset | None, stage: str) -> DetectionDataset:
        if dataset is None:
            self.setup(stage)
            dataset = self.train_dataset if stage == "fit" else self.val_dataset
        assert dataset is not None
        return dataset

    @override
    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset, "fit")
        if self.augment:
            transforms = detection_transforms(
                self.img_size, True, self.hflip, self.zoom, self.translate, self.color_jitter
            )
            return self._loader(_TransformedDataset(dataset, transforms, self.mosaic, self.img_size), shuffle=True)
        return self._loader(_TransformedDataset(dataset, detection_transforms(self.img_size)), shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        dataset = self._require(self.val_dataset, "validate")
        return self._loader(_TransformedDataset(dataset, detection_transforms(self.img_size)), shuffle=False)

    def calibration_images(self, limit: int) -> list[Tensor]:
        """The first ``limit`` training images, one (1, 3, S, S) batch each, prepared as for validation (letterbox
        only, no augmentation): what INT8 calibration and data-free checks should see.

        Raises:
            ValueError: ``limit`` < 1.
        """
        if not (isinstance(limit, int) and limit >= 1):
            raise ValueError(f"Expected argument `limit` to be an int >= 1 but got {limit!r}.")
        dataset = self._require(self.train_dataset, "fit")
        transforms = detection_transforms(self.img_size)
        return [transforms(*dataset.load(i))[0][None] for i in range(min(limit, len(dataset)))]

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @override
    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _check_args(args: dict[str, Any]) -> None:
    """Validate the constructor arguments of :class:`DetectionDataModule`."""
    if args["format"] not in _FORMATS:
        raise ValueError(f"Expected argument `format` to be one of {list(_FORMATS)} but got {args['format']!r}.")
    size = args["img_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 32:
        raise ValueError(f"Expected argument `img_size` to be a positive multiple of 32 but got {size!r}.")
    for name, low in (("batch_size", 1), ("num_workers", 0), ("num_train", 1), ("num_val", 1)):
        value = args[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"Expected argument `{name}` to be an int >= {low} but got {value!r}.")
    for name in ("hflip", "translate", "color_jitter", "mosaic"):
        value = args[name]
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"Expected argument `{name}` to be a float in [0, 1] but got {value!r}.")
    if not isinstance(args["zoom"], (int, float)) or not 0 <= args["zoom"] < 1:
        raise ValueError(f"Expected argument `zoom` to be a float in [0, 1) but got {args['zoom']!r}.")
    num_classes = args["num_classes"]
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"Expected argument `num_classes` to be a positive int or None but got {num_classes!r}.")
    if args["format"] == "shapes":
        for name in ("train_split", "val_split"):
            if args[name] not in ("train", "val"):
                raise ValueError(
                    f"Expected argument `{name}` to be 'train' or 'val' for the shapes data but got {args[name]!r}."
                )
        if num_classes is not None and num_classes > len(SHAPE_NAMES):
            raise ValueError(
                f"Expected argument `num_classes` to be at most {len(SHAPE_NAMES)} for the shapes data but got"
                f" {num_classes}."
            )
        return
    root = args["root"]
    if root is None:
        raise ValueError(
            f"Expected argument `root` to be the dataset folder for format={args['format']!r} but got None."
        )
    if not Path(root).is_dir():
        raise FileNotFoundError(f"Expected argument `root` to be an existing folder but {root} does not exist.")
