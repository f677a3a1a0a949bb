import os

import pytest
import torch
from detectron2.modeling import build_model
from tiny_deformable_detr import official_head_keys, tiny_cfg
from torch import nn

from deformable_detr.checkpoint import (
    AtomicDetectionCheckpointer,
    CorruptCheckpointError,
    atomic_write,
)


def _checkpointer(tmp_path):
    torch.manual_seed(0)
    return AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path))


def test_save_then_resume_restores_weights_and_tags_last(tmp_path):
    saver = _checkpointer(tmp_path)
    saver.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    loader = AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path))
    extra = loader.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    assert torch.equal(loader.model.weight, saver.model.weight)


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model_final.pth"
    target.write_bytes(b"good")

    def write_then_crash(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), write_then_crash)
    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["model_final.pth"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    saver = _checkpointer(tmp_path)
    saver.save("model_final")
    path = tmp_path / "model_final.pth"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="model_final.pth"):
        _checkpointer(tmp_path).load(str(path))


def test_resume_falls_back_to_the_previous_complete_checkpoint(tmp_path, caplog):
    saver = _checkpointer(tmp_path)
    saver.save("model_0000003", iteration=3)
    good_weight = saver.model.weight.detach().clone()
    with torch.no_grad():
        saver.model.weight.add_(1.0)
    saver.save("model_0000007", iteration=7)
    last = tmp_path / "model_0000007.pth"
    last.write_bytes(last.read_bytes()[:100])

    loader = AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path))
    extra = loader.resume_or_load("", resume=True)
    assert extra["iteration"] == 3
    assert torch.equal(loader.model.weight, good_weight)
    assert "model_0000007.pth" in caplog.text and "Trying an older checkpoint" in caplog.text


def test_resume_without_any_readable_checkpoint_is_a_clear_error(tmp_path):
    saver = _checkpointer(tmp_path)
    saver.save("model_0000003", iteration=3)
    path = tmp_path / "model_0000003.pth"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="No readable checkpoint"):
        _checkpointer(tmp_path).resume_or_load("", resume=True)


@pytest.mark.parametrize("variant", ["multi_scale", "box_refine", "two_stage"])
def test_checkpoint_of_the_earlier_layout_with_aliased_heads_loads(variant, tmp_path):
    """Before 0.2 the heads were stored per decoder layer and again under transformer.decoder."""
    cfg = tiny_cfg(variant)
    torch.manual_seed(0)
    trained = build_model(cfg).eval()
    with torch.no_grad():
        for parameter in trained.heads.parameters():
            parameter.normal_(0, 0.1)
    earlier = {}
    for key, value in trained.state_dict().items():
        if key.startswith("heads."):
            for old_key in official_head_keys(key[len("heads.") :], cfg):
                earlier[old_key] = value
        else:
            earlier[key] = value
    torch.save({"model": earlier}, tmp_path / "earlier.pth")

    model = build_model(cfg).eval()
    AtomicDetectionCheckpointer(model).load(str(tmp_path / "earlier.pth"))
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
