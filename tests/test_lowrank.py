"""Effective rank (Roy & Vetterli 2007) of the projection_rank figure kind: known answers."""

import numpy as np
import pytest

from repsim.figures.lowrank import effective_rank, matrix_effective_rank


@pytest.mark.parametrize("k", [1, 3, 7])
def test_k_equal_singular_values_give_k(k):
    assert effective_rank(np.r_[np.full(k, 2.5), np.zeros(4)]) == pytest.approx(k, rel=1e-12)


def test_a_zero_matrix_has_effective_rank_zero_not_one():
    # No non-zero singular value: the entropy of an empty distribution, exp(0) = 1, was
    # reported, the rank of a matrix with one direction.
    assert effective_rank(np.zeros(5)) == 0.0
    assert matrix_effective_rank(np.zeros((4, 6))) == 0.0
