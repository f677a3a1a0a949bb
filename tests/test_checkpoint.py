import logging
import os
import re
import time

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


def test_write_goes_to_a_hidden_temporary_file_beside_the_target(tmp_path):
    # Beside it, so that the final rename stays on one file system and is atomic.
    seen = []
    atomic_write(str(tmp_path / "model_final.pth"), lambda f: seen.extend(os.listdir(tmp_path)))
    assert len(seen) == 1 and re.fullmatch(r"\.model_final\.pth\..+\.tmp", seen[0]), seen
    assert os.listdir(tmp_path) == ["model_final.pth"]


def test_unreadable_checkpoint_error_says_what_to_do(tmp_path):
    path = tmp_path / "model_final.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError) as error:
        _checkpointer(tmp_path).load(str(path))
    assert str(error.value).endswith(
        "The file is truncated or not a checkpoint; delete it or point MODEL.WEIGHTS / "
        "last_checkpoint to a good one."
    )


def test_save_to_disk_false_writes_nothing(tmp_path, caplog):
    saver = _checkpointer(tmp_path)
    saver.save_to_disk = False
    saver.save("model_final")
    assert os.listdir(tmp_path) == []
    saver.save_to_disk = True
    with caplog.at_level(logging.INFO):
        saver.save("model_final")
    assert f"Saving checkpoint to {tmp_path / 'model_final.pth'}" in caplog.text


def _checkpointer_with_optimizer(tmp_path, lr):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return AtomicDetectionCheckpointer(model, save_dir=str(tmp_path), optimizer=optimizer)


@pytest.mark.parametrize("as_keyword", [False, True])
def test_load_restores_only_the_checkpointables_asked_for(tmp_path, as_keyword):
    _checkpointer_with_optimizer(tmp_path, lr=0.5).save("model_final")
    path = str(tmp_path / "model_final.pth")
    loader = _checkpointer_with_optimizer(tmp_path, lr=0.1)
    if as_keyword:
        loader.load(path, checkpointables=[])
    else:
        loader.load(path, [])
    assert loader.checkpointables["optimizer"].param_groups[0]["lr"] == 0.1
    loader.load(path)
    assert loader.checkpointables["optimizer"].param_groups[0]["lr"] == 0.5


def test_resume_is_the_default_and_without_it_the_given_weights_load(tmp_path):
    (tmp_path / "run").mkdir()
    saver = _checkpointer(tmp_path / "run")
    saver.save("model_0000009", iteration=9)
    weights = tmp_path / "weights.pth"
    torch.save({"model": nn.Linear(3, 2).state_dict(), "iteration": 1}, weights)

    assert _checkpointer(tmp_path / "run").resume_or_load(str(weights))["iteration"] == 9
    loader = _checkpointer(tmp_path / "run")
    assert loader.resume_or_load(str(weights), resume=False)["iteration"] == 1
    assert loader.resume_or_load(str(weights), resume=True)["iteration"] == 9


def test_resume_falls_back_to_the_newest_readable_checkpoint_by_time(tmp_path, caplog):
    saver = _checkpointer(tmp_path)
    for iteration in (3, 7):
        with torch.no_grad():
            saver.model.weight.fill_(iteration)
        saver.save(f"model_{iteration:07d}", iteration=iteration)
    saver.save("model_final", iteration=9)
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[:100])
    # model_0000003.pth written last (e.g. copied back in): newest by time, not by name.
    now = time.time()
    os.utime(tmp_path / "model_0000007.pth", (now - 20, now - 20))
    os.utime(tmp_path / "model_0000003.pth", (now - 10, now - 10))

    loader = AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path))
    assert loader.resume_or_load("", resume=True)["iteration"] == 3
    assert any(r.name.startswith("deformable_detr.checkpoint") for r in caplog.records)
