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


def test_activation_ranks_are_those_of_the_model_in_eval_mode():
    """The activation ranks ran the model in whatever mode it came in: a user's model in
    train mode (dropout on) gave other ranks on every call. They are of the eval-mode model,
    and its mode comes back."""
    import torch
    from torch import nn

    from repsim.figures.lowrank import _activation_ranks

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.drop, self.attn = nn.Dropout(0.5), nn.Module()
            self.attn.qkv = nn.Linear(d, 3 * d)

        def forward(self, x):
            return x + self.attn.qkv(self.drop(x))[..., :x.shape[-1]]

    class Tiny(nn.Module):
        embed_dim = 4

        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(4), Block(4))

        def forward(self, x):
            return self.blocks(x)

    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(6, 5, 4)
    want = _activation_ranks(model.eval(), x, batch_size=4)
    model.train()
    np.testing.assert_allclose(_activation_ranks(model, x, batch_size=4), want, rtol=1e-12)
    assert model.training and model.blocks[0].drop.training


def test_a_model_without_attention_blocks_is_refused_in_one_line():
    """models = ["resnet18_cifar"] in a projection_rank spec failed as "AttributeError:
    'ResNet' object has no attribute 'blocks' (a bug? ...)"; it is a UserError naming the
    model and what the kind reads."""
    from types import SimpleNamespace

    from torch import nn

    from repsim.errors import UserError
    from repsim.figures.lowrank import build_figure

    ref = SimpleNamespace(model="resnet18_cifar", display=lambda: "ResNet-18")
    ctx = SimpleNamespace(name="ranks", model_ref=lambda m, spec: ref,
                          model=lambda r: (nn.Sequential(nn.Linear(2, 2)), {}))
    with pytest.raises(UserError, match=r"ranks: ResNet-18 .*Sequential.*Vision Transformer"):
        build_figure({"models": ["resnet18_cifar"]}, ctx)
