import importlib

import pytest

from deformable_detr.layers import ms_deform_attn_pytorch


@pytest.fixture
def op_calls(monkeypatch):
    """The arguments of every ``ms_deform_attn`` call that ``MSDeformAttn`` makes in the test,
    the op replaced by its reference (the package re-exports the op under the module file's own
    name: the file's is patched)."""
    module_file = importlib.import_module("deformable_detr.layers.ms_deform_attn")
    received = []

    def spy(*args):
        received.append(args)
        return ms_deform_attn_pytorch(*args)

    monkeypatch.setattr(module_file, "ms_deform_attn", spy)
    return received
