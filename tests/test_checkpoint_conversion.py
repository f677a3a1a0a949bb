"""
Conversion of official / HuggingFace Deformable DETR checkpoints
(tools/convert_official_checkpoint.py, deformable_detr.checkpoint): strict loading,
output parity with HuggingFace's model on the same normalized images, the COCO class mapping, and
clean failures that write nothing.
"""

import argparse
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from tiny_deformable_detr import official_head_keys
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

import deformable_detr.modeling  # noqa: F401  (registers the meta-architecture)
from deformable_detr.checkpoint import (
    CheckpointConversionError,
    check_state_dict_matches,
    coco_class_rows,
    convert_state_dict,
    load_source_state_dict,
)
from deformable_detr.config import add_deformable_detr_config
from deformable_detr.layers import capture_sampling
from deformable_detr.utils.testing import randomize_

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_CONFIGS = ROOT / "configs" / "official"
# Same architecture as the official models, fewer and narrower layers to stay fast.
NUM_QUERIES = 20
SMALL_OPTS = [
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "2",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2",
    "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD", "128",
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES", str(NUM_QUERIES),
    "MODEL.DEFORMABLE_DETR.TWO_STAGE.NUM_PROPOSALS", str(NUM_QUERIES),
]
# variant -> (config in configs/official, HF DeformableDetrConfig arguments)
VARIANTS = {
    "multi_scale": ("r50_deformable_detr.yaml", {}),
    "single_scale": ("r50_deformable_detr_single_scale.yaml", {"num_feature_levels": 1}),
    "single_scale_dc5": (
        "r50_deformable_detr_single_scale_dc5.yaml",
        {"num_feature_levels": 1, "dilation": True},
    ),
    "box_refine": (
        "r50_deformable_detr_plus_iterative_bbox_refinement.yaml",
        {"with_box_refine": True},
    ),
    "two_stage": (
        "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.yaml",
        {"with_box_refine": True, "two_stage": True},
    ),
}
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cfg(variant):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(str(OFFICIAL_CONFIGS / VARIANTS[variant][0]))
    cfg.merge_from_list(SMALL_OPTS)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def run_tool(*args):
    spec = importlib.util.spec_from_file_location(
        "convert_official_checkpoint", ROOT / "tools" / "convert_official_checkpoint.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main([str(a) for a in args])


def images(seed=0):
    """Two RGB images (0..255) of different sizes, so the batch has padding."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 96, 128, generator=g) * 255, torch.rand(3, 80, 112, generator=g) * 255]


def build_hf(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=True,
        backbone="resnet50",
        use_pretrained_backbone=False,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=NUM_QUERIES,
        two_stage_num_proposals=NUM_QUERIES,
        num_labels=91,
        **VARIANTS[variant][1],
    )
    torch.manual_seed(0)
    hf = randomize_(transformers.DeformableDetrForObjectDetection(config).eval(), seed=1)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf" / "model.safetensors"


def hf_raw_outputs(hf, imgs, pixel_mean, pixel_std):
    """HF logits and boxes of every decoder layer on the images normalized as the plugin does."""
    from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

    height = max(im.shape[1] for im in imgs)
    width = max(im.shape[2] for im in imgs)
    pixel_values = torch.zeros(len(imgs), 3, height, width)
    pixel_mask = torch.zeros(len(imgs), height, width, dtype=torch.long)
    for i, im in enumerate(imgs):
        pixel_values[i, :, : im.shape[1], : im.shape[2]] = (im - pixel_mean) / pixel_std
        pixel_mask[i, : im.shape[1], : im.shape[2]] = 1
    with torch.no_grad():
        out = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
        hidden = out.intermediate_hidden_states
        logits, boxes = [], []
        for layer in range(hidden.shape[1]):
            reference = out.init_reference_points if layer == 0 else (
                out.intermediate_reference_points[:, layer - 1]
            )
            reference = inverse_sigmoid(reference)
            delta = hf.bbox_embed[layer](hidden[:, layer])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(hf.class_embed[layer](hidden[:, layer]))
            boxes.append(coord.sigmoid())
    assert torch.equal(logits[-1], out.logits) and torch.equal(boxes[-1], out.pred_boxes)
    return torch.stack(logits), torch.stack(boxes), out


def load_with_checkpointer(model, path):
    """Load through DetectionCheckpointer and return its incompatible keys."""
    checkpointer = DetectionCheckpointer(model)
    load_model = checkpointer._load_model
    result = {}

    def recording_load_model(checkpoint):
        result["incompatible"] = load_model(checkpoint)
        return result["incompatible"]

    checkpointer._load_model = recording_load_model
    checkpointer.load(str(path))
    return result["incompatible"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_checkpoint_converts_loads_strictly_and_matches_hf_outputs(variant, tmp_path):
    hf, hf_file = build_hf(variant, tmp_path)
    output = tmp_path / "model_final.pth"
    config = OFFICIAL_CONFIGS / VARIANTS[variant][0]
    assert run_tool("--input", hf_file, "--output", output, "--source", "hf",
                    "--config-file", config, *SMALL_OPTS) == 0

    cfg = small_cfg(variant)
    model = build_model(cfg).eval()
    incompatible = load_with_checkpointer(model, output)
    assert not incompatible.missing_keys
    assert not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    model.load_state_dict(torch.load(output, weights_only=True)["model"], strict=True)

    imgs = images()
    with torch.no_grad(), capture_sampling(model) as records:
        raw = model.raw_outputs([{"image": im} for im in imgs])
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    # What HF's attention core receives: (value, shapes, shapes list, level starts, locations,
    # weights, im2col step), encoder layers first as in the plugin's module order.
    hf_sampling = []
    hf_attention = [layer.self_attn.attn for layer in hf.model.encoder.layers]
    hf_attention += [layer.encoder_attn.attn for layer in hf.model.decoder.layers]
    hooks = [
        module.register_forward_pre_hook(lambda _, args: hf_sampling.append(args[4:6]))
        for module in hf_attention
    ]
    try:
        hf_logits, hf_boxes, hf_out = hf_raw_outputs(hf, imgs, mean, std)
    finally:
        for hook in hooks:
            hook.remove()
    rows = torch.tensor(coco_class_rows())

    assert raw["pred_logits"].shape == (2, 2, NUM_QUERIES, 80)
    assert (raw["pred_logits"] - hf_logits[..., rows]).abs().max() < TOLERANCE
    assert (raw["pred_boxes"] - hf_boxes).abs().max() < TOLERANCE
    # The sampling capture_sampling records is the official model's, layer by layer.
    assert len(records) == len(hf_sampling) == 4
    for (record,), (locations, weights) in zip(records.values(), hf_sampling):
        assert (record.sampling_locations - locations).abs().max() < TOLERANCE
        assert (record.attention_weights - weights).abs().max() < TOLERANCE
    if variant == "two_stage":
        # Proposals are ranked by column 0 of the encoder head: COCO id 0 in both models.
        enc = raw["enc_outputs"]
        enc_logits = enc["pred_logits"][..., 0] - hf_out.enc_outputs_class[..., 0]
        assert enc_logits.abs().max() < TOLERANCE
        enc_boxes = enc["pred_boxes"] - hf_out.enc_outputs_coord_logits.sigmoid()
        assert enc_boxes.abs().max() < TOLERANCE


@pytest.mark.parametrize("variant", ["multi_scale", "box_refine"])
def test_hf_current_and_legacy_key_names_convert_identically(variant, tmp_path):
    hf, safetensors_file = build_hf(variant, tmp_path)
    # save_pretrained writes transformers-4 names and drops tied copies; state_dict() has
    # the current names and every copy.
    bin_file = tmp_path / "pytorch_model.bin"
    torch.save(hf.state_dict(), bin_file)
    from_legacy, variant_a = convert_state_dict(load_source_state_dict(str(safetensors_file)), "hf")
    from_current, variant_b = convert_state_dict(load_source_state_dict(str(bin_file)), "hf")
    assert variant_a == variant_b
    assert variant_a.with_box_refine == (variant == "box_refine")
    assert from_legacy.keys() == from_current.keys()
    for key, value in from_legacy.items():
        assert torch.equal(value, from_current[key]), key


def official_layout_checkpoint(variant):
    """
    An official-layout state dict built independently of the converter: a torchvision ResNet-50
    with FrozenBatchNorm2d under ``backbone.0.body`` (as the official IntermediateLayerGetter
    stores it, without ``fc``), ``input_proj``, and the plugin's own transformer and head names
    (which are the official ones) with 91-row COCO-id class heads.

    Returns:
        (official state dict, torchvision ResNet-50, plugin state dict it was built from)
    """
    cfg = small_cfg(variant)
    torch.manual_seed(0)
    plugin = randomize_(build_model(cfg), seed=2).state_dict()
    # The official backbone: torchvision's ResNet-50, res5 dilated for DC5 (``--dilation``).
    resnet = torchvision.models.resnet50(
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        replace_stride_with_dilation=[False, False, cfg.MODEL.RESNETS.RES5_DILATION > 1],
    )
    randomize_(resnet, seed=3)
    official = {
        f"backbone.0.body.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")
    }
    g = torch.Generator().manual_seed(4)
    for key, value in plugin.items():
        if key.startswith("backbone."):
            continue
        if key.startswith("neck."):
            official[key[len("neck.") :]] = value
        elif key.startswith("heads."):
            if "class_embed." in key:
                value = torch.randn(91, *value.shape[1:], generator=g)
            for official_key in official_head_keys(key[len("heads.") :], cfg):
                official[official_key] = value
        else:
            official[key] = value
    return official, resnet, plugin


@pytest.mark.parametrize("variant", ["multi_scale", "single_scale_dc5", "two_stage"])
def test_official_checkpoint_converts_and_loads_strictly(variant, tmp_path):
    official, resnet, plugin = official_layout_checkpoint(variant)
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    # The official files also hold the optimizer, scheduler, epoch and argparse arguments.
    torch.save(
        {"model": official, "optimizer": {"state": {}}, "lr_scheduler": {"last_epoch": 49},
         "epoch": 49, "args": argparse.Namespace(lr=2e-4, two_stage=variant == "two_stage")},
        path,
    )
    output = tmp_path / "model_final.pth"
    config = OFFICIAL_CONFIGS / VARIANTS[variant][0]
    assert run_tool("--input", path, "--output", output, "--config-file", config, *SMALL_OPTS) == 0

    converted = torch.load(output, weights_only=True)["model"]
    model = build_model(small_cfg(variant)).eval()
    incompatible = load_with_checkpointer(model, output)
    assert not (incompatible.missing_keys or incompatible.unexpected_keys)
    assert not incompatible.incorrect_shapes

    rows = torch.tensor(coco_class_rows())
    for key, value in plugin.items():
        if key.startswith("backbone."):
            continue
        if "class_embed." in key:
            source = official[key[len("heads.") :]]
            head_index = int(re.search(r"class_embed\.(\d+)\.", key).group(1))
            encoder_head = variant == "two_stage" and head_index == 2
            # The two-stage encoder head keeps COCO id 0 (its objectness) as column 0.
            expected_rows = torch.cat([torch.tensor([0]), rows[1:]]) if encoder_head else rows
            assert torch.equal(converted[key], source[expected_rows]), key
        else:
            assert torch.equal(converted[key], value), key

    # The Detectron2 ResNet with the converted weights computes torchvision's features (up to
    # float32 rounding of activations in the hundreds).
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(5))
    body = IntermediateLayerGetter(resnet, {"layer2": "res3", "layer3": "res4", "layer4": "res5"})
    assert model.backbone.output_shape()
    with torch.no_grad():
        expected = body(x)
        features = model.backbone(x)
    for name in model.backbone.output_shape():
        scale = expected[name].abs().max()
        assert (features[name] - expected[name]).abs().max() < TOLERANCE * scale, name


def test_class_mapping_follows_coco_category_ids():
    rows = coco_class_rows()
    assert len(rows) == 80 and rows == sorted(rows)
    assert rows[0] == 1 and rows[-1] == 90  # person -> 0, toothbrush -> 79
    assert 12 not in rows and 0 not in rows  # unused COCO ids
    official, _, _ = official_layout_checkpoint("multi_scale")
    converted, _ = convert_state_dict(official, "official")
    weight = converted["heads.class_embed.0.weight"]
    assert torch.equal(weight[0], official["class_embed.0.weight"][1])
    assert torch.equal(weight[79], official["class_embed.0.weight"][90])
    assert torch.equal(converted["heads.class_embed.0.bias"][0], official["class_embed.1.bias"][1])
    # The head shared by the decoder layers is stored once.
    assert "heads.class_embed.1.weight" not in converted


def test_variant_is_detected_from_the_keys():
    official, _, _ = official_layout_checkpoint("two_stage")
    _, variant = convert_state_dict(official, "official")
    assert variant.two_stage and variant.with_box_refine
    assert (variant.num_feature_levels, variant.num_backbone_levels) == (4, 3)
    assert (variant.num_encoder_layers, variant.num_decoder_layers) == (2, 2)
    assert variant.num_queries is None and variant.num_classes == 91
    assert "DC5" in variant.describe()


def _assert_tool_fails(capsys, tmp_path, *args, message):
    output = tmp_path / "out" / "model_final.pth"
    output.parent.mkdir(exist_ok=True)
    assert run_tool("--output", output, *args) == 1
    assert message in capsys.readouterr().err
    assert os.listdir(output.parent) == []


def test_corrupt_input_is_rejected_and_nothing_is_written(tmp_path, capsys):
    official, _, _ = official_layout_checkpoint("multi_scale")
    good = tmp_path / "good.pth"
    torch.save({"model": official}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    _assert_tool_fails(capsys, tmp_path, "--input", truncated, message="corrupt")
    not_a_pickle = tmp_path / "garbage.pth"
    not_a_pickle.write_bytes(b"\x80\x02garbage")
    _assert_tool_fails(capsys, tmp_path, "--input", not_a_pickle, message="corrupt")
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    _assert_tool_fails(capsys, tmp_path, "--input", garbage, "--source", "hf", message="corrupt")


def test_arbitrary_pickled_objects_are_not_unpickled(tmp_path, capsys):
    path = tmp_path / "with_object.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "extra": IntermediateLayerGetter}, path)
    _assert_tool_fails(capsys, tmp_path, "--input", path, message="not unpickled for safety")


def test_checkpoint_of_another_model_is_rejected(tmp_path, capsys):
    other = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    _assert_tool_fails(capsys, tmp_path, "--input", other, message="Not a Deformable DETR")
    # A Deformable DETR trained on another dataset (official: 20 classes when not COCO).
    official, _, _ = official_layout_checkpoint("multi_scale")
    voc = {k: v[:20] if "class_embed" in k else v for k, v in official.items()}
    with pytest.raises(CheckpointConversionError, match="another dataset"):
        convert_state_dict(voc, "official")


def test_unknown_and_missing_keys_are_listed(tmp_path):
    official, _, _ = official_layout_checkpoint("multi_scale")
    with pytest.raises(CheckpointConversionError, match="transformer_extra.weight"):
        convert_state_dict({**official, "transformer_extra.weight": torch.zeros(1)}, "official")
    with pytest.raises(CheckpointConversionError, match=r"backbone\.0\.body\.fc\.weight"):
        convert_state_dict({**official, "backbone.0.body.fc.weight": torch.zeros(1)}, "official")

    converted, _ = convert_state_dict(official, "official")
    expected = build_model(small_cfg("multi_scale")).state_dict()
    del converted["backbone.res4.2.conv2.norm.running_var"]
    with pytest.raises(CheckpointConversionError, match=r"res4\.2\.conv2\.norm\.running_var"):
        check_state_dict_matches(converted, expected)


def test_variant_or_config_mismatch_is_rejected(tmp_path, capsys):
    official, _, _ = official_layout_checkpoint("multi_scale")
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    refine = OFFICIAL_CONFIGS / VARIANTS["box_refine"][0]
    _assert_tool_fails(capsys, tmp_path, "--input", path, "--config-file", refine, *SMALL_OPTS,
                       message="MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE")
    multi_scale = OFFICIAL_CONFIGS / VARIANTS["multi_scale"][0]
    _assert_tool_fails(capsys, tmp_path, "--input", path, "--config-file", multi_scale,
                       *SMALL_OPTS, "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "3",
                       message="MODEL.DEFORMABLE_DETR.DEC_LAYERS")
    _assert_tool_fails(capsys, tmp_path, "--input", path, "--config-file", multi_scale,
                       *SMALL_OPTS, "INPUT.FORMAT", "BGR", message="INPUT.FORMAT")
    _assert_tool_fails(capsys, tmp_path, "--input", path, "--source", "hf",
                       message="not a HuggingFace")
