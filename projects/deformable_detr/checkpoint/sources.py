"""Reading checkpoint files of other code bases, with errors that name the file and the problem."""

import argparse
import os
import pickle
import re
import zipfile
from typing import Dict

import torch

__all__ = ["CheckpointConversionError", "load_source_state_dict"]


class CheckpointConversionError(ValueError):
    """The input cannot be converted: unreadable, another model, or inconsistent with the config."""


def _short_list(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _top_level_names(state_dict) -> str:
    return _short_list({k.split(".")[0] for k in state_dict})


def load_source_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """
    Read the tensors of an official ``.pth`` (``{"model": ..., "optimizer": ..., "args": ...}``),
    a HuggingFace ``pytorch_model.bin`` or ``model.safetensors``, or a bare state dict.
    """
    if not os.path.isfile(path):
        raise CheckpointConversionError(f"Input checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise CheckpointConversionError(
                f"Cannot read {path!r} as safetensors: {error}. The file is corrupt or truncated."
            ) from error
    try:
        # Official checkpoints carry their argparse.Namespace; nothing else needs unpickling.
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported_global = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsupported_global is None:
            raise CheckpointConversionError(
                f"Cannot read checkpoint {path!r}: the file is corrupt, truncated or not a "
                "PyTorch checkpoint."
            ) from error
        raise CheckpointConversionError(
            f"{path!r} holds a Python object of type {unsupported_global.group(1)}, which is not "
            "unpickled for safety. If you trust the file, keep only its weights: "
            "torch.save({'model': torch.load(path, weights_only=False)['model']}, new_path)"
        ) from error
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile) as error:
        raise CheckpointConversionError(
            f"Cannot read checkpoint {path!r}: {error}. The file is corrupt, truncated or not a "
            "PyTorch checkpoint."
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointConversionError(f"{path!r} holds no state dict (got {type(loaded)})")
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointConversionError(
            f"{path!r} is not a model state dict: non-tensor entries {_short_list(not_tensors)}"
        )
    return dict(loaded)
