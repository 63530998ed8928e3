"""Weights files (repsim.weights): reading one safely."""

import pytest
import torch

from repsim.errors import UserError
from repsim.weights import load_into, read_state_dict


def test_a_mapping_whose_keys_are_not_names_is_refused_in_one_line(tmp_path):
    # torch.load reads {0: tensor} as well as {"w": tensor}; stripping the "module." prefix
    # then raised AttributeError ('int' object has no attribute 'removeprefix').
    path = tmp_path / "int_keys.pt"
    torch.save({0: torch.zeros(1), "w": torch.ones(1)}, path)
    with pytest.raises(UserError, match=r"1 of 2 keys are not parameter names \(e\.g\. 0\)"):
        read_state_dict(path)


def test_a_model_whose_own_keys_start_with_module_loads_its_own_file(tmp_path):
    # A user's wrapper (self.module = backbone) saved its state dict; the DDP "module."
    # prefix was stripped from every key, so the file no longer fitted the very model.
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(3, 2)

    src, dst = Wrap(), Wrap()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    sd, _ = read_state_dict(tmp_path / "w.pt")
    load_into(dst, sd, tmp_path / "w.pt", "wrap")
    assert torch.equal(dst.module.weight, src.module.weight)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.module."])
def test_a_data_parallel_or_compiled_prefix_is_stripped(tmp_path, prefix):
    # torch.compile(model).state_dict() names every key "_orig_mod.<key>": it was refused.
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    torch.save({prefix + k: v for k, v in src.state_dict().items()}, tmp_path / "d.pt")
    sd, _ = read_state_dict(tmp_path / "d.pt")
    load_into(dst, sd, tmp_path / "d.pt", "linear")
    assert torch.equal(dst.weight, src.weight)
