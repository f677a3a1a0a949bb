import os
import runpy

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from tiny_deformable_detr import REPO, tiny_cfg
from tiny_training import write_config

from deformable_detr.checkpoint import AtomicDetectionCheckpointer
from deformable_detr.export import (
    ExportableDeformableDETR,
    example_inputs,
    export_onnx,
    export_torch,
)
from deformable_detr.layers import compiled_kernels
from deformable_detr.layers.ms_deform_attn_op import IMPL_ENV_VAR


def _onnx_session(path):
    onnxruntime = pytest.importorskip("onnxruntime")
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _model(variant):
    torch.manual_seed(0)
    # "+distinct": two-stage queries picked after proposal NMS (a data-dependent op).
    cfg = tiny_cfg(variant.removesuffix("+distinct"))
    if variant.endswith("+distinct"):
        cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE_PROPOSAL_NMS_THRESH = 0.7
    return build_model(cfg).eval()


def _eager(model, inputs):
    with torch.no_grad():
        return ExportableDeformableDETR(model)(*inputs)


def test_wrapper_matches_forward_raw_on_same_size_images():
    model = _model("box_refine")
    pixels = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.forward_raw([{"image": image} for image in pixels])
        images, padding_mask = model.preprocess_image([{"image": image} for image in pixels])
        logits, boxes = ExportableDeformableDETR(model)(images.tensor, padding_mask)
    torch.testing.assert_close(logits, raw["pred_logits"][-1], rtol=0, atol=0)
    torch.testing.assert_close(boxes, raw["pred_boxes"][-1], rtol=0, atol=0)


@pytest.mark.skipif(not compiled_kernels()["cpu"], reason="deformable_detr._C has no CPU kernel")
@pytest.mark.parametrize("variant", ["multi_scale", "two_stage", "two_stage+distinct"])
def test_torch_export_keeps_the_compiled_op_and_matches_eager(variant, tmp_path, monkeypatch):
    monkeypatch.setenv(IMPL_ENV_VAR, "pytorch")  # the export picks the compiled op itself
    model = _model(variant)
    inputs = example_inputs(model, 64, 96, batch_size=2)
    export_torch(model, inputs, str(tmp_path / "model.pt2"))
    program = torch.export.load(str(tmp_path / "model.pt2"))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "deformable_detr.ms_deform_attn_forward.default" in targets

    other = example_inputs(model, 64, 96, batch_size=2)  # not the inputs it was traced with
    for exported, eager in zip(program.module()(*other), _eager(model, other)):
        torch.testing.assert_close(exported, eager, rtol=0, atol=1e-4)
    assert os.environ[IMPL_ENV_VAR] == "pytorch"


@pytest.mark.parametrize("variant", ["multi_scale", "two_stage"])
def test_onnx_export_runs_in_onnxruntime_and_matches_eager(variant, tmp_path):
    pytest.importorskip("onnx")
    model = _model(variant)
    inputs = example_inputs(model, 64, 96, batch_size=2)
    export_onnx(model, inputs, str(tmp_path / "model.onnx"))

    session = _onnx_session(tmp_path / "model.onnx")
    other = example_inputs(model, 64, 96, batch_size=2)
    outputs = session.run(
        ["pred_logits", "pred_boxes"],
        {"images": other[0].numpy(), "padding_mask": other[1].numpy()},
    )
    for exported, eager in zip(outputs, _eager(model, other)):
        np.testing.assert_allclose(exported, eager.numpy(), rtol=0, atol=1e-4)


def test_export_tool_loads_weights_and_writes_a_matching_onnx_file(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    trained = _model("multi_scale")
    with torch.no_grad():
        trained.class_embed[0].bias.add_(1.0)  # differs from a fresh model with the same seed
    AtomicDetectionCheckpointer(trained, save_dir=str(tmp_path)).save("weights")
    config = write_config(tiny_cfg("multi_scale"), tmp_path / "config.yaml")
    main = runpy.run_path(str(REPO / "tools" / "export_model.py"))["main"]
    output = tmp_path / "model.onnx"
    assert main([
        "--config-file", config, "--format", "onnx", "--output", str(output),
        "--height", "64", "--width", "96", "MODEL.WEIGHTS", str(tmp_path / "weights.pth"),
    ]) == 0
    assert "max |exported - eager| = " in capsys.readouterr().out

    inputs = example_inputs(trained, 64, 96)
    session = _onnx_session(output)
    logits, _ = session.run(None, {"images": inputs[0].numpy(), "padding_mask": inputs[1].numpy()})
    np.testing.assert_allclose(logits, _eager(trained, inputs)[0].numpy(), rtol=0, atol=1e-4)
