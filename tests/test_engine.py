import logging

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from tiny_deformable_detr import tiny_cfg
from tiny_training import coco_spec, tiny_train_cfg

from deformable_detr import engine
from deformable_detr.checkpoint import AtomicDetectionCheckpointer
from deformable_detr.data.user_coco import register_user_coco
from deformable_detr.engine import (
    FiniteLossAMPTrainer,
    FiniteLossCPUAutocastTrainer,
    FiniteLossSimpleTrainer,
    Trainer,
    build_train_loop,
    check_losses_finite,
    cpu_bfloat16_unsupported_reason,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_cpu_bfloat16 = pytest.mark.skipif(
    cpu_bfloat16_unsupported_reason() is not None,
    reason=f"CPU bfloat16: {cpu_bfloat16_unsupported_reason()}",
)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    name = "robust_tiny_train"
    register_user_coco(name, coco_spec(tmp_path_factory.mktemp("coco")), 3)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _trainer(cfg):
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def test_check_losses_finite_names_the_iteration_and_the_bad_terms():
    check_losses_finite({"loss_ce": torch.tensor(1.0), "loss_bbox": torch.tensor(2.0)}, 3)
    losses = {
        "loss_ce": torch.tensor(1.0),
        "loss_bbox": torch.tensor(float("inf")),
        "loss_giou_1": torch.tensor(float("nan"), dtype=torch.bfloat16),
    }
    with pytest.raises(FloatingPointError, match="iteration 7: loss_bbox=inf, loss_giou_1=nan"):
        check_losses_finite(losses, 7)


def test_trainer_uses_the_atomic_checkpointer_in_its_hooks(tiny_dataset, tmp_path):
    trainer = _trainer(tiny_train_cfg(tmp_path, [tiny_dataset], max_iter=1))
    assert isinstance(trainer.checkpointer, AtomicDetectionCheckpointer)
    periodic = [h for h in trainer._hooks if type(h).__name__ == "PeriodicCheckpointer"]
    assert [h.checkpointer for h in periodic] == [trainer.checkpointer]
    assert isinstance(trainer._trainer, FiniteLossSimpleTrainer)


def test_nan_loss_stops_training_naming_iteration_and_term_and_keeps_last_checkpoint(
    tiny_dataset, tmp_path, monkeypatch
):
    trainer = _trainer(tiny_train_cfg(tmp_path, [tiny_dataset], max_iter=8, checkpoint_period=2))
    criterion = trainer.model.criterion
    calls = {"n": 0}
    original_forward = criterion.forward

    def forward_with_nan_at_iteration_5(outputs, targets):
        losses = original_forward(outputs, targets)
        calls["n"] += 1
        if calls["n"] == 6:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(criterion, "forward", forward_with_nan_at_iteration_5)
    with pytest.raises(FloatingPointError, match=r"iteration 5: loss_giou=nan\."):
        trainer.train()

    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_final.pth").exists()
    checkpoint = torch.load(tmp_path / "model_0000003.pth", weights_only=False)
    assert checkpoint["iteration"] == 3
    weights = [v for v in checkpoint["model"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)
    # The failing iteration stopped before the optimizer step: the weights are still finite.
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_losses_are_float32_under_cpu_bfloat16_autocast(tiny_dataset):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg).train()
    from deformable_detr.data.dataset_mapper import DetrDatasetMapper

    mapper = DetrDatasetMapper(cfg, True)
    batch = [mapper(record) for record in DatasetCatalog.get(tiny_dataset)[:2]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert all(loss.dtype == torch.float32 for loss in losses.values())
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_criterion_computes_bfloat16_predictions_in_float32():
    torch.manual_seed(0)
    criterion = build_model(tiny_cfg()).criterion
    logits, boxes = torch.randn(2, 12, 3), torch.rand(2, 12, 4) * 0.5 + 0.25
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                 [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    low = criterion(
        {"pred_logits": logits.bfloat16(), "pred_boxes": boxes.bfloat16()}, targets
    )
    high = criterion(
        {"pred_logits": logits.bfloat16().float(), "pred_boxes": boxes.bfloat16().float()},
        targets,
    )
    assert all(loss.dtype == torch.float32 for loss in low.values())
    for name in high:
        torch.testing.assert_close(low[name], high[name], rtol=0, atol=0)


def test_amp_config_is_checked(tiny_dataset, tmp_path):
    cfg = tiny_train_cfg(tmp_path, [tiny_dataset])
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "float8"
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION must be one of"):
        build_train_loop(cfg, None, None, None)
    assert cfg.MODEL.DEVICE == "cpu"
    cfg.SOLVER.AMP.PRECISION = "float16"
    with pytest.raises(ValueError, match="'float16' needs a CUDA device; on the CPU use"):
        build_train_loop(cfg, None, None, None)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cuda"
        with pytest.raises(RuntimeError, match="MODEL.DEVICE 'cuda' needs CUDA"):
            build_train_loop(cfg, None, None, None)


def test_cpu_bfloat16_amp_is_refused_naming_the_missing_instructions(
    tiny_dataset, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg = tiny_train_cfg(tmp_path, [tiny_dataset])
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    with pytest.raises(RuntimeError, match="neither AVX512-BF16 nor AMX.*ENABLED False"):
        build_train_loop(cfg, None, None, None)


@requires_cpu_bfloat16
def test_cpu_bfloat16_amp_trains_with_an_autocast_forward_only(tiny_dataset, tmp_path):
    cfg = tiny_train_cfg(tmp_path, [tiny_dataset], max_iter=2)
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    trainer = _trainer(cfg)
    assert isinstance(trainer._trainer, FiniteLossCPUAutocastTrainer)
    model = trainer.model
    autocast_in_forward, linear_dtypes = [], []

    def record_autocast(*_):
        autocast_in_forward.append(torch.is_autocast_enabled("cpu"))

    def record_dtype(module, inputs, output):
        linear_dtypes.append(output.dtype)

    model.register_forward_hook(record_autocast)
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(record_dtype)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    trainer.train()
    assert trainer.iter == 2
    assert autocast_in_forward == [True, True] and not torch.is_autocast_enabled("cpu")
    assert set(linear_dtypes) == {torch.bfloat16}
    after = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


def test_autocast_forward_is_left_when_the_forward_raises():
    class Failing(torch.nn.Module):
        def forward(self, x):
            assert torch.is_autocast_enabled("cpu")
            raise KeyError("boom")

    model = Failing()
    with engine._autocast_forward(model, "cpu", torch.bfloat16):
        with pytest.raises(KeyError, match="boom"):
            model(torch.ones(1))
        assert not torch.is_autocast_enabled("cpu")
    assert not model._forward_pre_hooks and not model._forward_hooks


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_amp_training_on_cuda(tiny_dataset, tmp_path, precision, caplog):
    cfg = tiny_train_cfg(tmp_path, [tiny_dataset], max_iter=3)
    cfg.MODEL.DEVICE = "cuda"
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = precision
    trainer = _trainer(cfg)
    assert isinstance(trainer._trainer, FiniteLossAMPTrainer)
    assert trainer._trainer.precision == getattr(torch, precision)
    assert trainer._trainer.grad_scaler.is_enabled() == (precision == "float16")
    with caplog.at_level(logging.INFO):
        trainer.train()
    assert trainer.iter == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
