"""repsim.seeds: the lists of weights files that make a comparison over seeds."""

import pytest

from repsim.compare import CKAConfig
from repsim.errors import UserError
from repsim.seeds import run_cka_seeds


def test_a_weights_file_listed_twice_is_refused_not_its_own_seed_ceiling():
    # a.pt twice made the pair (a.pt, a.pt) a "seed pair": a seed ceiling of exactly 1 from a
    # file compared with itself, and a mean and seed_sd that counted one seed twice.
    cfg = CKAConfig(a="vit_cifar", b="resnet18_cifar", weights_a="a.pt,b.pt,./a.pt")
    with pytest.raises(UserError, match=r"weights_a='a.pt,b.pt,./a.pt' lists a.pt twice"):
        run_cka_seeds(cfg)


def test_a_seed_list_without_files_is_a_user_error_not_an_index_error():
    cfg = CKAConfig(a="vit_cifar", b="resnet18_cifar", weights_a=" , ", weights_b="a.pt,b.pt")
    with pytest.raises(UserError, match=r"weights_a=' , ' names no weights file"):
        run_cka_seeds(cfg)
