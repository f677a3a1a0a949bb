import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import hooks
from tiny_training import coco_spec, tiny_train_cfg
from torch import nn

from deformable_detr.data.user_coco import register_user_coco
from deformable_detr.ema import EMAHook, ModelEMA
from deformable_detr.engine import Trainer, load_evaluation_weights


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    name = "ema_tiny_train"
    register_user_coco(name, coco_spec(tmp_path_factory.mktemp("coco")), 3)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_update_averages_float_weights_and_copies_integer_buffers():
    model = _tiny_model()
    ema = ModelEMA(decay=0.75)
    ema.update(model)  # the first update starts the average at the weights
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(ema.weights[k], v) for k, v in start.items())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(4, 3))  # moves BatchNorm's statistics and counter
    ema.update(model)
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            expected = 0.75 * start[name] + 0.25 * value
            torch.testing.assert_close(ema.weights[name], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(ema.weights[name], value)
    assert ema.weights["1.num_batches_tracked"].item() == 1
    with pytest.raises(ValueError, match="SOLVER.EMA.DECAY"):
        ModelEMA(decay=1.0)


def test_applied_to_swaps_the_average_in_and_restores_the_weights():
    model = _tiny_model()
    ema = ModelEMA(decay=0.5)
    ema.update(model)
    own = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update(model)
    with ema.applied_to(model):
        torch.testing.assert_close(model[0].weight, own + 1.0)
    torch.testing.assert_close(model[0].weight, own + 2.0)


def _ema_trainer(tmp_path, dataset, max_iter, resume=False):
    cfg = tiny_train_cfg(tmp_path, [dataset], max_iter=max_iter, checkpoint_period=1)
    cfg.SOLVER.EMA.ENABLED = True
    cfg.SOLVER.EMA.DECAY = 0.5
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer


@pytest.mark.slow
def test_trainer_averages_after_each_step_evaluates_and_resumes_with_the_average(
    tiny_dataset, tmp_path, monkeypatch
):
    evaluated = []
    monkeypatch.setattr(
        Trainer, "test",
        classmethod(lambda cls, cfg, model: evaluated.append(
            {k: v.clone() for k, v in model.state_dict().items()}) or {}),
    )
    trainer = _ema_trainer(tmp_path, tiny_dataset, max_iter=2)
    kinds = [type(h) for h in trainer._hooks]
    assert kinds.index(EMAHook) < kinds.index(hooks.PeriodicCheckpointer)
    trainer.train()

    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=False)
    model_weights, ema_weights = checkpoint["model"], checkpoint["ema"]
    assert model_weights.keys() == ema_weights.keys()
    name = "heads.class_embed.0.weight"
    assert not torch.equal(model_weights[name], ema_weights[name])
    # The evaluation at the end of training saw the average; the model keeps its own weights.
    assert torch.equal(evaluated[-1][name], ema_weights[name])
    assert torch.equal(trainer.model.state_dict()[name], model_weights[name])

    resumed = _ema_trainer(tmp_path, tiny_dataset, max_iter=3, resume=True)
    assert resumed.start_iter == 2
    assert torch.equal(resumed.model.state_dict()[name], model_weights[name])
    assert all(torch.equal(resumed.model_ema.weights[k], v) for k, v in ema_weights.items())
    resumed.train()  # one more step from both restored weight sets
    expected = 0.5 * ema_weights[name] + 0.5 * resumed.model.state_dict()[name]
    torch.testing.assert_close(resumed.model_ema.weights[name], expected, rtol=0, atol=1e-6)


def test_evaluation_loads_the_checkpoints_average_only_with_ema_on(tmp_path):
    model = _tiny_model()
    average = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "ema": average}, path)
    cfg = tiny_train_cfg(tmp_path)
    cfg.MODEL.WEIGHTS = str(path)
    for enabled, expected in ((False, model.state_dict()), (True, average)):
        cfg.SOLVER.EMA.ENABLED = enabled
        evaluated = _tiny_model()
        with torch.no_grad():
            evaluated[0].weight.zero_()
        load_evaluation_weights(cfg, evaluated)
        assert all(torch.equal(evaluated.state_dict()[k], v) for k, v in expected.items())
