import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(2)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def layers(rng):
    """Three correlated 'layers' over the same 60 samples, with different widths."""
    base = rng.standard_normal((60, 16))
    return [
        base @ rng.standard_normal((16, 10)) + 0.5 * rng.standard_normal((60, 10)),
        np.tanh(base @ rng.standard_normal((16, 24))) + 3.0,  # large mean: centring matters
        rng.standard_normal((60, 7)),
    ]
