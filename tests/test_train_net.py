"""train_net.py: optimizer groups, gradient clipping, import hint, and a tiny train + eval run."""

import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.modeling import build_model
from tiny_deformable_detr import REPO, VARIANTS, tiny_cfg, write_coco_dataset

from deformable_detr.solver import build_optimizer


def test_optimizer_param_groups_and_full_model_clipping():
    cfg = tiny_cfg("two_stage")
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs == pytest.approx([2e-5, 2e-5, 2e-4])
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_id[id(names["backbone.res3.0.conv1.weight"])] == pytest.approx(2e-5)
    offsets = "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"
    assert by_id[id(names[offsets])] == pytest.approx(2e-5)
    assert by_id[id(names["transformer.pos_trans.weight"])] == pytest.approx(2e-4)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(by_id) == trainable
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)

    # One global norm over all parameters (official clip_max_norm 0.1), applied in step().
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert total.item() == pytest.approx(0.1, rel=1e-4)


def test_missing_dependencies_give_a_one_line_hint():
    # -S -E: no site-packages and no PYTHONPATH, so detectron2/torch cannot be imported.
    result = subprocess.run([sys.executable, "-S", "-E", str(REPO / "train_net.py"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "make setup" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_trains_three_iterations_then_evaluates(tmp_path):
    json_file, image_dir = write_coco_dataset(tmp_path / "data")
    output_dir = tmp_path / "out"
    cfg = tiny_cfg()
    tiny_opts = [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    ]
    for key in ["NUM_CLASSES", "HIDDEN_DIM", "NHEADS", "ENC_LAYERS", "DEC_LAYERS",
                "DIM_FEEDFORWARD", "NUM_QUERIES"]:
        tiny_opts += [f"MODEL.DEFORMABLE_DETR.{key}", str(cfg.MODEL.DEFORMABLE_DETR[key])]
    opts = tiny_opts + [
        "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3",
        "SOLVER.STEPS", "(2,)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
        "INPUT.DETR_CROP.RESIZE_SIZES", "[64]", "INPUT.DETR_CROP.SIZE", "[48,64]",
        "OUTPUT_DIR", str(output_dir),
    ]
    script = textwrap.dedent(f"""
        import runpy, sys
        from detectron2.data.datasets import register_coco_instances
        for name in ("tiny_train", "tiny_val"):
            register_coco_instances(name, {{}}, {str(json_file)!r}, {str(image_dir)!r})
        sys.argv = ["train_net.py"] + sys.argv[1:]
        runpy.run_path({str(REPO / "train_net.py")!r}, run_name="__main__")
    """)
    config = str(REPO / "configs" / VARIANTS["multi_scale"])

    def run(*args):
        result = subprocess.run([sys.executable, "-c", script, "--config-file", config, *args],
                                capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    log = run(*opts)
    assert "iter: 2" in log or "iter: 3" in log
    assert "Evaluation results for bbox" in log
    assert (output_dir / "model_final.pth").is_file()
    assert (output_dir / "inference" / "coco_instances_results.json").is_file()

    log = run("--eval-only", *opts, "MODEL.WEIGHTS", str(output_dir / "model_final.pth"))
    assert "Evaluation results for bbox" in log
