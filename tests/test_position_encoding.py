import math

import pytest
import torch

from deformable_detr.modeling.position_encoding import PositionEmbeddingSine


def test_shape_and_range():
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    pos = PositionEmbeddingSine(16)(mask)
    assert pos.shape == (2, 32, 5, 7) and pos.dtype == torch.float32
    assert pos.abs().max() <= 1.0


def test_matches_formula_for_one_pixel():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    num_pos_feats, temperature = 8, 10000.0
    pos = PositionEmbeddingSine(num_pos_feats, temperature)(mask)
    y, x = 2, 3
    y_embed = (y + 1 - 0.5) / (4 + 1e-6) * 2 * math.pi
    x_embed = (x + 1 - 0.5) / (6 + 1e-6) * 2 * math.pi
    for i in range(num_pos_feats):
        freq = temperature ** (2 * (i // 2) / num_pos_feats)
        trig = math.sin if i % 2 == 0 else math.cos
        assert pos[0, i, y, x].item() == pytest.approx(trig(y_embed / freq), abs=1e-5)
        x_value = pos[0, num_pos_feats + i, y, x].item()
        assert x_value == pytest.approx(trig(x_embed / freq), abs=1e-5)


def test_normalized_over_valid_region_only():
    # An image padded on the right/bottom gets the same encoding on its valid part as unpadded.
    enc = PositionEmbeddingSine(8)
    padded = torch.zeros(1, 6, 8, dtype=torch.bool)
    padded[:, 4:, :] = True
    padded[:, :, 5:] = True
    alone = torch.zeros(1, 4, 5, dtype=torch.bool)
    assert torch.allclose(enc(padded)[..., :4, :5], enc(alone), atol=1e-6)


def test_rejects_non_bool_mask():
    with pytest.raises(ValueError, match="mask"):
        PositionEmbeddingSine(8)(torch.zeros(1, 4, 4))
