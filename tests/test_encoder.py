"""Padding for the encoder and decoder passes: the ids and the mask, on either side."""

from __future__ import annotations

import torch

from workers.models.encoder import pad


def test_rows_are_padded_on_the_right_for_encoders_and_on_the_left_for_decoders() -> None:
    rows = [[101, 7, 8, 102], [101, 102], [5]]
    ids, mask = pad(rows, 0, torch.device("cpu"))
    assert ids.tolist() == [[101, 7, 8, 102], [101, 102, 0, 0], [5, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    ids, mask = pad(rows, 9, torch.device("cpu"), left=True)
    assert ids.tolist() == [[101, 7, 8, 102], [9, 9, 101, 102], [9, 9, 9, 5]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
