"""Training augmentation moves the ground-truth box with the image: an L-shaped object (it looks
different under every flip) stays tightly enclosed by its transformed box under forced flips,
resize, DETR crop, and the whole configured pipeline."""

import numpy as np
import pytest
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image
from tiny_deformable_detr import tiny_cfg

from deformable_detr.data.dataset_mapper import DetrDatasetMapper, DetrResizeShortestEdge

HEIGHT, WIDTH = 90, 120
# A vertical bar and a horizontal bar meeting at the bottom left; the top right is empty.
L_BOX = (20, 15, 66, 70)  # XYXY of the object's pixels
# Where the empty quadrant of the object's box lies after each flip (horizontal, vertical).
EMPTY_QUADRANT = {
    (False, False): "top right", (True, False): "top left",
    (False, True): "bottom right", (True, True): "bottom left",
}


@pytest.fixture(scope="module")
def l_record(tmp_path_factory):
    x0, y0, x1, y1 = L_BOX
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[y0:y1, x0 : x0 + 12] = 255
    image[y1 - 10 : y1, x0:x1] = 255
    path = tmp_path_factory.mktemp("l_shape") / "l.png"
    Image.fromarray(image).save(path)
    return {
        "file_name": str(path), "height": HEIGHT, "width": WIDTH, "image_id": 1,
        "annotations": [{"bbox": list(L_BOX), "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}],
    }


def _mapper(*augmentations):
    return DetrDatasetMapper(True, augmentations=list(augmentations), image_format="RGB",
                             num_classes=1)


def _object_box(image):
    """XYXY box of the object's pixels (brighter than half) in a (3, H, W) image; None if none."""
    ys, xs = np.nonzero(image.numpy().mean(0) > 127)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def _empty_quadrant(image, box):
    x0, y0, x1, y1 = box.astype(int)
    obj = image.numpy().mean(0)[y0:y1, x0:x1] > 127
    h, w = obj.shape
    quadrants = {
        "top left": obj[: h // 2, : w // 2], "top right": obj[: h // 2, w // 2 :],
        "bottom left": obj[h // 2 :, : w // 2], "bottom right": obj[h // 2 :, w // 2 :],
    }
    return min(quadrants, key=lambda name: quadrants[name].mean())


def _box_and_object(out):
    """The one transformed gt box and the box of the object's pixels (None if cropped away)."""
    boxes = out["instances"].gt_boxes.tensor.numpy().astype(np.float64)
    pixels = _object_box(out["image"])
    if pixels is not None:
        assert len(boxes) == 1, f"one visible object, boxes {boxes}"
    return (boxes[0] if len(boxes) else None), pixels


def _assert_box_encloses_object(box, pixels, atol):
    assert box is not None, "the object is visible but its box was dropped"
    assert (box[:2] <= pixels[:2] + atol).all() and (box[2:] >= pixels[2:] - atol).all(), (
        f"box {box} does not enclose the object's pixels {pixels}"
    )


def _assert_box_encloses_object_tightly(out, atol):
    box, pixels = _box_and_object(out)
    _assert_box_encloses_object(box, pixels, atol)
    np.testing.assert_allclose(box, pixels, atol=atol, err_msg="box vs object pixels")
    return pixels


@pytest.mark.parametrize("horizontal, vertical", [(True, False), (False, True)])
def test_forced_flip_moves_the_box_with_the_object(l_record, horizontal, vertical):
    out = _mapper(T.RandomFlip(prob=1.0, horizontal=horizontal, vertical=vertical))(l_record)
    pixels = _assert_box_encloses_object_tightly(out, atol=0)
    assert _empty_quadrant(out["image"], pixels) == EMPTY_QUADRANT[(horizontal, vertical)]
    # Flipping moved the object: the untransformed box would no longer enclose it.
    assert not np.allclose(pixels, L_BOX)


@pytest.mark.parametrize("short_edge", [64, 160])
def test_resize_scales_the_box_with_the_object(l_record, short_edge):
    out = _mapper(DetrResizeShortestEdge((short_edge,), 1000, "choice"))(l_record)
    assert out["image"].shape[1] == short_edge
    # Resampling blurs the edges by about a pixel.
    _assert_box_encloses_object_tightly(out, atol=1.0)


@pytest.mark.parametrize(
    "x0, y0, w, h",
    [(30, 20, 50, 60), (40, 0, 60, 80), (0, 40, 40, 50), (70, 0, 50, 90)],
    ids=["through the corner", "without the vertical bar", "lower left", "beside the object"],
)
def test_crop_clips_the_box_to_the_crop(l_record, x0, y0, w, h):
    box, pixels = _box_and_object(_mapper(T.CropTransform(x0, y0, w, h))(l_record))
    expected = np.clip(np.subtract(L_BOX, [x0, y0, x0, y0]), 0, [w, h, w, h])
    if pixels is None:  # the crop missed the object's box: the box is dropped
        assert box is None and (expected[2:] <= expected[:2]).any()
        return
    np.testing.assert_array_equal(box, expected)
    _assert_box_encloses_object(box, pixels, atol=0)


def test_detr_resize_and_random_crop_keep_the_object_inside_its_box(l_record):
    mapper = _mapper(
        DetrResizeShortestEdge((72,), 1000, "choice"), T.RandomCrop("absolute_range", (30, 60))
    )
    np.random.seed(0)
    visible = 0
    for _ in range(30):
        box, pixels = _box_and_object(mapper(l_record))
        if pixels is not None:  # a crop of the L's empty corner keeps a box without pixels
            _assert_box_encloses_object(box, pixels, atol=1.0)
            visible += 1
    assert visible >= 10


def test_configured_pipeline_keeps_boxes_on_their_objects(l_record):
    """Random flips in both directions, resize and crop (probability 0.5), then the multi-scale
    resize, as training draws them: every draw keeps the box on the object, and every flip
    combination was drawn. Tolerance: a pixel of blur at the smallest crop (30 px), scaled up by
    the final resize (to 80 px at most)."""
    cfg = tiny_cfg()
    cfg.INPUT.RANDOM_FLIP = "both"
    mapper = DetrDatasetMapper(cfg, True)
    np.random.seed(0)
    orientations = set()
    for _ in range(60):
        out = mapper(l_record)
        box, pixels = _box_and_object(out)
        if pixels is None:
            continue
        _assert_box_encloses_object(box, pixels, atol=3.0)
        width, height = pixels[2:] - pixels[:2]
        if abs(width / height - (L_BOX[2] - L_BOX[0]) / (L_BOX[3] - L_BOX[1])) < 0.05:
            # The whole L is visible: its box is tight, whichever way it was flipped.
            np.testing.assert_allclose(box, pixels, atol=3.0)
            orientations.add(_empty_quadrant(out["image"], pixels))
    assert orientations == set(EMPTY_QUADRANT.values())
