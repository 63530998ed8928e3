"""Weights files (repsim.weights): reading one safely."""

import pytest
import torch

from repsim.errors import UserError
from repsim.weights import read_state_dict


def test_a_mapping_whose_keys_are_not_names_is_refused_in_one_line(tmp_path):
    # torch.load reads {0: tensor} as well as {"w": tensor}; stripping the "module." prefix
    # then raised AttributeError ('int' object has no attribute 'removeprefix').
    path = tmp_path / "int_keys.pt"
    torch.save({0: torch.zeros(1), "w": torch.ones(1)}, path)
    with pytest.raises(UserError, match=r"1 of 2 keys are not parameter names \(e\.g\. 0\)"):
        read_state_dict(path)
