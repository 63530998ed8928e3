"""repsim.sketch: row batches and results, as compare and layer_sketch use them."""

import warnings

import numpy as np
import pytest

from repsim import cka, sketch


def _said(call, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(*args, **kwargs)
    return [str(w.message) for w in caught if "dropping" in str(w.message)]


def test_a_short_last_batch_is_dropped_with_the_same_one_warning_by_compare_and_layer_sketch():
    # layer_sketch dropped the last 3 rows of 60 silently, where compare warned.
    x = np.random.default_rng(0).standard_normal((60, 5))
    kw = {"estimator": "minibatch", "batch_size": 19}
    by_compare = _said(cka.compare, [x], [x[:, :3]], **kw)
    by_sketch = _said(cka.layer_sketch, x, **kw)
    assert len(by_compare) == 1 and by_sketch == by_compare
    assert by_sketch[0].startswith("dropping 3 of 60 rows (the last, short random batch)")
    assert _said(cka.layer_sketch, x, estimator="minibatch", batch_size=14) == []  # 4 left
    assert len(sketch.batches(60, "minibatch", 19, 0)) == 3  # 19, 19, 19: 3 rows left out


def test_new_result_keeps_the_settings_without_warning_of_the_batches():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sketch.new_result(["a"], ["b"], "linear", "minibatch", 60, 1.0, 19, 0)
    assert (res.batch_size, res.n_batches) == (19, 3)


def test_sketch_size_takes_layer_sketchs_default_batch_size_and_refuses_unknown_estimators():
    # sketch_size(n, "minibatch") raised a TypeError where layer_sketch uses batches of 1,024,
    # and an unknown estimator was sized as the debiased one.
    x = np.random.default_rng(0).standard_normal((1030, 2))
    want = 1024 * 1023 // 2 + 6 * 5 // 2  # a batch of 1,024 and the last 6 rows
    assert sketch.sketch_size(1030, "minibatch") == cka.layer_sketch(x).numel() == want
    with pytest.raises(ValueError, match="estimator='bogus' is unknown"):
        sketch.sketch_size(100, "bogus")


def test_a_warning_given_once_per_layer_is_recorded_and_shown_once():
    """The store path records each layer's sketch warnings; a short last batch warned by
    every layer's sketch was shown, and kept in the result's `warnings`, once per layer."""
    from repsim.errors import recorded

    def per_layer():
        for _ in range(3):
            warnings.warn("the last batch has 2 rows", RuntimeWarning, stacklevel=2)
        warnings.warn("another", RuntimeWarning, stacklevel=2)
        return 7

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        value, said = recorded(per_layer)
    assert value == 7 and said == ["the last batch has 2 rows", "another"]
    assert [str(w.message) for w in shown] == said
