"""qaclims.classes: the class-name lists, checked against the reference spelling and torchvision's lists."""
import pytest

from qaclims.classes import COCO_CLASSES, SUPPLEMENTARY_NAMES, VOC_CLASSES, class_aliases, class_names
from refdata import load_reference


def test_voc_names_match_torchvision_without_spaces():
    from torchvision.models.segmentation import FCN_ResNet50_Weights

    voc = FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"][1:]   # drop __background__
    assert [n.replace(" ", "") for n in VOC_CLASSES] == voc


def test_coco_names_match_torchvision():
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    coco = [n for n in FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"] if n not in ("__background__", "N/A")]
    assert list(COCO_CLASSES) == coco


def test_voc_spelling_as_in_questions():
    assert len(VOC_CLASSES) == 20
    for name in ("dining table", "potted plant", "tv monitor", "person"):
        assert name in VOC_CLASSES


def test_supplementary_names_match_reference():
    supply = load_reference("qape_text.json")["supply_cat"]
    assert set(supply) == set(SUPPLEMENTARY_NAMES)
    for label, names in supply.items():
        assert set(class_aliases(label)) == set(names)


def test_class_aliases():
    assert class_aliases("dining table") == ("table", "dining table")
    assert class_aliases("boat") == ("boat",)
    with pytest.raises(ValueError):
        class_aliases("")
    with pytest.raises(TypeError):
        class_aliases(None)


def test_class_names_by_dataset():
    assert class_names("voc") == VOC_CLASSES and class_names("coco") == COCO_CLASSES
    with pytest.raises(ValueError, match="voc"):
        class_names("ade20k")
    with pytest.raises(TypeError):
        class_names(20)
