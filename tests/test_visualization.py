"""Sampling points in image pixels, the inside-box share, pictures, tools/visualize_sampling.py."""

import os
import runpy

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image
from tiny_deformable_detr import REPO, synthetic_scenes, tiny_cfg
from tiny_training import write_config

from deformable_detr.checkpoint import AtomicDetectionCheckpointer
from deformable_detr.layers import SamplingRecord, capture_sampling
from deformable_detr.visualization import (
    SampledQuery,
    draw_sampling,
    encoder_query_index,
    explain_detections,
    inside_box_share,
    level_valid_ratios,
    mean_inside_box_share,
    sampled_query,
    to_image_pixels,
)

SHAPES = torch.tensor([[4, 8], [2, 4]])
STARTS = torch.tensor([0, 32])


def _padded_batch_mask():
    """(2, 40) padding mask: image 0 fills the maps; image 1 covers 6 of 8 columns and 2 of 4
    rows of level 0, 3 of 4 columns and 1 of 2 rows of level 1."""
    mask = torch.zeros(2, 40, dtype=torch.bool)
    level0 = torch.ones(4, 8, dtype=torch.bool)
    level0[:2, :6] = False
    level1 = torch.ones(2, 4, dtype=torch.bool)
    level1[:1, :3] = False
    mask[1] = torch.cat([level0.flatten(), level1.flatten()])
    return mask


def _record(locations, reference_points, padding_mask=None):
    n, lq, m, levels, points, _ = locations.shape
    weights = torch.full((n, lq, m, levels, points), 1.0 / (levels * points))
    return SamplingRecord(locations, weights, reference_points, SHAPES, STARTS, padding_mask)


def _model(variant, **overrides):
    torch.manual_seed(0)
    cfg = tiny_cfg(variant)
    for key, value in overrides.items():
        setattr(cfg.MODEL.DEFORMABLE_DETR, key, value)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a trained-looking model: offsets and weights away from their init
        for name, parameter in model.transformer.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name:
                parameter.normal_(0, 0.3)
    return model


def test_valid_ratios_of_a_padded_batch():
    ratios = level_valid_ratios(_padded_batch_mask(), SHAPES, 2)
    assert torch.equal(ratios[0], torch.ones(2, 2))
    assert torch.equal(ratios[1], torch.tensor([[0.75, 0.5], [0.75, 0.5]]))
    assert torch.equal(level_valid_ratios(None, SHAPES, 3), torch.ones(3, 2, 2))


def test_location_maps_to_the_pixel_of_the_valid_image():
    # Image 0 fills its padded frame; image 1 covers 3/4 of its width and half its height.
    ratios = level_valid_ratios(_padded_batch_mask(), SHAPES, 2)
    centre = torch.tensor([0.5, 0.5])
    assert torch.equal(to_image_pixels(centre, ratios[0, 0], (300, 400)), torch.tensor([200., 150]))
    assert torch.allclose(to_image_pixels(centre, ratios[1, 0], (300, 400)),
                          torch.tensor([400 * 0.5 / 0.75, 300.0]))
    # Image 1's centre sits at (0.375, 0.25) of the padded frame, on every level.
    assert torch.equal(to_image_pixels(torch.tensor([0.375, 0.25]), ratios[1, 1], (300, 400)),
                       torch.tensor([200.0, 150.0]))


def test_sampled_query_places_points_and_reference_box_in_pixels():
    locations = torch.zeros(2, 1, 1, 2, 1, 2)
    locations[1, 0, 0, :, 0] = torch.tensor([[0.375, 0.25], [0.75, 0.5]])
    # A (cx, cy, w, h) reference box as the decoder feeds it: times the valid ratios.
    reference = torch.tensor([0.5, 0.5, 0.2, 0.4]) * torch.tensor([0.75, 0.5, 0.75, 0.5])
    reference_points = reference.expand(2, 1, 2, 4).clone()
    record = _record(locations, reference_points, _padded_batch_mask())
    query = sampled_query(record, 1, 0, (300, 400))
    assert torch.allclose(query.sampling_points[0, :, 0], torch.tensor([[200., 150], [400, 300]]))
    assert torch.allclose(query.reference_point, torch.tensor([200.0, 150.0]))
    assert torch.allclose(query.reference_box, torch.tensor([160.0, 90, 240, 210]))
    assert query.level_shapes == [(4, 8), (2, 4)]


def test_encoder_query_index_is_the_cell_under_the_pixel():
    locations = torch.zeros(2, 40, 1, 2, 1, 2)
    record = _record(locations, torch.zeros(2, 40, 2, 2), _padded_batch_mask())
    # Image 1 (300 x 400 pixels) is 2 rows x 6 columns on level 0, 1 x 3 on level 1.
    assert encoder_query_index(record, 1, (0, 0), (300, 400)) == 0
    assert encoder_query_index(record, 1, (399, 299), (300, 400)) == 1 * 8 + 5
    assert encoder_query_index(record, 1, (150, 100), (300, 400)) == 0 * 8 + 2
    assert encoder_query_index(record, 1, (399, 299), (300, 400), level=1) == 32 + 2
    assert encoder_query_index(record, 0, (399, 299), (300, 400)) == 3 * 8 + 7
    with pytest.raises(ValueError, match="outside the image"):
        encoder_query_index(record, 1, (400, 10), (300, 400))
    with pytest.raises(ValueError, match="level 2 does not exist"):
        encoder_query_index(record, 1, (10, 10), (300, 400), level=2)


def test_inside_box_share_by_hand():
    # 2 heads, 2 levels, 2 points; the box is x in [10, 20], y in [10, 20].
    points = torch.tensor([
        [[[15.0, 15], [30, 15]], [[10, 20], [5, 5]]],  # in, out | in (corner), out
        [[[12.0, 18], [11, 11]], [[25, 25], [19, 21]]],  # in, in | out, out (y just below)
    ])
    weights = torch.tensor([
        [[0.1, 0.2], [0.3, 0.4]],
        [[0.25, 0.25], [0.4, 0.1]],
    ])
    query = SampledQuery(torch.zeros(2), None, points, weights, [(4, 4), (2, 2)])
    share = inside_box_share(query, torch.tensor([10.0, 10, 20, 20]))
    level0 = (0.1 + 0.25 + 0.25) / (0.1 + 0.2 + 0.25 + 0.25)
    level1 = 0.3 / (0.3 + 0.4 + 0.4 + 0.1)
    assert torch.allclose(share, torch.tensor([level0, level1, (0.1 + 0.25 + 0.25 + 0.3) / 2]))
    unweighted = inside_box_share(query, torch.tensor([10.0, 10, 20, 20]), weighted=False)
    assert torch.equal(unweighted, torch.tensor([3 / 4, 1 / 4, 4 / 8]))


def test_capture_in_a_model_equals_what_the_op_received(op_calls):
    received = op_calls
    model = _model("two_stage")
    batch = [{"image": torch.rand(3, 64, 80) * 255}, {"image": torch.rand(3, 48, 64) * 255}]
    with torch.no_grad():
        expected = model.raw_outputs(batch)
        received.clear()
        with capture_sampling(model) as records:
            captured = model.raw_outputs(batch)
    assert torch.equal(captured["pred_boxes"], expected["pred_boxes"])
    assert torch.equal(captured["pred_logits"], expected["pred_logits"])
    # Encoder layers then decoder layers: the order of named_modules and of the calls.
    assert len(records) == 3 and len(received) == 3
    for (record,), args in zip(records.values(), received):
        assert torch.equal(record.sampling_locations, args[3])
        assert torch.equal(record.attention_weights, args[4])


def test_padded_batch_reference_points_land_where_the_model_put_them():
    # Without refinement the decoder's reference points are learned, the same fraction of every
    # image; in pixels they must agree across a padded batch whatever the padding.
    model = _model("multi_scale")
    batch = [{"image": torch.rand(3, 64, 96) * 255, "height": 128, "width": 192},
             {"image": torch.rand(3, 40, 64) * 255, "height": 40, "width": 64}]
    name = "transformer.decoder.layers.1.cross_attn"
    with torch.no_grad(), capture_sampling(model, [name]) as records:
        model(batch)
        c = model.transformer.d_model
        expected = model.transformer.reference_points(model.query_embed.weight[:, :c]).sigmoid()
    (record,) = records[name]
    assert not torch.allclose(record.reference_points[0], record.reference_points[1])
    for i, size in enumerate([(128, 192), (40, 64)]):
        for q in range(len(expected)):
            point = sampled_query(record, i, q, size).reference_point
            assert torch.allclose(point, expected[q] * torch.tensor([size[1], size[0]]),
                                  atol=1e-4)


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_detections_carry_their_own_querys_sampling(variant):
    # With refinement the last layer's reference box is the previous layer's predicted box of
    # the same query: a detection mapped to the wrong query would not match it.
    model = _model(variant, NMS_THRESH_TEST=0.5)
    image = torch.as_tensor(synthetic_scenes(1)[0][0]).permute(2, 0, 1).float()
    inputs = [{"image": image, "height": 128, "width": 160}]
    (result,) = explain_detections(model, inputs, score_thresh=0.0)
    with torch.no_grad():
        raw = model.raw_outputs(inputs)
    assert len(result["detections"]) == len(result["instances"]) > 0
    scale = torch.tensor([160, 128, 160, 128])
    for detection in result["detections"]:
        cx, cy, w, h = raw["pred_boxes"][-2, 0, detection.query_index].tolist()
        box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * scale
        assert torch.allclose(detection.sampling.reference_box, box, atol=1e-3)
        assert detection.sampling.sampling_points.shape == (2, 4, 4, 2)  # (M, L, P, 2)
    share = mean_inside_box_share(result["detections"])
    assert share.shape == (5,) and ((share >= 0) & (share <= 1)).all()


def test_score_threshold_and_eval_mode():
    model = _model("multi_scale")
    inputs = [{"image": torch.rand(3, 64, 80) * 255}]
    (result,) = explain_detections(model, inputs, score_thresh=0.0, max_detections=5)
    assert len(result["detections"]) == 5 and result["encoder"] is None
    scores = [d.score for d in result["detections"]]
    assert scores == sorted(scores, reverse=True)
    (none,) = explain_detections(model, inputs, score_thresh=1.01)
    assert none["detections"] == [] and mean_inside_box_share(none["detections"]) is None
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        explain_detections(model, inputs)


def test_draw_sampling_draws_points_and_box():
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    points = torch.tensor([[[[40.0, 60], [120, 60]]]])  # 1 head, 1 level, 2 points
    query = SampledQuery(torch.tensor([80.0, 60]), torch.tensor([60.0, 40, 100, 80]), points,
                         torch.tensor([[[0.9, 0.1]]]), [(15, 20)])
    drawn = draw_sampling(image, query, torch.tensor([30.0, 30, 130, 90]), "tree 90%")
    assert drawn.shape == image.shape
    # A dot of level 0's colour at each point (the heavier one larger), the white cross between.
    assert drawn[60, 40, 0] < 80 and drawn[60, 40, 2] > 120
    assert drawn[60, 120].any()
    assert (drawn[60, 80] > 200).all()
    assert not drawn[100:115, 140:155].any()  # away from everything drawn

    # Zoomed: the region around box and points (x 14..146, y 14..106), enlarged to 400 wide.
    zoomed = draw_sampling(image, query, torch.tensor([30.0, 30, 130, 90]), zoom=True)
    scale = 400 / 132
    assert zoomed.shape == (round(92 * scale), 400, 3)
    heavy = zoomed[round(46 * scale), round(26 * scale)]
    assert heavy[0] < 80 and heavy[2] > 120


@pytest.mark.parametrize("variant", ["single_scale", "multi_scale", "box_refine", "two_stage"])
def test_tool_writes_pictures_for_each_variant(variant, tmp_path, capsys):
    model = _model(variant)
    AtomicDetectionCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    config = write_config(tiny_cfg(variant), tmp_path / "config.yaml")
    image_path = tmp_path / "scene.png"
    Image.fromarray(synthetic_scenes(1)[0][0]).save(image_path)
    main = runpy.run_path(str(REPO / "tools" / "visualize_sampling.py"))["main"]
    out = tmp_path / "out"
    assert main([
        "--config-file", config, "--input", str(image_path), "--output", str(out),
        "--score-thresh", "0", "--max-detections", "2", "--encoder-pixel", "30", "20",
        "MODEL.WEIGHTS", str(tmp_path / "weights.pth"),
    ]) == 0
    assert sorted(os.listdir(out)) == ["scene_det0.png", "scene_det1.png", "scene_encoder.png"]
    for name in os.listdir(out):
        assert cv2.imread(str(out / name)).shape == (64, 80, 3)
    assert "attention inside the box: level 0" in capsys.readouterr().out


def test_tool_missing_files_are_clear_errors(tmp_path):
    main = runpy.run_path(str(REPO / "tools" / "visualize_sampling.py"))["main"]
    config = write_config(tiny_cfg("multi_scale"), tmp_path / "config.yaml")
    missing = str(tmp_path / "missing.png")
    with pytest.raises(SystemExit, match=f"no such file: {missing}"):
        main(["--config-file", config, "--input", missing, "--output", str(tmp_path / "out")])
    image_path = tmp_path / "scene.png"
    Image.fromarray(synthetic_scenes(1)[0][0]).save(image_path)
    with pytest.raises(SystemExit, match="MODEL.WEIGHTS .*nowhere.pth.? does not exist"):
        main(["--config-file", config, "--input", str(image_path), "--output",
              str(tmp_path / "out"), "MODEL.WEIGHTS", str(tmp_path / "nowhere.pth")])
    assert not (tmp_path / "out").exists()
