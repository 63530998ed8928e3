"""repsim.features: the feature sets every comparison reads."""

import numpy as np
import pytest

from repsim.features import feature_set


def test_a_layer_given_as_a_nested_list_is_named_as_one():
    # A list of rows was reported as "has shape ()", which it has not: it has no shape at all.
    rows = np.arange(6.0).reshape(3, 2).tolist()
    with pytest.raises(ValueError, match=r"layer 'x' is a list.*np\.asarray"):
        feature_set({"x": rows}, "a")


def test_a_pandas_frame_is_read_by_rows_as_its_array_is():
    # A DataFrame has .shape and row slicing, but no .dtype (the default minibatch estimator
    # raised AttributeError) and df[idx] selects columns, not rows (a minibatch's rows).
    pd = pytest.importorskip("pandas")
    from repsim.cka import cka_matrix

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 30))
    y = x[:, :5] + rng.standard_normal((40, 5))
    want = cka_matrix([x], [y], estimator="minibatch", batch_size=10)
    got = cka_matrix([pd.DataFrame(x)], {"y": pd.DataFrame(y)}, estimator="minibatch",
                     batch_size=10)
    np.testing.assert_array_equal(got, want)


def test_a_layer_of_a_closed_store_says_the_store_is_closed(tmp_path):
    # Features taken inside `with Store(path) as s:` and compared after it raised h5py's
    # RuntimeError "Unable to synchronously get dataspace (identifier is not of specified type)".
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "s.h5", "w") as f:
        layer = f.create_dataset("x", data=np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"layer 'x' .* closed.*inside the `with"):
        feature_set({"x": layer}, "a")
