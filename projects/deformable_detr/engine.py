"""The trainer of Deformable DETR: Detectron2's ``DefaultTrainer`` with the DETR data mapper, COCO
evaluation, the official optimizer, and the pieces that make long runs survive: DDP on CPU or GPU,
mixed precision, a stop at the first non-finite loss, and checkpoints written atomically.
"""

import contextlib
import logging
import os
import weakref
from typing import Dict, Optional

import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    default_setup,
    hooks,
)
from detectron2.engine import create_ddp_model as d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import AtomicDetectionCheckpointer
from .config import add_deformable_detr_config
from .data.dataset_mapper import DetrDatasetMapper
from .data.user_coco import setup_user_coco
from .data.validation import training_dataset_dicts
from .ema import EMAHook, ModelEMA
from .errors import UserInputError
from .solver import build_optimizer

__all__ = [
    "AMP_PRECISIONS",
    "FiniteLossAMPTrainer",
    "FiniteLossCPUAutocastTrainer",
    "FiniteLossSimpleTrainer",
    "Trainer",
    "build_train_loop",
    "check_losses_finite",
    "cpu_bfloat16_unsupported_reason",
    "create_ddp_model",
    "inference_config",
    "load_config",
    "load_evaluation_weights",
    "setup",
]

AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model`` (DDP when there are several processes), also for a model
    on CPU: DDP rejects ``device_ids`` for CPU modules, where Detectron2 passes the local rank."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, **kwargs)


def check_losses_finite(loss_dict: Dict[str, torch.Tensor], iteration: int) -> None:
    """
    Raises:
        FloatingPointError: naming the iteration and every loss term that is NaN or infinite.
    """
    values = torch.stack([loss.detach().float().reshape(()) for loss in loss_dict.values()])
    finite = torch.isfinite(values).tolist()  # one device sync for all terms
    if all(finite):
        return
    bad = ", ".join(
        f"{name}={value:g}"
        for (name, value), ok in zip(zip(loss_dict, values.tolist()), finite)
        if not ok
    )
    raise FloatingPointError(
        f"Non-finite loss at iteration {iteration}: {bad}. Training stopped before the optimizer "
        "step; the last checkpoint in OUTPUT_DIR is from an earlier iteration and is kept "
        "(lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS, then --resume)."
    )


class _FiniteLossMixin:
    """Checks the losses of every iteration on every worker; Detectron2's own check only runs on
    the main worker every ``gather_metric_period`` iterations and names no term."""

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        check_losses_finite(loss_dict, self.iter if iter is None else iter)
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


class FiniteLossSimpleTrainer(_FiniteLossMixin, SimpleTrainer):
    """:class:`SimpleTrainer` that stops at the first non-finite loss term."""


class FiniteLossAMPTrainer(_FiniteLossMixin, AMPTrainer):
    """:class:`AMPTrainer` that stops at the first non-finite loss term."""


def cpu_bfloat16_unsupported_reason() -> Optional[str]:
    """None when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), else why not.

    Without either, oneDNN emulates bfloat16 matrix products and autocast makes the CPU slower
    than float32 while losing precision.
    """
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return (
        "this CPU has neither AVX512-BF16 nor AMX (the bfloat16 instruction sets; torch sees "
        f"{torch.backends.cpu.get_cpu_capability()})"
    )


class FiniteLossCPUAutocastTrainer(FiniteLossSimpleTrainer):
    """:class:`FiniteLossSimpleTrainer` whose forward (model and losses) runs under CPU
    autocast, as Detectron2's AMPTrainer does on CUDA; backward and optimizer step stay outside.
    """

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype = torch.bfloat16):
        super().__init__(model, data_loader, optimizer)
        self.precision = precision

    def run_step(self):
        with _autocast_forward(self.model, "cpu", self.precision):
            super().run_step()


@contextlib.contextmanager
def _autocast_forward(model: torch.nn.Module, device_type: str, dtype: torch.dtype):
    """Enters autocast for each call of ``model`` within the block (and leaves it on return or
    exception), so that the rest of a training step runs without it."""
    autocast = torch.autocast(device_type, dtype=dtype)

    def enter(*_):
        autocast.__enter__()

    def leave(*_):
        autocast.__exit__(None, None, None)

    handles = (
        model.register_forward_pre_hook(enter),
        model.register_forward_hook(leave, always_call=True),
    )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_train_loop(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """
    The loop that runs one iteration: float32, or autocast when ``SOLVER.AMP.ENABLED`` with
    ``SOLVER.AMP.PRECISION`` ("float16" scales the loss with a GradScaler; "bfloat16" has the
    range of float32 and needs none). On ``MODEL.DEVICE`` cpu only bfloat16 is accepted, on a
    CPU with AVX512-BF16 or AMX. Losses and matching compute in float32 either way.
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return FiniteLossSimpleTrainer(model, data_loader, optimizer)
    precision = cfg.SOLVER.AMP.PRECISION
    if precision not in AMP_PRECISIONS:
        raise ValueError(
            f"SOLVER.AMP.PRECISION must be one of {sorted(AMP_PRECISIONS)}, got {precision!r}"
        )
    if torch.device(cfg.MODEL.DEVICE).type == "cpu":
        if precision != "bfloat16":
            raise ValueError(
                f"SOLVER.AMP.PRECISION {precision!r} needs a CUDA device; on the CPU use "
                "'bfloat16' or set SOLVER.AMP.ENABLED False"
            )
        reason = cpu_bfloat16_unsupported_reason()
        if reason is not None:
            raise RuntimeError(
                f"SOLVER.AMP.ENABLED (bfloat16) on the CPU: {reason}; set SOLVER.AMP.ENABLED "
                "False to train in float32"
            )
        return FiniteLossCPUAutocastTrainer(model, data_loader, optimizer, torch.bfloat16)
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"SOLVER.AMP.ENABLED on MODEL.DEVICE {cfg.MODEL.DEVICE!r} needs CUDA, which is not "
            "available"
        )
    dtype = AMP_PRECISIONS[precision]
    grad_scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return FiniteLossAMPTrainer(
        model, data_loader, optimizer, grad_scaler=grad_scaler, precision=dtype
    )


class Trainer(DefaultTrainer):
    """
    ``DefaultTrainer`` with the DETR data mapper (validated training data), COCO evaluation, the
    optimizer of :mod:`.solver`, DDP that also works on CPU (Gloo), the train loop of
    :func:`build_train_loop` and an :class:`AtomicDetectionCheckpointer`, whose ``--resume``
    falls back to the previous complete checkpoint when the last one cannot be read. With
    ``SOLVER.EMA.ENABLED`` an :class:`EMAHook` averages the weights after every step, the
    periodic evaluation uses the average and the checkpoints save it under "ema".
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ hard-codes the DDP, loop and checkpointer replaced here, and
        # has no hook for them.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        self.model_ema = ModelEMA(cfg.SOLVER.EMA.DECAY) if cfg.SOLVER.EMA.ENABLED else None
        self._unwrapped_model = model
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = build_train_loop(cfg, model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # Built before the hooks: PeriodicCheckpointer keeps the checkpointer it is given.
        checkpointables = {} if self.model_ema is None else {"ema": self.model_ema}
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), **checkpointables
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        hook_list = super().build_hooks()
        if self.model_ema is None:
            return hook_list
        ema_hook = EMAHook(self.model_ema, self._unwrapped_model)
        # After the scheduler, before the checkpointer and the evaluation that use the average.
        after = next(i for i, hook in enumerate(hook_list) if isinstance(hook, hooks.LRScheduler))
        hook_list.insert(after + 1, ema_hook)
        return [
            hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_with_ema)
            if isinstance(hook, hooks.EvalHook) else hook
            for hook in hook_list
        ]

    def _test_with_ema(self):
        with self.model_ema.applied_to(self._unwrapped_model):
            self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(
            cfg, mapper=DetrDatasetMapper(cfg, True), dataset=training_dataset_dicts(cfg)
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


def load_evaluation_weights(cfg, model: torch.nn.Module, resume: bool = False) -> None:
    """Loads ``MODEL.WEIGHTS`` (with ``resume``, the last checkpoint of ``OUTPUT_DIR``) into
    ``model``; with ``SOLVER.EMA.ENABLED`` the checkpoint's weight average replaces its model
    weights when it has one (a checkpoint written by a training with EMA)."""
    checkpoint = AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=resume
    )
    if cfg.SOLVER.EMA.ENABLED and "ema" in checkpoint:
        model.load_state_dict(checkpoint["ema"])


def load_config(config_file: str, opts=()):
    """The config of ``config_file`` with the ``opts`` overrides (KEY VALUE ...); a missing file,
    an unknown key or missing ``MODEL.WEIGHTS`` is a :class:`UserInputError` naming it."""
    if not os.path.isfile(config_file):
        raise UserInputError(f"config file {config_file!r} does not exist")
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    for source, merge, argument in (
        (f"config file {config_file!r}", cfg.merge_from_file, config_file),
        ("the command line", cfg.merge_from_list, list(opts)),
    ):
        try:
            merge(argument)
        # yacs: KeyError (file) or AssertionError (list) for an unknown key, ValueError for a
        # value of the wrong type or an odd number of KEY VALUE items.
        except (KeyError, AssertionError, ValueError) as error:
            raise UserInputError(f"{source}: {error.args[0] if error.args else error}") from None
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UserInputError(f"MODEL.WEIGHTS {weights!r} does not exist")
    return cfg


def inference_config(config_file: str, opts=(), device: str = None):
    """The frozen config of an inference tool (``predict.py``, ``tools/*``): :func:`load_config`,
    the class names of user COCO datasets (e.g. from a saved config.yaml) and ``device``
    instead of ``MODEL.DEVICE`` when given."""
    cfg = load_config(config_file, opts)
    setup_user_coco(cfg)
    cfg.MODEL.DEVICE = device or cfg.MODEL.DEVICE
    cfg.freeze()
    return cfg


def setup(args):
    """The config of a ``train_net.py``-style command line (``--config-file``, the user COCO
    flags, ``opts``), frozen, after Detectron2's ``default_setup`` (logging, output folder)."""
    cfg = load_config(args.config_file, args.opts)
    setup_user_coco(cfg, args)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
