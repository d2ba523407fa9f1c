import pytest

from lightning_prune.models import MODELS, YOLOv3, YOLOv8, build_detector


def test_names_build_their_family() -> None:
    assert {"yolov3-tiny", "yolov3n", "yolov8n", "yolov8s"} <= set(MODELS)
    model = build_detector("yolov3-tiny", num_classes=3, img_size=64)
    assert isinstance(model, YOLOv3) and model.num_classes == 3
    assert isinstance(build_detector("yolov8n", num_classes=2, img_size=64), YOLOv8)


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `name` to be one of \[.*'yolov8n'.*\] but got 'yolov9n'"):
        build_detector("yolov9n")
