import runpy

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from tiny_deformable_detr import CONFIGS, REPO, tiny_cfg
from tiny_training import write_config
from torchvision.ops import box_convert, nms

from deformable_detr import add_deformable_detr_config
from deformable_detr.checkpoint import AtomicDetectionCheckpointer
from deformable_detr.export import (
    EXPORTERS,
    MIN_DYNAMIC_SIZE,
    ExportableDeformableDETR,
    ExportMismatchError,
    example_inputs,
    export_onnx,
    export_torch,
    load_exported,
    prepare_inputs,
    random_image_batches,
    verify_export,
)
from deformable_detr.layers import compiled_kernels

needs_cpu_kernel = pytest.mark.skipif(
    not compiled_kernels()["cpu"], reason="deformable_detr._C has no CPU kernel"
)
PROPOSAL_NMS_THRESH = 0.7


def _randomize_heads(model):
    """Untrained heads predict nearly the same boxes for any image; random ones do not, so a
    wrong mask or a constant baked into the graph shows in the outputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("heads."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _model(variant):
    torch.manual_seed(0)
    # "+distinct": two-stage queries picked after proposal NMS (a data-dependent op).
    cfg = tiny_cfg(variant.removesuffix("+distinct"))
    if variant.endswith("+distinct"):
        cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE.PROPOSAL_NMS_THRESH = PROPOSAL_NMS_THRESH
    model = build_model(cfg).eval()
    _randomize_heads(model)
    if variant.endswith("+distinct"):
        with torch.no_grad():
            # Wide encoder proposals overlap by construction: NMS removes most of them.
            model.heads.bbox_embed[-1].layers[-1].weight.zero_()
            model.heads.bbox_embed[-1].layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 4.0, 4.0]))
    return model


def _demo_model():
    """The demo config (MobileNetV2, 3 levels, refine + two-stage + distinct queries + NMS)."""
    torch.manual_seed(0)
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "demo" / "deformable_detr_mnv2_trees.yaml"))
    cfg.MODEL.DEFORMABLE_DETR.NUM_QUERIES = cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE.NUM_PROPOSALS = 50
    model = build_model(cfg).eval()
    _randomize_heads(model)
    return model


def _mixed_size_batches(model, size=None, count=2):
    """Batches of two random images of different sizes: the padding masks are not all False."""
    return random_image_batches(model, size or (160, 192), size is not None, 2, count, seed=3)


def _eager(model, images, padding_mask):
    with torch.no_grad():
        return ExportableDeformableDETR(model)(images, padding_mask)


def _kept_proposals(model, images, padding_mask):
    """Per image, the valid encoder proposals that survive the proposal NMS, and their number."""
    with torch.no_grad():
        encoder = model.raw_outputs_from_tensors(images, padding_mask)["enc_outputs"]
    boxes = box_convert(encoder["pred_boxes"], "cxcywh", "xyxy")
    kept = []
    for b, s in zip(boxes, encoder["pred_logits"][..., 0]):
        valid = set(torch.nonzero(b[:, 2] < 1).flatten().tolist())  # invalid ones are at 1
        kept.append((set(nms(b, s, PROPOSAL_NMS_THRESH).tolist()) & valid, len(valid)))
    return kept


def test_wrapper_matches_raw_outputs_on_a_padded_batch_of_mixed_sizes():
    model = _model("box_refine")
    batch = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8)}
             for h, w in ((64, 96), (80, 56))]
    with torch.no_grad():
        raw = model.raw_outputs(batch)
        images, padding_mask = model.preprocess_image(batch)
        assert padding_mask.any()
        logits, boxes = ExportableDeformableDETR(model)(images.tensor, padding_mask)
    torch.testing.assert_close(logits, raw["pred_logits"][-1], rtol=0, atol=0)
    torch.testing.assert_close(boxes, raw["pred_boxes"][-1], rtol=0, atol=0)


def test_prepare_inputs_pads_to_the_fixed_size_with_a_true_mask():
    model = _model("multi_scale")
    images = [torch.randint(0, 256, (3, 100, 120), dtype=torch.uint8),
              torch.randint(0, 256, (3, 300, 90), dtype=torch.uint8)]  # taller than the size
    tensor, padding_mask, sizes = prepare_inputs(model, images, (128, 160))
    assert tensor.shape == (2, 3, 128, 160) and padding_mask.shape == (2, 128, 160)
    assert sizes == [(100, 120), (128, 38)]  # the second scaled down to fit, aspect kept
    for mask, (h, w) in zip(padding_mask, sizes):
        assert not mask[:h, :w].any() and mask[h:].all() and mask[:, w:].all()
        assert (mask.sum() == 128 * 160 - h * w).item()


def test_proposal_nms_of_the_test_model_is_data_dependent():
    """The test model must make the proposal NMS matter, else the export tests prove nothing."""
    model = _model("two_stage+distinct")
    (first, mask_first, _), (second, mask_second, _) = _mixed_size_batches(model, (128, 160))
    kept_first = _kept_proposals(model, first, mask_first)
    kept_second = _kept_proposals(model, second, mask_second)
    assert all(len(kept) < num_valid // 2 for kept, num_valid in kept_first + kept_second)
    assert [kept for kept, _ in kept_first] != [kept for kept, _ in kept_second]


@needs_cpu_kernel
@pytest.mark.parametrize("variant", ["multi_scale", "two_stage+distinct"])
def test_torch_export_is_dynamic_in_size_and_matches_eager_on_other_inputs(variant, tmp_path):
    model = _model(variant)
    inputs = example_inputs(model, 128, 160, batch_size=2)
    export_torch(model, inputs, str(tmp_path / "model.pt2"))
    program = torch.export.load(str(tmp_path / "model.pt2"))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "deformable_detr.ms_deform_attn_forward.default" in targets

    run = load_exported("torch_export", str(tmp_path / "model.pt2"))
    # Other images, of other sizes than the example, with real padding.
    for images, padding_mask, _ in _mixed_size_batches(model):
        assert padding_mask.any() and images.shape[-2:] != inputs[0].shape[-2:]
        for exported, eager in zip(run(images, padding_mask), _eager(model, images, padding_mask)):
            torch.testing.assert_close(exported, eager, rtol=0, atol=1e-4)


@needs_cpu_kernel
def test_torch_export_refuses_an_example_below_the_dynamic_minimum(tmp_path):
    model = _model("multi_scale")
    with pytest.raises(ValueError, match=f"at least {MIN_DYNAMIC_SIZE}"):
        export_torch(model, example_inputs(model, 64, 160), str(tmp_path / "model.pt2"))


@pytest.mark.parametrize(
    "variant", ["multi_scale", "single_scale", "single_scale_dc5", "box_refine", "two_stage",
                "two_stage+distinct"],
)
def test_onnx_export_matches_eager_on_other_padded_inputs(variant, tmp_path):
    pytest.importorskip("onnx")
    model = _model(variant)
    size = (128, 160)
    export_onnx(model, example_inputs(model, *size, batch_size=2), str(tmp_path / "model.onnx"))
    run = load_exported("onnx", str(tmp_path / "model.onnx"))
    for images, padding_mask, _ in _mixed_size_batches(model, size):
        assert padding_mask.any()
        for exported, eager in zip(run(images, padding_mask), _eager(model, images, padding_mask)):
            np.testing.assert_allclose(exported.numpy(), eager.numpy(), rtol=0, atol=1e-4)


def test_onnx_export_of_the_demo_config_matches_eager(tmp_path):
    pytest.importorskip("onnx")
    model = _demo_model()
    size = (128, 160)
    export_onnx(model, example_inputs(model, *size), str(tmp_path / "demo.onnx"))
    differences = verify_export(
        model, load_exported("onnx", str(tmp_path / "demo.onnx")),
        random_image_batches(model, size, True, 1, count=2, seed=5), atol=1e-4,
    )
    assert differences["pred_logits"] <= 1e-4 and differences["classes"] == 0


def test_onnx_proposal_nms_is_a_graph_node_and_metadata_names_the_size(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _model("two_stage+distinct")
    export_onnx(model, example_inputs(model, 128, 160), str(tmp_path / "model.onnx"))
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert "NonMaxSuppression" in {node.op_type for node in proto.graph.node}
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    assert (metadata["input_height"], metadata["input_width"]) == ("128", "160")
    assert metadata["pixel_mean"] == str(model.pixel_mean.flatten().tolist())


def test_verify_export_names_the_output_that_differs():
    model = _model("multi_scale")
    batches = _mixed_size_batches(model, (128, 160))

    def shifted_boxes(images, padding_mask):
        logits, boxes = _eager(model, images, padding_mask)
        return logits, boxes + 0.01

    with pytest.raises(ExportMismatchError, match=r"pred_boxes by 0\.01"):
        verify_export(model, shifted_boxes, batches)
    assert verify_export(model, lambda *x: _eager(model, *x), batches)["pred_logits"] == 0


def test_verify_export_compares_the_detections_too():
    model = _model("multi_scale")
    batches = _mixed_size_batches(model, (128, 160))

    def swapped_classes(images, padding_mask):
        logits, boxes = _eager(model, images, padding_mask)
        return logits.flip(-1), boxes

    def shifted_boxes(images, padding_mask):
        logits, boxes = _eager(model, images, padding_mask)
        return logits, boxes + 0.01

    def raised_scores(images, padding_mask):
        logits, boxes = _eager(model, images, padding_mask)
        return logits + 0.5, boxes

    with pytest.raises(ExportMismatchError, match=r"\): pred_logits by [0-9.]+, the detected "
                                                  r"classes$"):
        verify_export(model, swapped_classes, batches)
    # Boxes compared after post-processing too, as XYXY normalized by the image size: +0.01 on
    # (cx, cy, w, h) moves the right and bottom edges by 0.015.
    with pytest.raises(ExportMismatchError, match=r"pred_boxes by 0\.01, boxes by 0\.015$"):
        verify_export(model, shifted_boxes, batches)
    with pytest.raises(ExportMismatchError, match=r"pred_logits by 0\.5, scores by 0\.[0-9]+$"):
        verify_export(model, raised_scores, batches)
    # The tolerance is inclusive: an exact export passes even at atol=0 ...
    assert set(verify_export(model, lambda *x: _eager(model, *x), batches, atol=0).values()) == {0}
    # ... also without any detection to compare.
    model.detections_per_image = 0
    assert set(verify_export(model, lambda *x: _eager(model, *x), batches, atol=0).values()) == {0}


def _tool(argv):
    return runpy.run_path(str(REPO / "tools" / "export_model.py"))["main"](argv)


@pytest.fixture
def trained_weights(tmp_path):
    trained = _model("two_stage+distinct")
    AtomicDetectionCheckpointer(trained, save_dir=str(tmp_path)).save("weights")
    cfg = tiny_cfg("two_stage")
    cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE.PROPOSAL_NMS_THRESH = PROPOSAL_NMS_THRESH
    return trained, write_config(cfg, tmp_path / "config.yaml"), str(tmp_path / "weights.pth")


def test_export_tool_loads_weights_and_writes_a_checked_onnx_file(trained_weights, tmp_path,
                                                                  capsys):
    pytest.importorskip("onnxruntime")
    trained, config, weights = trained_weights
    output = tmp_path / "model.onnx"
    assert _tool([
        "--config-file", config, "--format", "onnx", "--output", str(output),
        "--height", "128", "--width", "160", "MODEL.WEIGHTS", weights,
    ]) == 0
    assert "random images" in capsys.readouterr().out

    images, padding_mask, _ = _mixed_size_batches(trained, (128, 160))[0]
    logits, _ = load_exported("onnx", str(output))(images[:1], padding_mask[:1])
    np.testing.assert_allclose(
        logits.numpy(), _eager(trained, images[:1], padding_mask[:1])[0].numpy(), rtol=0, atol=1e-4
    )


def test_export_tool_deletes_a_file_that_differs_and_exits_1(trained_weights, tmp_path,
                                                             monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    _, config, weights = trained_weights
    export = EXPORTERS["onnx"]

    def export_another_model(model, inputs, output):
        other = _model("two_stage")  # not the loaded weights
        return export(other, inputs, output)

    monkeypatch.setitem(EXPORTERS, "onnx", export_another_model)
    output = tmp_path / "model.onnx"
    assert _tool([
        "--config-file", config, "--format", "onnx", "--output", str(output),
        "--height", "128", "--width", "160", "MODEL.WEIGHTS", weights,
    ]) == 1
    assert not output.exists()
    error = capsys.readouterr().err
    assert "pred_logits by" in error and "was not kept" in error


def test_export_tool_checks_on_the_given_image(trained_weights, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    _, config, weights = trained_weights
    photo = tmp_path / "photo.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    assert _tool([
        "--config-file", config, "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
        "--height", "128", "--width", "160", "--check-image", str(photo), "MODEL.WEIGHTS", weights,
    ]) == 0
    assert f"checked on {photo}" in capsys.readouterr().out


def test_export_tool_names_missing_files(trained_weights, tmp_path):
    _, config, weights = trained_weights
    with pytest.raises(SystemExit, match="config file .*missing.yaml"):
        _tool(["--config-file", str(tmp_path / "missing.yaml"), "--output", "m.pt2"])
    with pytest.raises(SystemExit, match="MODEL.WEIGHTS .*missing.pth"):
        _tool(["--config-file", config, "--output", str(tmp_path / "m.pt2"),
               "MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    with pytest.raises(SystemExit, match=r"named \*\.pt2"):
        _tool(["--config-file", config, "--output", str(tmp_path / "m.onnx")])
