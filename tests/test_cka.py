"""CKA engine: agreement with an independent reference, invariances, estimators, errors."""

import warnings

import h5py
import numpy as np
import pytest
import reference as ref
import torch

from repsim import cka, sketch

KERNELS = ["linear", "rbf"]
FULL = ["biased", "debiased"]


# ------------------------------------------------------------------ agreement with the reference


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", FULL)
@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-6), (np.float32, 1e-4)])
def test_matrix_matches_the_float64_reference(layers, kernel, estimator, dtype, atol):
    a = [x.astype(dtype) for x in layers]
    b = [a[2], a[0]]
    got = cka.cka_matrix(a, b, kernel=kernel, estimator=estimator, threshold=0.8)
    want = np.array([[ref.cka(x.astype(np.float64), y.astype(np.float64), kernel,
                              estimator == "debiased", 0.8) for y in b] for x in a])
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("kernel", KERNELS)
def test_minibatch_matches_reference(layers, kernel):
    n = layers[0].shape[0]
    rows = sketch.sample_rows(n, sketch.BANDWIDTH_SAMPLE)
    med = [np.median(np.sum((x[rows][:, None] - x[rows][None]) ** 2, -1)) for x in layers]
    got = cka.cka_matrix(layers, layers[:2], kernel=kernel, estimator="minibatch",
                         batch_size=16)
    batches = cka.minibatches(n, 16)
    want = np.array([[ref.minibatch_cka(x, y, batches, kernel, 1.0, med[i], med[j])
                      for j, y in enumerate(layers[:2])] for i, x in enumerate(layers)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("estimator", FULL)
@pytest.mark.parametrize("kernel", KERNELS)
def test_blockwise_equals_single_block(layers, kernel, estimator):
    # A tiny memory budget forces many row blocks (off-diagonal blocks, syrk triangles).
    whole = cka.compare(layers, layers[:2], kernel=kernel, estimator=estimator).matrix
    blocked = cka.compare(layers, layers[:2], kernel=kernel, estimator=estimator,
                          memory_budget=10_000).matrix
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-12)


def test_a_symmetric_gram_built_in_strips_matches_the_reference():
    # 600 rows: strips of 256, 256 and a short one of 88, mirrored below the diagonal
    x = np.random.default_rng(0).standard_normal((600, 40))
    t = torch.from_numpy(x)
    np.testing.assert_allclose(cka.gram(t).numpy(), ref.gram_linear(x), rtol=0, atol=1e-11)
    sq = np.median(np.sum((x[:, None] - x[None]) ** 2, -1))
    np.testing.assert_allclose(cka.gram(t, kernel="rbf", sigma2=sq).numpy(),
                               ref.gram_rbf(x), rtol=0, atol=1e-12)


def test_pair_functions_match_reference(layers):
    x, y = layers[0], layers[1]
    assert cka.linear_cka(x, y, debiased=False) == pytest.approx(ref.cka(x, y), abs=1e-9)
    assert cka.linear_cka(x, y) == pytest.approx(ref.cka(x, y, debiased=True), abs=1e-9)
    assert cka.rbf_cka(x, y, threshold=2.0, debiased=False) == pytest.approx(
        ref.cka(x, y, "rbf", threshold=2.0), abs=1e-9)
    assert cka.rbf_cka(x, y) == pytest.approx(ref.cka(x, y, "rbf", debiased=True), abs=1e-9)


def test_the_default_estimator_is_minibatch_of_1024_that_is_debiased_up_to_1024_rows(layers):
    res = cka.compare(layers, layers[:2])
    assert (res.estimator, res.batch_size, res.n_batches) == ("minibatch", 1024, 1)
    want = [[ref.cka(x, y, debiased=True) for y in layers[:2]] for x in layers]
    np.testing.assert_allclose(res.matrix, want, atol=1e-12)
    np.testing.assert_array_equal(cka.cka_matrix(layers, layers[:2]), res.matrix)


@pytest.mark.parametrize("estimator", FULL)
def test_building_blocks_give_the_reference_hsic(layers, estimator):
    x, y = layers[0], layers[1]
    n = x.shape[0]
    k, l = (cka.gram(torch.from_numpy(v)) for v in (x, y))
    got = float((cka.centre(k, estimator) * cka.centre(l, estimator)).sum())
    if estimator == "biased":
        want = ref.hsic_biased(ref.gram_linear(x), ref.gram_linear(y)) * (n - 1) ** 2
    else:
        want = ref.hsic_unbiased(ref.gram_linear(x), ref.gram_linear(y)) * n * (n - 3)
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("call, match", [
    (lambda k: cka.gram(k, kernel="poly"), "kernel='poly' is unknown"),
    (lambda k: cka.gram(k, kernel="rbf"), "sigma2"),
    (lambda k: cka.centre(k @ k.T, "unbiased"), "estimator='unbiased' is unknown")])
def test_building_blocks_refuse_unknown_settings_with_a_value_error(layers, call, match):
    with pytest.raises(ValueError, match=match):  # not a TypeError, nor a silent U-centring
        call(torch.from_numpy(layers[0]))


def test_torch_inputs_give_numpy_results(layers):
    t = [torch.from_numpy(x) for x in layers]
    np.testing.assert_allclose(cka.cka_matrix(t, t), cka.cka_matrix(layers, layers), atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_tensors_that_require_grad_work_like_any_tensor(layers, kernel):
    # e.g. a model's outputs computed outside torch.no_grad()
    t = [torch.from_numpy(x).requires_grad_() for x in layers]
    want = cka.cka_matrix(layers, layers[:2], kernel=kernel)
    np.testing.assert_allclose(cka.cka_matrix(t, t[:2], kernel=kernel), want, atol=1e-12)
    assert not cka.layer_sketch(t[0]).requires_grad


def test_named_layers_keep_their_names(layers):
    res = cka.compare({"x": layers[0], "y": layers[1]}, {"z": layers[2]})
    assert res.layers_a == ["x", "y"] and res.layers_b == ["z"]
    assert res.matrix.shape == (2, 1)


# ------------------------------------------------------------------ invariances


@pytest.mark.parametrize("kernel", KERNELS)
def test_orthogonal_transform_and_isotropic_scaling_leave_cka_unchanged(rng, layers, kernel):
    x, y = layers[0], layers[1]
    q, _ = np.linalg.qr(rng.standard_normal((x.shape[1], x.shape[1])))
    base = cka.cka_matrix([x], [y], kernel=kernel)[0, 0]
    assert cka.cka_matrix([x @ q], [y], kernel=kernel)[0, 0] == pytest.approx(base, abs=1e-10)
    assert cka.cka_matrix([7.5 * x], [y], kernel=kernel)[0, 0] == pytest.approx(base, abs=1e-10)


def test_general_invertible_map_changes_linear_cka(rng, layers):
    x, y = layers[0], layers[1]
    a = np.diag(np.linspace(0.1, 10, x.shape[1]))  # invertible, far from orthogonal
    assert abs(cka.linear_cka(x @ a, y) - cka.linear_cka(x, y)) > 1e-2


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", FULL)
def test_self_similarity_is_one_and_symmetric(layers, kernel, estimator):
    m = cka.cka_matrix(layers, layers, kernel=kernel, estimator=estimator)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
    np.testing.assert_array_equal(m, m.T)


def test_same_object_and_equal_copy_agree(layers):
    copy = [x.copy() for x in layers]
    np.testing.assert_allclose(cka.cka_matrix(layers, layers), cka.cka_matrix(layers, copy),
                               atol=1e-12)


# ------------------------------------------------------------------ estimators


@pytest.mark.parametrize("kernel", KERNELS)
def test_minibatch_with_batch_size_n_equals_debiased(layers, kernel):
    n = layers[0].shape[0]
    mb = cka.cka_matrix(layers, layers, kernel=kernel, estimator="minibatch", batch_size=n)
    db = cka.cka_matrix(layers, layers, kernel=kernel, estimator="debiased")
    np.testing.assert_allclose(mb, db, atol=1e-10)


def test_minibatch_approaches_full_data_value(rng):
    def sample(n):
        z = rng.standard_normal((n, 5))
        return z @ rng.standard_normal((5, 20)), np.tanh(z) @ rng.standard_normal((5, 12))

    # The large-n, full-data value is the target; the minibatch error must shrink with n.
    x, y = sample(6000)
    target = cka.linear_cka(x, y)
    errs = []
    for n in (200, 6000):
        est = cka.cka_matrix([x[:n]], [y[:n]], estimator="minibatch", batch_size=100)[0, 0]
        errs.append(abs(est - target))
    assert errs[1] < errs[0] and errs[1] < 0.01


def test_debiased_near_zero_for_independent_data_biased_is_not(rng):
    x, y = rng.standard_normal((32, 100)), rng.standard_normal((32, 100))
    assert abs(cka.linear_cka(x, y, debiased=True)) < 0.1
    assert cka.linear_cka(x, y, debiased=False) > 0.5


def test_negative_debiased_values_are_not_clamped(rng):
    vals = [cka.linear_cka(rng.standard_normal((8, 50)), rng.standard_normal((8, 50)),
                           debiased=True) for _ in range(20)]
    assert min(vals) < 0


def test_accumulator_merge_equals_single_accumulator(layers):
    one = cka.MinibatchCKA()
    left, right = cka.MinibatchCKA(), cka.MinibatchCKA()
    for k, a in enumerate(range(0, 60, 12)):
        batch_a = [x[a:a + 12] for x in layers]
        batch_b = [layers[0][a:a + 12]]
        one.update(batch_a, batch_b)
        (left if k % 2 else right).update(batch_a, batch_b)
    np.testing.assert_allclose(left.merge(right).compute(), one.compute(), atol=1e-12)
    assert left.n_samples_ == 60 and left.n_batches_ == 5


def test_accumulator_sums_are_float64_and_addable(layers):
    acc = cka.MinibatchCKA()
    assert acc.update([layers[0][:20].astype(np.float32)], [layers[1][:20]]) is acc
    sums = acc.sums()
    assert sums["hsic_ab"].dtype == torch.float64
    twice = cka.MinibatchCKA()
    twice.update([layers[0][:20]], [layers[1][:20]])
    twice.update([layers[0][:20]], [layers[1][:20]])
    np.testing.assert_allclose(twice.sums()["hsic_ab"], 2 * sums["hsic_ab"], rtol=1e-6)


def test_short_last_batch_is_dropped_with_warning(layers):
    with pytest.warns(RuntimeWarning, match="dropping 3 of 60 rows"):
        got = cka.cka_matrix(layers, layers, estimator="minibatch", batch_size=19)  # 3 left
    batches = cka.minibatches(60, 19)
    assert [len(b) for b in batches] == [19, 19, 19]
    want = [[ref.minibatch_cka(x, y, batches) for y in layers] for x in layers]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_minibatches_are_a_seeded_random_partition():
    batches = cka.minibatches(103, 25, seed=3)
    assert [len(b) for b in batches] == [25, 25, 25, 25]  # the 3 left over are dropped
    rows = np.concatenate(batches)
    assert len(set(rows.tolist())) == 100 and all(np.all(np.diff(b) > 0) for b in batches)
    assert all(np.array_equal(a, b) for a, b in zip(batches, cka.minibatches(103, 25, seed=3)))
    assert not np.array_equal(batches[0], cka.minibatches(103, 25, seed=4)[0])
    assert not np.array_equal(batches[0], np.arange(25))  # not consecutive rows


def test_minibatch_on_class_sorted_rows_agrees_with_debiased(rng):
    # Rows sorted by class, as in a store: a shared class signal plus independent noise.
    # Consecutive batches of 100 would each hold one class, whose signal centring removes
    # (CKA of noise, about 0); random batches see every class, as the full data does.
    n, classes = 1000, 10
    signal = rng.standard_normal((classes, 30))[np.repeat(np.arange(classes), n // classes)]
    x = signal @ rng.standard_normal((30, 40)) + 0.5 * rng.standard_normal((n, 40))
    y = signal @ rng.standard_normal((30, 50)) + 0.5 * rng.standard_normal((n, 50))
    debiased = cka.linear_cka(x, y, debiased=True)
    mini = cka.cka_matrix([x], [y], estimator="minibatch", batch_size=100)[0, 0]
    consecutive = ref.minibatch_cka(x, y, [range(a, a + 100) for a in range(0, n, 100)])
    assert debiased > 0.5 and abs(consecutive) < 0.1  # the trap this test guards
    assert mini == pytest.approx(debiased, abs=0.05)


def test_short_last_batch_of_four_is_used(layers):
    res = cka.compare(layers, layers, estimator="minibatch", batch_size=14)  # 60 = 4*14 + 4
    assert res.n_batches == 5


def test_rbf_minibatch_records_bandwidth_rows(layers):
    res = cka.compare(layers, layers[:1], kernel="rbf", estimator="minibatch", batch_size=20)
    assert res.bandwidth_rows == list(range(60))
    assert len(res.bandwidths_a) == 3 and all(b > 0 for b in res.bandwidths_a)


def test_bandwidth_sample_is_fixed_and_sorted():
    a, b = sketch.sample_rows(5000, 1000), sketch.sample_rows(5000, 1000)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 1000 and np.all(np.diff(a) > 0)


# ------------------------------------------------------------------ bad input


def test_different_n_is_rejected(layers):
    with pytest.raises(ValueError, match="rows"):
        cka.cka_matrix(layers, [layers[0][:50]])


def test_too_few_rows_for_unbiased(rng):
    x = rng.standard_normal((3, 5))
    with pytest.raises(ValueError, match="at least 4 rows"):
        cka.cka_matrix([x], [x], estimator="debiased")


def test_non_finite_values_name_the_layer(layers):
    bad = layers[1].copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"'b\[1\]'.*row 7"):
        cka.cka_matrix(layers, [layers[0], bad])


def test_non_finite_values_in_a_minibatch_give_the_row_of_the_data(layers):
    bad = layers[1].copy()
    bad[37, 2] = np.inf
    with pytest.raises(ValueError, match=r"'b\[0\]'.*row 37"):
        cka.cka_matrix(layers, [bad], estimator="minibatch", batch_size=20)


@pytest.mark.parametrize("settings, match", [
    (dict(kernel="poly"), "kernel='poly' is unknown; valid kernels: linear, rbf"),
    (dict(estimator="fast"), "estimator='fast' is unknown.*biased, debiased"),
    (dict(estimator="minibatch", batch_size=3), "batch_size"),
    (dict(estimator="minibatch", batch_size=8.5), "batch_size")])
def test_invalid_settings_are_refused(layers, settings, match):
    with pytest.raises(ValueError, match=match):
        cka.cka_matrix(layers, layers, **settings)


def test_single_matrix_instead_of_sequence_is_rejected(layers):
    with pytest.raises(ValueError, match="sequence of matrices"):
        cka.cka_matrix(layers[0], layers)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
def test_zero_variance_layer_gives_nan_and_warning(layers, kernel, estimator):
    const = np.full((60, 4), 2.5)
    with pytest.warns(RuntimeWarning, match=r"'b\[1\]' has zero variance"):
        m = cka.cka_matrix(layers, [layers[0], const], kernel=kernel, estimator=estimator,
                           batch_size=20)
    assert np.isnan(m[:, 1]).all()
    assert np.isfinite(m[:, 0]).all()


def test_no_warning_for_healthy_layers(layers):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cka.cka_matrix(layers, layers)


# ------------------------------------------------------------------ memory and devices


@pytest.mark.parametrize("kernel", KERNELS)
def test_h5py_sources_streamed_in_blocks_match_in_memory(tmp_path, layers, kernel):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        for i, x in enumerate(layers):
            f.create_dataset(f"l{i}", data=x.astype(np.float32))
    mem = cka.cka_matrix([x.astype(np.float32) for x in layers], layers[:1], kernel=kernel)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        # A budget far below the features' size forces re-reading row blocks from disk.
        got = cka.compare([f[f"l{i}"] for i in range(3)], layers[:1], kernel=kernel,
                          memory_budget=30_000).matrix
    np.testing.assert_allclose(got, mem, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
def test_cuda_inputs_give_cpu_results(layers, estimator):
    gpu = [torch.from_numpy(x).cuda() for x in layers]
    np.testing.assert_allclose(
        cka.cka_matrix(gpu, gpu[:2], estimator=estimator, batch_size=20),
        cka.cka_matrix(layers, layers[:2], estimator=estimator, batch_size=20), atol=1e-10)


@pytest.mark.parametrize("estimator", ["biased", "minibatch"])
def test_inputs_are_left_unchanged(estimator):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 6)) + 5.0
    t = torch.from_numpy(rng.standard_normal((40, 4)) + 2.0)
    x0, t0 = x.copy(), t.clone()
    cka.compare([x], [t], estimator=estimator, batch_size=20 if estimator == "minibatch" else None)
    np.testing.assert_array_equal(x, x0)
    assert torch.equal(t, t0)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
def test_sketches_give_the_engine_result(kernel, estimator):
    rng = np.random.default_rng(4)
    n = 103  # minibatch: batches of 25, 25, 25, 25 and a dropped 3
    fa = [rng.standard_normal((n, 12)), rng.standard_normal((n, 4)) @ rng.standard_normal((4, 9))]
    fb = [fa[0] @ rng.standard_normal((12, 5)) + 0.3 * rng.standard_normal((n, 5))]
    bs = 25 if estimator == "minibatch" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = cka.compare(fa, fb, kernel=kernel, estimator=estimator, batch_size=bs)

    def sketches(feats, meds):
        return [cka.layer_sketch(x, kernel=kernel, estimator=estimator, batch_size=bs,
                                 median_sqdist=m) for x, m in zip(feats, meds)]

    meds_a = ref.bandwidths_a or [None] * 2
    meds_b = ref.bandwidths_b or [None]
    got = cka.cka_from_sketches(sketches(fa, meds_a), sketches(fb, meds_b))
    assert cka.layer_sketch(fa[0], estimator=estimator, batch_size=bs).numel() == \
        sketch.sketch_size(n, estimator, bs)
    np.testing.assert_allclose(got, ref.matrix, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_sketch_of_a_constant_layer_is_exactly_zero(kernel):
    # 0.1 is not a float; a mean-centred constant block would leave rounding residue.
    kw = dict(kernel=kernel, estimator="minibatch", batch_size=10,
              median_sqdist=1.0 if kernel == "rbf" else None)
    sk = cka.layer_sketch(np.full((30, 7), 0.1, dtype=np.float32), **kw)
    assert not sk.any()
    sy = cka.layer_sketch(np.random.default_rng(0).standard_normal((30, 5)), **kw)
    assert np.isnan(cka.cka_from_sketches([sk], [sy])).all()


@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
def test_sketch_ignores_a_large_offset(estimator):
    x = np.random.default_rng(5).standard_normal((60, 8))
    y = np.random.default_rng(6).standard_normal((60, 3))
    bs = 20 if estimator == "minibatch" else None
    ref = cka.cka_matrix([x], [y], estimator=estimator, batch_size=bs)
    got = cka.cka_from_sketches([cka.layer_sketch(x + 1e4, estimator=estimator, batch_size=bs)],
                                [cka.layer_sketch(y, estimator=estimator, batch_size=bs)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_sketch_leaves_float64_input_unchanged(as_tensor):
    x = np.random.default_rng(7).standard_normal((40, 5)) + 3.0
    src = torch.from_numpy(x.copy()) if as_tensor else x.copy()
    cka.layer_sketch(src, estimator="minibatch", batch_size=10)
    np.testing.assert_array_equal(np.asarray(src), x)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_sketch_refuses_non_finite_rows_and_says_where(bad):
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    x[27, 3] = bad
    with pytest.raises(ValueError, match="non-finite values.*row 27"):
        cka.layer_sketch(x, estimator="minibatch", batch_size=10)


@pytest.mark.parametrize("estimator, n", [("biased", 1), ("debiased", 2), ("debiased", 3),
                                          ("minibatch", 3)])
def test_sketch_of_too_few_rows_is_refused_like_compare(estimator, n):
    x = np.arange(2.0 * n).reshape(n, 2) ** 2
    with pytest.raises(ValueError, match=f"needs at least .* rows, got n={n}"):
        cka.compare([x], [x], estimator=estimator)
    with pytest.raises(ValueError, match=f"needs at least .* rows, got n={n}"):
        cka.layer_sketch(x, estimator=estimator)


@pytest.mark.parametrize("scale", [1e-50, 1e40])
@pytest.mark.parametrize("estimator", FULL)
def test_cka_is_scale_invariant_where_the_product_of_self_hsics_would_overflow(rng, scale,
                                                                               estimator):
    # HSIC scales as scale^4: fine in float64, but HSIC_aa * HSIC_bb under- or overflows.
    x = rng.standard_normal((20, 4))
    y = x[:, :2] + rng.standard_normal((20, 2))
    got = cka.cka_matrix([x * scale], [y * scale], estimator=estimator)
    np.testing.assert_allclose(got, cka.cka_matrix([x], [y], estimator=estimator), rtol=1e-12)


def test_normalise_gives_exactly_one_where_the_cross_term_is_the_self_term():
    # sqrt(h * h) == h in float64 (no over- or underflow), sqrt(h) * sqrt(h) is not always.
    h = np.array([2.0, 3.0, 1e-200, 1e200, 0.1])
    assert np.array_equal(sketch.normalise(np.diag(h), h, h).diagonal(), np.ones(5))


@pytest.mark.parametrize("threshold", [1e3, 1e5])
@pytest.mark.parametrize("estimator", FULL)
def test_rbf_with_a_wide_bandwidth_tends_to_linear_cka(rng, threshold, estimator):
    # exp(-d / 2s^2) = 1 - d / 2s^2 + O(s^-4), and centring turns -d/2 into the centred x x':
    # RBF CKA -> linear CKA as threshold -> infinity, up to O(threshold^-2).
    x = rng.standard_normal((40, 5))
    y = x[:, :3] + rng.standard_normal((40, 3))
    got = cka.cka_matrix([x], [y], kernel="rbf", threshold=threshold, estimator=estimator)
    want = cka.cka_matrix([x], [y], estimator=estimator)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_accumulators_of_other_settings_are_not_merged(layers):
    batch = [layers[0][:20]]
    biased = cka.MinibatchCKA(debiased=False).update(batch, batch)
    with pytest.raises(ValueError, match="debiased=True.*debiased=False"):
        cka.MinibatchCKA().update(batch, batch).merge(biased)


@pytest.mark.parametrize("estimator", FULL)
def test_a_large_offset_leaves_the_engine_as_exact_as_its_sketches(rng, estimator):
    # Centring with a rounded column mean leaves a residual offset (1e10 + N(0, 1): ~1e-6);
    # the centring identity must use the actual row sums, not assume them zero.
    x, y = rng.standard_normal((300, 20)) + 1e10, rng.standard_normal((300, 5))
    sk = cka.cka_from_sketches([cka.layer_sketch(x, estimator=estimator)],
                               [cka.layer_sketch(y, estimator=estimator)])
    np.testing.assert_allclose(cka.cka_matrix([x], [y], estimator=estimator), sk, rtol=1e-13)


@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
def test_a_narrow_rbf_bandwidth_warns_once_that_the_grams_are_the_identity(rng, estimator):
    # threshold=0.01: exp(-d^2 / (2e-4 median d^2)) underflows off the diagonal, every Gram is
    # the identity and CKA no longer depends on the data (biased: 1, whatever x and y are).
    x, y = rng.standard_normal((60, 10)), rng.standard_normal((60, 8))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        m = cka.cka_matrix([x, x[:, :5]], [y, x], kernel="rbf", threshold=0.01,
                           estimator=estimator, batch_size=20 if estimator == "minibatch" else None)
    ours = [str(w.message) for w in got if "identity" in str(w.message)]
    assert len(ours) == 1 and "threshold=0.01" in ours[0] and "\n" not in ours[0]
    if estimator == "biased":  # not clamped or altered: the value the Grams give
        np.testing.assert_allclose(m, 1.0, atol=1e-12)


@pytest.mark.parametrize("threshold", [0.5, 1.0, 1e3])
def test_a_usual_rbf_bandwidth_does_not_warn(rng, threshold):
    x = rng.standard_normal((60, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cka.cka_matrix([x, x[:, :5]], [x[:, 5:]], kernel="rbf", threshold=threshold,
                       estimator="debiased")


def test_a_layer_sketch_with_a_narrow_rbf_bandwidth_warns(rng):
    x = rng.standard_normal((40, 10))
    med = cka.rbf_bandwidths([x])[0]
    with pytest.warns(RuntimeWarning, match="threshold=0.01 .* nearly the identity"):
        cka.layer_sketch(x, kernel="rbf", estimator="debiased", threshold=0.01,
                         median_sqdist=med)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cka.layer_sketch(x, kernel="rbf", estimator="debiased", median_sqdist=med)


@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_layer_of_a_self_comparison_has_cka_exactly_one(rng, kernel, estimator):
    # the cross term <K, K> came from a matrix product, the self term from another sum:
    # 1 - 1e-13 and 1 + 2e-15 on the diagonal
    x = rng.standard_normal((120, 20))
    feats = [x, x[:, :10], np.tanh(x)]
    m = cka.cka_matrix(feats, feats, kernel=kernel, estimator=estimator, batch_size=50)
    assert np.array_equal(m.diagonal(), np.ones(3))


@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
def test_sketches_compared_with_themselves_give_exactly_one(rng, estimator):
    # repsim cka's cached path: cross terms from a product, self terms from einsum (1 + 4e-15)
    x = rng.standard_normal((120, 20))
    sk = [cka.layer_sketch(z, estimator=estimator, batch_size=50)
          for z in (x, x[:, :10], np.tanh(x))]
    assert np.array_equal(cka.cka_from_sketches(sk, sk).diagonal(), np.ones(3))


@pytest.mark.parametrize("estimator", FULL)
def test_features_whose_self_hsic_overflows_give_nan_with_a_warning(rng, estimator):
    # x * 1e80: <K, K> ~ 1e320 is infinite in float64, so biased CKA read 0.0, no warning
    x = rng.standard_normal((100, 30))
    y = x[:, :5] + rng.standard_normal((100, 5))
    with pytest.warns(RuntimeWarning, match="overflows float64") as got:
        m = cka.cka_matrix([x * 1e80, x], [y], estimator=estimator)
    assert np.isnan(m[0, 0])
    assert m[1, 0] == pytest.approx(cka.cka_matrix([x], [y], estimator=estimator)[0, 0])
    assert "divide" in str(got[0].message)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_rbf_bandwidths_refuse_non_finite_features(rng, bad):
    x = rng.standard_normal((20, 4))
    x[5, 1] = bad
    with pytest.raises(ValueError, match=r"layer 'a\[1\]' has non-finite"):
        cka.rbf_bandwidths([rng.standard_normal((20, 3)), x])


@pytest.mark.parametrize("estimator", FULL)
def test_features_whose_self_hsic_underflows_warn(rng, estimator):
    # x * 1e-90: <K, K> ~ 1e-350 underflows float64 to 0, so CKA was NaN, without a warning
    x = rng.standard_normal((100, 30))
    y = x[:, :5] + rng.standard_normal((100, 5))
    with pytest.warns(RuntimeWarning, match="underflows float64") as got:
        m = cka.cka_matrix([x * 1e-90, x], [y], estimator=estimator)
    assert np.isnan(m[0, 0]) and "multiply" in str(got[0].message)
    assert m[1, 0] == pytest.approx(cka.cka_matrix([x], [y], estimator=estimator)[0, 0])


def test_sketches_whose_self_hsic_underflows_warn(rng):
    x = rng.standard_normal((100, 30))
    sk = [cka.layer_sketch(z, estimator="debiased") for z in (x * 1e-90, x)]
    with pytest.warns(RuntimeWarning, match="underflows float64"):
        m = cka.cka_from_sketches(sk, sk[1:])
    assert np.isnan(m[0, 0]) and m[1, 0] == pytest.approx(1.0)


def test_minibatch_cka_used_directly_warns_of_a_narrow_rbf_bandwidth(rng):
    x, y = rng.standard_normal((60, 10)), rng.standard_normal((60, 8))
    acc = cka.MinibatchCKA(kernel="rbf", threshold=0.01, median_sqdist_a=cka.rbf_bandwidths([x]),
                           median_sqdist_b=cka.rbf_bandwidths([y]))
    for idx in cka.minibatches(60, 20):
        acc.update([x[idx]], [y[idx]])
    with pytest.warns(RuntimeWarning, match=r"threshold=0.01 .*'a\[0\]'.* nearly the identity"):
        acc.compute()


@pytest.mark.parametrize("shape", [(20,), (20, 3, 2)])
def test_a_layer_sketch_of_no_matrix_is_refused_like_compare(shape):
    # a 1-D layer raised torch's "dimensions must larger than 1", a 3-D one a bmm size error
    x = np.random.default_rng(0).standard_normal(shape)
    with pytest.raises(ValueError, match=r"layer 'x' has shape .* must be a 2-D \(n, p\)"):
        cka.layer_sketch(x)


@pytest.mark.parametrize("med", [[2.0], "2", None, float("inf"), float("nan"), True])
def test_a_layer_sketch_with_no_median_sqdist_number_is_refused(med):
    # rbf_bandwidths' list (one layer's: [2.0]) raised TypeError "can't multiply sequence"
    x = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(ValueError, match=r"median_sqdist=.*one number.*bandwidths\(\[x\]\)"):
        cka.layer_sketch(x, kernel="rbf", median_sqdist=med)


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: [s.reshape(2, -1)]])
def test_sketches_that_are_no_list_of_vectors_are_refused(wrap):
    # one sketch, not [sketch], raised IndexError; a 2-D sketch an einsum error
    x, y = np.random.default_rng(0).standard_normal((2, 20, 3))
    sa, sb = cka.layer_sketch(x), cka.layer_sketch(y)
    with pytest.raises(ValueError, match=r"sketches_a must be a sequence of 1-D sketches"):
        cka.cka_from_sketches(wrap(sa), [sb])


@pytest.mark.parametrize("seed", [None, 1.5, "0", True])
def test_a_batch_seed_that_is_no_whole_number_is_refused(seed):
    # None drew unseeded batches (a different matrix each call, batch_seed None recorded),
    # 1.5 and "0" raised numpy's TypeError, True passed for seed 1
    x, y = np.random.default_rng(0).standard_normal((2, 40, 3))
    with pytest.raises(ValueError, match=f"batch_seed={seed!r} must be a whole number >= 0"):
        cka.cka_matrix([x], [y], batch_size=10, batch_seed=seed)
    with pytest.raises(ValueError, match="must be a whole number >= 0"):
        cka.layer_sketch(x, batch_size=10, batch_seed=seed)


@pytest.mark.parametrize("settings, match", [
    (dict(kernel="rbf", threshold="1"), "threshold='1' must be a positive number"),
    (dict(kernel="rbf", threshold=None), "threshold=None must be a positive number"),
    (dict(kernel="rbf", threshold=True), "threshold=True must be a positive number"),
    (dict(batch_size=float("inf")), "batch_size=N, an integer >= 4.*got inf"),
    (dict(batch_size="abc"), "batch_size=N, an integer >= 4.*got 'abc'"),
    (dict(batch_size=[8]), r"batch_size=N, an integer >= 4.*got \[8\]")])
def test_settings_of_the_wrong_kind_are_refused_with_the_settings_message(settings, match):
    # they raised TypeError ('>' not supported), OverflowError and int()'s own ValueError;
    # threshold=True computed with threshold 1
    x, y = np.random.default_rng(0).standard_normal((2, 20, 3))
    with pytest.raises(ValueError, match=match):
        cka.cka_matrix([x], [y], **settings)


def test_an_accumulator_refuses_batches_or_merges_of_other_layers():
    # dicts built in another order (a set of layer names: another order in each process)
    # summed l1's HSIC into l2's cell, silently
    x, y, z = np.random.default_rng(0).standard_normal((3, 20, 3))
    acc = cka.MinibatchCKA().update({"l1": x, "l2": z}, {"m": y})
    with pytest.raises(ValueError, match=r"layers \[\['l2', 'l1'\], \['m'\]\].*had"):
        acc.update({"l2": z, "l1": x}, {"m": y})
    other = cka.MinibatchCKA().update({"l2": z, "l1": x}, {"m": y})
    with pytest.raises(ValueError, match="layers"):
        acc.merge(other)
    assert acc.n_batches_ == 1


def test_an_rbf_accumulator_given_one_number_for_a_layer_list_is_refused():
    # median_sqdist_a=2.0 (one layer's median, not a list) raised "'float' object is not
    # iterable"
    with pytest.raises(ValueError, match=r"one per layer.*rbf_bandwidths.*median_sqdist_a=2.0"):
        cka.MinibatchCKA(kernel="rbf", median_sqdist_a=2.0, median_sqdist_b=[1.0])


@pytest.mark.parametrize("dtype", [np.complex128, object])
def test_features_that_are_no_real_numbers_are_refused(dtype):
    # Complex features lost their imaginary part silently (the CKA of the real parts).
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(dtype)
    with pytest.raises(ValueError, match=r"layer 'a\[0\]' holds .* values; CKA needs real"):
        cka.compare([x], [np.ones((8, 2))])


@pytest.mark.parametrize("budget", ["2GiB", 0, -1, True, 2.5])
def test_a_memory_budget_that_is_no_number_of_bytes_is_refused(budget):
    # "2GiB" raised TypeError deep in the engine; 0 silently meant the default budget.
    x = np.random.default_rng(0).normal(size=(8, 3))
    with pytest.raises(ValueError, match=r"memory_budget=.* is not a number of bytes >= 1"):
        cka.compare([x], [x], memory_budget=budget)


def test_the_engine_has_one_content_version_for_results_and_sketches():
    # Cached results and sketches are keyed on it (repsim.compare), so a fix that changes CKA
    # numbers for the same inputs raises it. It lives in the numpy-only repsim.sketch: the
    # cached path never imports torch.
    assert isinstance(sketch.CONTENT_VERSION, int) and sketch.CONTENT_VERSION >= 1
    assert cka.CONTENT_VERSION == sketch.CONTENT_VERSION


@pytest.mark.parametrize("n, batch_size, match", [
    (100, 2, r"batch_size=N, an integer >= 4.*got 2"),
    (100, True, r"batch_size=N, an integer >= 4.*got True"),
    (100, 256.5, r"batch_size=N, an integer >= 4.*got 256.5"),
    (100.0, 10, r"n=100.0 must be a whole number >= 0"),
    ("100", 10, r"n='100' must be a whole number >= 0"),
    (-1, 10, r"n=-1 must be a whole number >= 0")])
def test_minibatches_of_no_usable_size_are_refused(n, batch_size, match):
    # batch_size=2 or True listed no batch at all (a MinibatchCKA fed from it summed nothing),
    # 256.5 raised range()'s TypeError, n=100.0 numpy's AxisError, n=-1 gave []
    with pytest.raises(ValueError, match=match):
        cka.minibatches(n, batch_size)


def test_minibatches_of_a_whole_float_size_are_those_of_the_int():
    # as compare takes batch_size=256.0 (a config value): the same batches
    assert all(np.array_equal(a, b) for a, b in
               zip(cka.minibatches(50, 8.0), cka.minibatches(50, 8), strict=True))


def test_an_accumulator_used_directly_warns_of_a_zero_variance_layer_once():
    # MinibatchCKA's update/compute (the streaming API) gave its NaN cells silently; only
    # compare warned
    x, const = np.random.default_rng(0).standard_normal((40, 3)), np.full((40, 2), 2.5)
    acc = cka.MinibatchCKA()
    for idx in cka.minibatches(40, 10):
        acc.update({"x": x[idx]}, {"const": const[idx]})
    with pytest.warns(RuntimeWarning) as caught:
        m = acc.compute()
    assert [str(w.message) for w in caught] == ["layer 'const' has zero variance (every row is "
                                                "identical) in every batch; its CKA values are NaN"]
    assert np.isnan(m).all()
    with pytest.warns(RuntimeWarning) as caught:  # compare, through the accumulator: once
        cka.compare({"x": x}, {"const": const}, batch_size=10)
    assert len(caught) == 1


@pytest.mark.parametrize("debiased", ["False", "no", None, 2])
def test_a_debiased_flag_that_is_no_bool_is_refused(debiased):
    # debiased="False" (a config string) computed the unbiased estimator, None the biased one
    x, y = np.random.default_rng(0).standard_normal((2, 20, 3))
    match = f"debiased={debiased!r} must be True or False"
    for call in (lambda: cka.linear_cka(x, y, debiased=debiased),
                 lambda: cka.rbf_cka(x, y, debiased=debiased),
                 lambda: cka.MinibatchCKA(debiased=debiased)):
        with pytest.raises(ValueError, match=match):
            call()


def test_a_numpy_bool_debiased_flag_is_taken():
    x, y = np.random.default_rng(0).standard_normal((2, 20, 3))
    assert cka.linear_cka(x, y, debiased=np.bool_(False)) == cka.linear_cka(x, y, debiased=False)


@pytest.mark.parametrize("med", [["2.0"], [None], [float("nan")], [True], [float("inf")],
                                 [-np.inf]])
def test_an_rbf_accumulator_given_a_median_that_is_no_number_is_refused(med):
    # "2.0" (read from a text file) and None (a NaN bandwidth after to_dict) raised TypeErrors
    # at the first update; NaN warned of a zero median; True computed with a median of 1
    with pytest.raises(ValueError, match="needs fixed bandwidths"):
        cka.MinibatchCKA(kernel="rbf", median_sqdist_a=[1.0], median_sqdist_b=med)


@pytest.mark.parametrize("call", [
    lambda x: cka.linear_cka(x, x), lambda x: cka.linear_cka(x, x, debiased=False),
    lambda x: cka.rbf_cka(x, x), lambda x: cka.cka_matrix([x], [x], batch_size=40)[0, 0],
    lambda x: cka.compare({"x": x}, {"y": x}).matrix[0, 0]])
def test_a_matrix_compared_with_itself_has_cka_exactly_one(rng, call):
    # linear_cka(x, x), the first check a researcher makes, read 0.9999999999999996 or
    # 1.0000000000000002: only the same feature-set object was known to be a self-comparison
    assert call(rng.standard_normal((262, 10))) == 1.0


@pytest.mark.parametrize("med", [float("inf"), float("nan"), "2", True])
def test_the_accumulator_and_layer_sketch_refuse_the_same_medians(med):
    # median_sqdist_b=[inf] passed the accumulator (an all-ones Gram: CKA NaN, silently) and
    # layer_sketch (a sketch of zeros); both now check medians as sketch.check_options checks
    # a threshold: a finite real number, not a bool
    x = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(ValueError, match="median"):
        cka.MinibatchCKA(kernel="rbf", median_sqdist_a=[1.0], median_sqdist_b=[med])
    with pytest.raises(ValueError, match="median"):
        cka.layer_sketch(x, kernel="rbf", median_sqdist=med)


@pytest.mark.parametrize("scale", [1e-150, 1e150])
@pytest.mark.parametrize("estimator", ["debiased", "minibatch"])
def test_rbf_cka_is_scale_invariant_while_squared_distances_fit_float64(rng, scale, estimator):
    x = rng.standard_normal((30, 5))
    y = x[:, :3] + rng.standard_normal((30, 3))
    got = cka.rbf_cka(x * scale, y) if estimator == "debiased" else cka.cka_matrix(
        [x * scale], [y], kernel="rbf", batch_size=10)[0, 0]
    want = cka.rbf_cka(x, y) if estimator == "debiased" else cka.cka_matrix(
        [x], [y], kernel="rbf", batch_size=10)[0, 0]
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("scale", [1e155, 1e160, 1e300])
def test_rbf_features_whose_squared_distances_overflow_are_refused_naming_the_scale(rng, scale):
    # x * 1e160: |x_i - x_j|^2 ~ 1e320 is inf - inf = NaN, so the median was NaN and
    # MinibatchCKA blamed the caller: "kernel='rbf' needs fixed bandwidths: pass median_sqdist_a"
    x = rng.standard_normal((30, 5))
    with pytest.raises(ValueError, match=r"layer 'a\[0\]'.*squared distances .* overflow "
                                         r"float64 .*largest .*divide its features"):
        cka.rbf_cka(x * scale, x)


@pytest.mark.parametrize("scale", [1e-160, 1e-170])
def test_rbf_features_whose_squared_distances_underflow_are_refused_naming_the_scale(rng, scale):
    # 1e-160: a subnormal median (9e-320) made every Gram NaN, blamed on "threshold=1";
    # 1e-170: every distance 0, blamed on "a zero median squared distance" of distinct rows
    x = rng.standard_normal((30, 5))
    with pytest.raises(ValueError, match=r"layer 'a\[0\]'.*squared distances .* underflow "
                                         r"float64 .*largest .*multiply its features"):
        cka.rbf_cka(x * scale, x)


def test_an_rbf_layer_of_mostly_identical_rows_still_has_a_zero_bandwidth(rng):
    # a median of 0 from duplicate rows (not from underflow) keeps its reason
    x = np.zeros((30, 4))
    x[:5] = rng.standard_normal((5, 4))
    with pytest.warns(RuntimeWarning, match="zero median squared distance"):
        assert np.isnan(cka.rbf_cka(x, rng.standard_normal((30, 3))))


def test_an_rbf_accumulator_refuses_a_batch_whose_squared_distances_overflow(rng):
    # a finite median from elsewhere, then a batch at 1e160: its Gram was NaN, silently
    x = rng.standard_normal((20, 3))
    acc = cka.MinibatchCKA(kernel="rbf", median_sqdist_a=[1.0], median_sqdist_b=[1.0])
    with pytest.raises(ValueError, match=r"layer 'a\[0\]'.*squared distances .* overflow"):
        acc.update([x * 1e160], [x])


@pytest.mark.parametrize("estimator", ["debiased", "minibatch"])
def test_rbf_errors_name_the_layer_of_either_side_as_given(rng, estimator):
    # the bandwidths were found on bare lists of matrices: B's layer 'm1' was called 'a[0]'
    x, y = rng.standard_normal((2, 20, 3))
    y[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"layer 'm1' has non-finite values \(first at row 3\)"):
        cka.compare({"l1": x}, {"m1": y}, kernel="rbf", estimator=estimator, batch_size=8)
    with pytest.raises(ValueError, match=r"layer 'b\[0\]'.*overflow"):
        cka.rbf_cka(x, x * 1e160)


def _all_reduce(accs):
    """What ``torch.distributed.all_reduce`` (SUM) on every tensor of ``sums()`` does on each
    rank: each tensor is replaced, in place, by the sum over the ranks."""
    sums = [a.sums() for a in accs]
    total = {k: sum(s[k].clone() for s in sums) for k in sums[0]}
    for s in sums:
        for k, t in s.items():
            t.copy_(total[k])


def test_all_reduced_sums_decide_dead_layers_from_every_rank(layers):
    # A layer constant on rank 0's rows but alive on rank 1's: after the reduction its CKA is
    # a number, so rank 0 must not warn that it is NaN (it did, from its own counts).
    x = layers[0].copy()
    x[:24] = 1.0
    batches = [np.arange(a, a + 12) for a in range(0, 48, 12)]
    ranks = [cka.MinibatchCKA(), cka.MinibatchCKA()]
    for k, rows in enumerate(batches):
        ranks[k // 2].update({"x": x[rows]}, {"y": layers[1][rows]})
    _all_reduce(ranks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ranks[0].compute()
    assert ranks[0].dead_ == [[None], [None]]
    assert (ranks[0].n_batches_, ranks[0].n_samples_) == (4, 48)
    # The constant batches add nothing to x's terms (0 in the reference, up to rounding).
    np.testing.assert_allclose(got, [[ref.minibatch_cka(x, layers[1], batches)]], atol=1e-12)


def test_all_reduced_sums_keep_a_layer_dead_on_every_rank_dead(layers):
    x = np.ones((24, 3))
    ranks = [cka.MinibatchCKA().update({"x": x[:12]}, {"y": layers[1][:12]}),
             cka.MinibatchCKA().update({"x": x[12:]}, {"y": layers[1][12:24]})]
    _all_reduce(ranks)
    with pytest.warns(RuntimeWarning, match="layer 'x' .* in every batch; its CKA values are NaN"):
        assert np.isnan(ranks[0].compute()).all()


def test_all_reduced_rbf_sums_decide_the_identity_warning_from_every_rank(rng):
    # Rank 0's rows are far apart (its Grams alone are the identity), rank 1's close together:
    # the merged Grams are not the identity, and CKA is that of one pass over all rows.
    x = np.concatenate([100.0 * np.arange(12)[:, None] * np.ones((1, 3)),
                        0.1 * rng.standard_normal((12, 3))])
    y = x + 0.05 * rng.standard_normal(x.shape)
    make = lambda: cka.MinibatchCKA(kernel="rbf", median_sqdist_a=[1.0], median_sqdist_b=[1.0])  # noqa: E731
    one, ranks = make(), [make(), make()]
    for k in (0, 1):
        rows = slice(12 * k, 12 * k + 12)
        one.update({"x": x[rows]}, {"y": y[rows]})
        ranks[k].update({"x": x[rows]}, {"y": y[rows]})
    _all_reduce(ranks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ranks[0].compute()
        want = one.compute()
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got, [[ref.minibatch_cka(x, y, [np.arange(12), np.arange(12, 24)],
                                                        "rbf", 1.0, 1.0, 1.0)]], atol=1e-12)


def _biased_minibatch_cka(x, y, batches, gram):
    """The accumulator's biased estimate: tr(K H L H) / m^2 summed over batches, normalised."""
    def h(k, l):
        m = len(k)
        c = np.eye(m) - 1.0 / m
        return np.trace(k @ c @ l @ c) / m**2
    ks, ls = [gram(x[r], 0) for r in batches], [gram(y[r], 1) for r in batches]
    kl, kk, ll = (sum(h(a, b) for a, b in zip(p, q)) for p, q in ((ks, ls), (ks, ks), (ls, ls)))
    return kl / np.sqrt(kk * ll)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [True, False])
def test_merged_and_all_reduced_accumulators_equal_one_pass_over_all_rows(layers, kernel,
                                                                          debiased):
    x, y = layers[0][:50], layers[2][:50]
    meds = [1.0 * x.shape[1], 2.0 * y.shape[1]] if kernel == "rbf" else [None, None]
    batches = [np.arange(0, 12), np.arange(12, 30), np.arange(30, 37), np.arange(37, 50)]
    make = lambda: cka.MinibatchCKA(kernel=kernel, debiased=debiased,  # noqa: E731
                                    median_sqdist_a=meds[:1] if meds[0] else None,
                                    median_sqdist_b=meds[1:] if meds[1] else None)
    one, ranks = make(), [make(), make()]
    for k, rows in enumerate(batches):  # uneven batches, dealt to the ranks in turn
        one.update([x[rows]], [y[rows]])
        ranks[k % 2].update([x[rows]], [y[rows]])
    merged = make().merge(ranks[0]).merge(ranks[1]).compute()
    _all_reduce(ranks)
    if kernel == "linear":
        gram = lambda z, side: ref.gram_linear(z)  # noqa: E731
    else:
        gram = lambda z, side: ref.gram_rbf(z, 1.0, meds[side])  # noqa: E731
    want = (ref.minibatch_cka(x, y, batches, kernel, 1.0, *meds) if debiased else
            _biased_minibatch_cka(x, y, batches, gram))
    for got in (merged, ranks[0].compute(), ranks[1].compute(), one.compute()):
        np.testing.assert_allclose(got, [[want]], rtol=1e-12, atol=1e-14)
    assert (ranks[1].n_batches_, ranks[1].n_samples_) == (4, 50)


def test_merge_accepts_the_same_bandwidths_given_as_numpy_or_python_floats(layers):
    # The settings were compared as text, and [np.float64(2.0)] reads unlike [2.0]: refused.
    x, y = layers[0][:24], layers[2][:24]
    meds = [float(np.median(((x[:, None] - x[None]) ** 2).sum(-1)))]
    left = cka.MinibatchCKA(kernel="rbf", median_sqdist_a=meds, median_sqdist_b=meds)
    right = cka.MinibatchCKA(kernel="rbf", median_sqdist_a=np.array(meds),
                             median_sqdist_b=np.array(meds))
    left.update([x[:12]], [y[:12]])
    right.update([x[12:]], [y[12:]])
    want = ref.minibatch_cka(x, y, [np.arange(12), np.arange(12, 24)], "rbf", 1.0, *meds * 2)
    np.testing.assert_allclose(left.merge(right).compute(), [[want]], rtol=1e-12)
