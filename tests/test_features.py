"""repsim.features: the feature sets every comparison reads."""

import numpy as np
import pytest

from repsim.features import feature_set


def test_a_layer_given_as_a_nested_list_is_named_as_one():
    # A list of rows was reported as "has shape ()", which it has not: it has no shape at all.
    rows = np.arange(6.0).reshape(3, 2).tolist()
    with pytest.raises(ValueError, match=r"layer 'x' is a list.*np\.asarray"):
        feature_set({"x": rows}, "a")
