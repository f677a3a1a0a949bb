"""
The benchmarks in benchmarks/ run end to end in their --quick mode: the op is not grossly slower
than its pure-PyTorch reference, the inference benchmark's models agree with each other and with
HuggingFace's, and the training-step breakdown accounts for the profiled step. No absolute
times are asserted.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HAS_HF = all(importlib.util.find_spec(name) is not None for name in ("transformers", "timm"))


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_op_benchmark_quick_compiled_not_slower_than_reference(capsys):
    assert load("ms_deform_attn").main(["--quick", "--threads", "1"]) == 0
    assert "encoder" in capsys.readouterr().out


def test_inference_benchmark_quick_models_agree(capsys):
    args = ["--quick", "--threads", "1", "--iters", "1"] + ([] if HAS_HF else ["--no-hf"])
    results = load("inference").main(args)
    out = capsys.readouterr().out
    assert "| R50 multi-scale | 128x213 | plugin (compiled op) |" in out
    assert "| demo MobileNetV2 | 128x128 | plugin (compiled op) |" in out
    expected = {("R50 multi-scale", "pytorch op"), ("demo MobileNetV2", "pytorch op")}
    if HAS_HF:
        expected.add(("R50 multi-scale", "HF"))
    assert set(results["max_abs_diff"]) == expected
    for pair, (logits, boxes) in results["max_abs_diff"].items():
        assert logits < 1e-3 and boxes < 1e-4, pair


def test_train_step_benchmark_quick_breakdown_adds_up(capsys):
    results = load("train_step").main(["--quick", "--threads", "1"])
    assert "| encoder |" in capsys.readouterr().out
    shares = results["shares"]
    for component in ("backbone", "neck", "encoder", "decoder"):
        assert shares[(component, "forward")] > 0, component
        assert shares[(component, "backward")] > 0, component
    assert shares[("matcher", "forward")] > 0 and shares[("loss", "forward")] > 0
    # every range's own time plus the backward nodes account for the step, up to the glue
    # between the ranges (zero_grad, the loss sum)
    accounted = sum(shares.values())
    assert 0.8 * results["profiled"] < accounted <= 1.01 * results["profiled"]


def test_scaling_benchmark_quick_completes(capsys):
    exponents = load("scaling").main(["--quick", "--threads", "1", "--iters", "1"])
    assert "fitted k" in capsys.readouterr().out
    assert set(exponents) == {"op", "backbone", "encoder", "decoder", "model"}
    assert all(math.isfinite(k) for k in exponents.values())


@pytest.mark.parametrize("cpu_has_bf16", [True, False], ids=["cpu_bf16", "cpu_without_bf16"])
def test_inference_benchmark_bf16_rows(capsys, monkeypatch, cpu_has_bf16):
    from deformable_detr.engine import cpu_bfloat16_unsupported_reason

    if cpu_has_bf16 and cpu_bfloat16_unsupported_reason() is not None:
        pytest.skip(f"CPU bfloat16: {cpu_bfloat16_unsupported_reason()}")
    if not cpu_has_bf16:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    args = ["--quick", "--threads", "1", "--iters", "1", "--no-hf", "--with-bf16",
            "--models", "R50 multi-scale"]
    results = load("inference").main(args)
    out = capsys.readouterr().out
    row = "| R50 multi-scale | 128x213 | plugin (compiled op), bf16 |"
    if cpu_has_bf16:
        assert row in out
        logits, boxes = results["max_abs_diff"][("R50 multi-scale", "itself in bf16")]
        assert 0 < logits < 1 and 0 < boxes < 0.1  # bfloat16 rounding, not a broken model
    else:
        assert row not in out and "# no bf16 rows: this CPU has neither AVX512-BF16 nor AMX" in out
        assert ("R50 multi-scale", "itself in bf16") not in results["max_abs_diff"]


@pytest.fixture
def trees_under(tmp_path):
    """trees_train / trees_val prepared under tmp_path for the test, registered as before after."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from deformable_detr.data import register_trees

    def register(root):
        for name in ("trees_train", "trees_val"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_trees(root)

    register(str(tmp_path / "datasets"))
    yield
    register(None)


def test_inference_benchmark_evaluates_demo_weights_in_float32_and_in_bf16(
    tmp_path, capsys, monkeypatch, trees_under
):
    inference = load("inference")
    monkeypatch.setattr(inference, "cpu_bfloat16_unsupported_reason", lambda: None)
    model = inference.build(inference.load_cfg(inference.DEMO_CONFIG), "cpu")
    marked_name, marked = list(model.named_parameters())[-1]
    with torch.no_grad():
        marked.fill_(-1.25)  # recognizable in the evaluated model
    weights = tmp_path / "demo.pth"
    torch.save({"model": model.state_dict()}, weights)
    calls = []

    def evaluate(model, loader, evaluator):
        calls.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                      evaluator._metadata.name, model.training,
                      model.get_parameter(marked_name).unique().tolist()))
        return {"bbox": {"AP": 10.0 + len(calls), "AP50": 40.0 - len(calls)}}

    monkeypatch.setattr("detectron2.evaluation.inference_on_dataset", evaluate)
    results = inference.main(["--quick", "--threads", "1", "--iters", "1", "--no-hf",
                              "--with-bf16", "--models", "demo MobileNetV2",
                              "--demo-weights", str(weights)])
    assert calls == [(False, "trees_val", False, [-1.25]),
                     (torch.bfloat16, "trees_val", False, [-1.25])]
    assert results["demo_ap"] == {"fp32": (11.0, 39.0), "bf16": (12.0, 38.0)}
    assert "float32 AP 11.0 AP50 39.0, bf16 AP 12.0 AP50 38.0 (change AP +1.0, AP50 -1.0)" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("argv, message", [
    (["--demo-weights", "x.pth"],
     "--demo-weights measures bfloat16's change in AP: add --with-bf16"),
    (["--with-bf16", "--demo-weights", "missing.pth"], "--demo-weights: no such file: missing.pth"),
])
def test_inference_benchmark_refuses_bad_demo_weights_arguments(capsys, argv, message):
    with pytest.raises(SystemExit):
        load("inference").main(["--no-hf", *argv])
    assert message in capsys.readouterr().err


def _write_metrics(run_dir, ap50_at_150, ap50_at_300, seconds):
    run_dir.mkdir(parents=True)
    records = [
        {"iteration": 19, "time": seconds, "total_loss": 9.0},
        # as Detectron2's EvalHook logs them: after step 149, and after training at 300
        {"iteration": 149, "bbox/AP": ap50_at_150 / 3, "bbox/AP50": ap50_at_150},
        {"iteration": 300, "bbox/AP": ap50_at_300 / 3, "bbox/AP50": ap50_at_300},
    ]
    (run_dir / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_convergence_variants_turn_on_exactly_their_option_over_the_demo_config():
    from deformable_detr.engine import load_config

    convergence = load("convergence")

    def options(variant):
        cfg = load_config(str(convergence.DEMO_CONFIG), convergence.VARIANTS[variant])
        dd = cfg.MODEL.DEFORMABLE_DETR
        return {"denoising": dd.DENOISING.ENABLED,
                "mixed_query_selection": dd.TWO_STAGE.MIXED_QUERY_SELECTION,
                "look_forward_twice": dd.LOOK_FORWARD_TWICE, "ema": cfg.SOLVER.EMA.ENABLED}

    assert load_config(str(convergence.DEMO_CONFIG), []).MODEL.DEFORMABLE_DETR.DENOISING.ENABLED
    assert not any(options("baseline").values())
    for name in convergence.OPTIONS_ON:
        assert options(name) == {other: other == name for other in convergence.OPTIONS_ON}
    assert all(options("all").values())


def test_convergence_study_reports_medians_of_finished_runs_without_training(tmp_path, capsys):
    ap50 = {"baseline": [(40, 50), (42, 60), (41, 55)], "denoising": [(45, 61), (47, 58), (46, 70)]}
    for variant, per_seed in ap50.items():
        for seed, (at_150, at_300) in enumerate(per_seed, start=1):
            _write_metrics(tmp_path / f"{variant}_seed{seed}", at_150, at_300, 3.0)
    load("convergence").main(
        ["--variants", "baseline", "denoising", "--output", str(tmp_path), "--jobs", "1"]
    )
    out = capsys.readouterr().out
    assert "0 to train" in out
    row = "| baseline | 300 | 55.0 (50.0-60.0) | 18.3 (16.7-20.0) | 50.0, 60.0, 55.0 | 3.00, 3.00,"
    assert row in out
    assert "| denoising | 150 | 46.0 (45.0-47.0) |" in out
    assert "| denoising | 300 | 61.0 (58.0-70.0) |" in out


def test_convergence_time_only_times_every_variant_on_the_same_batches(capsys):
    convergence = load("convergence")
    small = [
        "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1", "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2",
        "MODEL.DEFORMABLE_DETR.NUM_QUERIES", "30", "MODEL.DEFORMABLE_DETR.TWO_STAGE.NUM_PROPOSALS",
        "30", "INPUT.MIN_SIZE_TRAIN", "(128,)", "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0",
    ]
    convergence.main(["--time-only", "--steps", "1", "--threads", "1", *small])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == list(convergence.VARIANTS)
    assert rows[1].endswith("| 1.00 (1.00-1.00) |")
