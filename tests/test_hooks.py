"""repsim.extract on a user's module (repsim.hooks): the inputs a notebook gives it."""

import numpy as np
import pytest
import torch
from torch import nn

import repsim
from repsim.errors import UserError


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).to(dtype)


def test_float64_numpy_images_feed_a_float32_module_as_float32():
    # numpy's default dtype is float64; torch raised "Input type (double) and bias type (float)
    # should be the same" from inside the model.
    net = _net()
    x = np.random.default_rng(0).random((5, 3, 8, 8))
    got = repsim.extract(net, x, layers="0")["0"]
    want = net(torch.from_numpy(x).float()).detach().flatten(1).numpy()
    np.testing.assert_array_equal(got, want)


def test_float32_images_feed_a_float64_module_as_float64():
    net = _net(torch.float64)
    x = torch.rand(4, 3, 8, 8)
    got = repsim.extract(net, x, layers="0")["0"]
    want = net(x.double()).detach().flatten(1).float().numpy()
    np.testing.assert_array_equal(got, want)


def test_uint8_images_into_a_float_module_are_refused_in_one_line():
    # Cast silently, 0-255 pixels would pass for the module's 0-1 inputs: refused, with the fix.
    x = np.zeros((2, 3, 8, 8), np.uint8)
    with pytest.raises(UserError, match=r"torch\.uint8.*torch\.float32.*/ 255"):
        repsim.extract(_net(), x, layers="0")


def test_integer_inputs_reach_a_module_that_takes_them():
    # Token ids into an Embedding: integers are the module's own input, never cast.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 3), nn.Flatten())
    ids = np.array([[1, 2], [3, 4], [5, 6]])
    got = repsim.extract(net, ids, layers="0")["0"]
    np.testing.assert_array_equal(got, net(torch.from_numpy(ids)).detach().flatten(1).numpy())


@pytest.mark.parametrize("images", ["images/", 3.5, None])
def test_images_that_are_no_batches_are_one_user_error(images):
    # A folder's name, a number or None raised torch's TypeError ("new(): invalid data type
    # 'str'", "'float' object is not iterable").
    with pytest.raises(UserError, match=r"images=.*valid: a tensor"):
        repsim.extract(_net(), images, layers="0")


def test_mean_of_a_volume_pools_every_position_not_flattens():
    # reduce="mean" of a Conv3d's (b, C, D, H, W) output silently returned the flattened
    # (b, C*D*H*W) rows, as if "flatten" had been asked for.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 4, 3))
    x = torch.rand(3, 2, 5, 6, 6)
    got = repsim.extract(net, x, layers="0", reduce="mean")["0"]
    np.testing.assert_allclose(got, net(x).detach().mean((2, 3, 4)).numpy(), rtol=1e-6)


def test_images_in_an_hdf5_dataset_are_read_in_batches_of_rows(tmp_path):
    # An h5py dataset iterates image by image: each image went in as a "batch" (its channels
    # taken for samples), and the row check blamed the layer ("gave 4 rows for a batch of 3").
    h5py = pytest.importorskip("h5py")
    x = np.random.default_rng(0).random((5, 3, 8, 8)).astype(np.float32)
    with h5py.File(tmp_path / "images.h5", "w") as f:
        f["x"] = x
        got = repsim.extract(_net(), f["x"], layers="0", batch_size=2)["0"]
    np.testing.assert_array_equal(got, repsim.extract(_net(), x, layers="0", batch_size=2)["0"])


def test_a_module_without_parameters_runs_where_its_inputs_are(monkeypatch):
    # With no parameter to say where it runs, its CPU inputs were sent to a GPU when there was
    # one, away from the plain tensors the module holds (a fixed random projection).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    w = torch.rand(12, 2)

    class Projection(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = nn.Flatten()

        def forward(self, x):
            return self.flat(x) @ w

    x = torch.rand(3, 3, 2, 2)
    got = repsim.extract(Projection(), x, layers="flat")["flat"]
    np.testing.assert_array_equal(got, x.flatten(1).numpy())


def test_mean_of_tokens_that_are_all_prefix_is_refused_not_nan():
    # A (b, 1, D) output inside a ViT (timm's attention pooling, attn_pool.mlp) has no token
    # after the class token: reduce='mean' averaged none and returned NaN rows.
    from repsim.hooks import ReductionError, reduce

    with pytest.raises(ReductionError, match=r"\(2, 1, 4\) have no patch tokens; use 'flatten'"):
        reduce(torch.rand(2, 1, 4), "mean", n_prefix=1)
