"""Calibrated CKA (repsim.stats): each statistic against brute force or a closed form."""

import json
import warnings

import numpy as np
import pytest
import torch

from repsim import stats
from repsim.cka import compare, rbf_bandwidths
from repsim.errors import UserError, as_flags
from repsim.sketch import minibatches
from tests.reference import cka as ref_cka
from tests.reference import gram_rbf as ref_gram_rbf
from tests.reference import minibatch_cka as ref_minibatch_cka


def _gauss(n, p, seed):
    return np.random.default_rng(seed).standard_normal((n, p))


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_closed_form_leave_one_out_equals_brute_force(estimator, kernel):
    n, hollow = 50, estimator == "debiased"
    a = [_gauss(n, 7, 0), _gauss(n, 30, 1) ** 2]
    b = [a[0] @ _gauss(7, 5, 2) + _gauss(n, 5, 3)]
    ka, kb = (stats.grams(m, kernel=kernel, sigma2=rbf_bandwidths(m) if kernel == "rbf" else None)
              for m in (a, b))
    loo = stats.leave_one_out(ka, kb, hollow)
    for i in (0, 17, n - 1):
        keep = np.delete(np.arange(n), i)
        # the Grams of the n - 1 images, with the kernel fixed on all n (bandwidth, means)
        want = stats.hsic(ka[:, keep][:, :, keep], kb[:, keep][:, :, keep], hollow)
        np.testing.assert_allclose(loo[i].numpy(), want.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
def test_calibrated_matrix_is_the_engines_matrix(estimator):
    a, b = [_gauss(64, 10, 0), _gauss(64, 40, 1)], [_gauss(64, 8, 2)]
    b[0][:, :3] += a[0][:, :3]
    batches = minibatches(64, 16, 3) if estimator == "minibatch" else None
    cal = stats.calibrate(a, b, estimator=estimator, batches=batches)
    want = compare(a, b, estimator=estimator, batch_size=16 if batches else None,
                   batch_seed=3).matrix
    np.testing.assert_allclose(cal.matrix, want, rtol=1e-12, atol=1e-14)


def test_jackknife_se_equals_the_textbook_formula_on_brute_force_estimates():
    x, y = _gauss(40, 6, 0), _gauss(40, 6, 1)
    y[:, :2] += x[:, :2]
    cal = stats.calibrate([x], [y], estimator="debiased")
    loo = np.array([ref_cka(np.delete(x, i, 0), np.delete(y, i, 0), debiased=True)
                    for i in range(40)])
    # features are centred once, on all 40 images; CKA does not depend on that
    np.testing.assert_allclose(cal.loo[:, 0, 0], loo, rtol=1e-10)
    want = np.sqrt(39 / 40 * ((loo - loo.mean()) ** 2).sum())
    np.testing.assert_allclose(cal.se[0, 0], want, rtol=1e-10)


def test_jackknife_intervals_cover_the_population_cka():
    """X = Z A, Y = Z B + noise: population CKA tr(S_xy S_yx) / sqrt(tr S_x^2 tr S_y^2)."""
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((4, 6)), rng.standard_normal((4, 5))
    sx, sy, sxy = A.T @ A, B.T @ B + 0.5 * np.eye(5), A.T @ B
    truth = np.trace(sxy @ sxy.T) / np.sqrt(np.trace(sx @ sx) * np.trace(sy @ sy))
    hits = 0
    for _ in range(200):
        z = rng.standard_normal((200, 4))
        y = z @ B + np.sqrt(0.5) * rng.standard_normal((200, 5))
        cal = stats.calibrate([z @ A], [y], estimator="debiased")
        hits += abs(cal.matrix[0, 0] - truth) <= 1.96 * cal.se[0, 0]
    assert 182 <= hits <= 196  # 91-98 %


def test_biased_null_mean_is_the_participation_ratio_formula():
    x, y = _gauss(40, 12, 0), _gauss(40, 300, 1) * np.linspace(0.1, 2, 300)
    cal = stats.calibrate([x], [y], estimator="biased", permutations=4000, seed=1)
    assert cal.biased_null_mean[0, 0] == pytest.approx(
        np.sqrt(cal.pr_a[0] * cal.pr_b[0]) / 39)
    assert cal.null["null_mean"][0, 0] == pytest.approx(cal.biased_null_mean[0, 0], abs=1e-3)


def test_debiased_null_mean_is_zero_and_matches_recomputing_on_permuted_data():
    x, y = _gauss(40, 12, 0), _gauss(40, 300, 1)
    cal = stats.calibrate([x], [y], estimator="debiased", permutations=2000, seed=2)
    rng = np.random.default_rng(4)
    draws = np.array([ref_cka(x, y[rng.permutation(40)], debiased=True) for _ in range(1000)])
    se = draws.std() / np.sqrt(2000)
    assert abs(cal.null["null_mean"][0, 0]) <= 3 * se
    assert abs(draws.mean()) <= 3 * draws.std() / np.sqrt(1000)
    assert cal.null["null_q95"][0, 0] == pytest.approx(np.quantile(draws, 0.95), abs=0.02)


def test_null_values_are_cka_recomputed_on_the_same_permutations():
    # m = 40: the triangle (820 entries) is padded to whole chunks; the padding adds nothing.
    x, y = _gauss(40, 12, 0), _gauss(40, 30, 1)
    cal = stats.calibrate([x], [y], estimator="biased", permutations=50, seed=3)
    g = torch.Generator().manual_seed(3)  # the null's own stream: A's rows re-ordered
    draws = [ref_cka(x[torch.randperm(40, generator=g).numpy()], y) for _ in range(50)]
    assert cal.null["null_mean"][0, 0] == pytest.approx(np.mean(draws), abs=1e-12)
    assert cal.null["null_q95"][0, 0] == pytest.approx(np.quantile(draws, 0.95), abs=1e-12)


def test_permutation_p_values_of_independent_data_are_uniform():
    rng = np.random.default_rng(0)
    p = [stats.calibrate([rng.standard_normal((30, 5))], [rng.standard_normal((30, 8))],
                         estimator="debiased", permutations=99,
                         seed=int(rng.integers(1 << 30))).null["p_value"][0, 0]
         for _ in range(200)]
    assert 0.02 <= np.mean(np.asarray(p) <= 0.05) <= 0.08


def test_an_orthogonal_transform_has_the_smallest_p_value():
    x = _gauss(50, 10, 0)
    q, _ = np.linalg.qr(_gauss(10, 10, 1))
    cal = stats.calibrate([x], [x @ q], estimator="debiased", permutations=199)
    assert cal.matrix[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert cal.null["p_value"][0, 0] == 1 / 200


def test_minibatch_null_permutes_within_batches_and_keeps_the_observed_value():
    x = _gauss(96, 10, 0)
    y = x[:, :4] + 0.5 * _gauss(96, 4, 1)
    cal = stats.calibrate([x], [y], estimator="minibatch", batches=minibatches(96, 32, 0),
                          permutations=99)
    assert cal.null["p_value"][0, 0] == 1 / 100
    assert abs(cal.null["null_mean"][0, 0]) < 0.05 < cal.matrix[0, 0]


def test_isotropic_wide_features_murphy_table():
    """Independent isotropic data with p = 10 n: biased CKA about 0.91, debiased about 0;
    the biased value grows with p at fixed n."""
    n = 100
    biased = [stats.calibrate([_gauss(n, p, 0)], [_gauss(n, p, 1)], estimator="biased").matrix[0, 0]
              for p in (n // 10, n, 10 * n)]
    debiased = stats.calibrate([_gauss(n, 10 * n, 0)], [_gauss(n, 10 * n, 1)],
                               estimator="debiased")
    assert biased[2] == pytest.approx(0.91, abs=0.01)
    assert biased[0] < biased[1] < biased[2]
    assert abs(debiased.matrix[0, 0]) < 3 * debiased.se[0, 0]


def test_one_far_image_drives_cka_to_its_own_limit():
    """Translating image i of A by t v: K_c -> t^2 |v|^2 c c', c = H e_i, so linear CKA ->
    (L_c)_ii / ((1 - 1/n) ||L_c||_F), whatever else A holds (Davari et al. 2022)."""
    n, i = 60, 7
    y = _gauss(n, 9, 1)
    lc = stats.grams([y])[0].numpy()
    limit = lc[i, i] / ((1 - 1 / n) * np.linalg.norm(lc))
    for seed in (2, 3):
        x = _gauss(n, 5, seed)
        x[i] += 1e5 * _gauss(1, 5, 4)[0]
        got = stats.calibrate([x], [y], estimator="biased").matrix[0, 0]
        assert got == pytest.approx(limit, rel=1e-3)


def test_top_principal_components_give_the_singular_value_formula():
    """CKA(X, X_k) = sqrt(sum_{i<=k} s_i^4 / sum s_i^4) (Ding et al. 2021)."""
    x = _gauss(80, 12, 0) * np.linspace(3, 0.2, 12)
    xc = x - x.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    for k in (1, 3, 8):
        got = stats.calibrate([x], [xc @ vt[:k].T], estimator="biased").matrix[0, 0]
        assert got == pytest.approx(np.sqrt((s[:k] ** 4).sum() / (s**4).sum()), rel=1e-10)


def test_delete_one_batch_jackknife_from_twenty_batches():
    x, y = _gauss(400, 6, 0), _gauss(400, 6, 1)
    y[:, 0] += x[:, 0]
    batches = minibatches(400, 20, 0)
    assert len(batches) == 20
    cal = stats.calibrate([x], [y], estimator="minibatch", batches=batches)
    brute = np.array([stats.calibrate([x], [y], estimator="minibatch",
                                      batches=batches[:j] + batches[j + 1:]).matrix[0, 0]
                      for j in range(20)])
    want = np.sqrt(19 / 20 * ((brute - brute.mean()) ** 2).sum())
    assert cal.se[0, 0] == pytest.approx(want, rel=1e-10)
    assert cal.se_method == "delete-one-batch"


def test_minibatch_with_few_batches_jackknifes_images_within_their_batch():
    x, y = _gauss(60, 6, 0), _gauss(60, 6, 1)
    y[:, 0] += x[:, 0]
    batches = minibatches(60, 20, 0)
    cal = stats.calibrate([x], [y], estimator="minibatch", batches=batches)
    assert cal.se_method == "delete-one-image"
    for k in (0, 31, 59):  # image cal.rows[k] removed from its batch, the others unchanged
        rest = [np.setdiff1d(b, [cal.rows[k]]) for b in batches]
        want = stats.calibrate([x], [y], estimator="minibatch", batches=rest).matrix[0, 0]
        assert cal.loo[k, 0, 0] == pytest.approx(want, rel=1e-10)


def _uneven(n=70, size=32):
    """Data and minibatches of 32, 32 and 6 rows: each batch's HSIC has its own scale."""
    x, y = _gauss(n, 6, 0), _gauss(n, 5, 1)
    y[:, 0] += x[:, 0]
    batches = minibatches(n, size, 0)
    assert sorted(map(len, batches)) == [6, 32, 32]
    return x, y, batches


def test_calibrated_matrix_is_the_engines_matrix_when_the_last_batch_is_shorter():
    x, y, batches = _uneven()
    cal = stats.calibrate([x], [y], estimator="minibatch", batches=batches)
    want = compare([x], [y], estimator="minibatch", batch_size=32).matrix
    np.testing.assert_allclose(cal.matrix, want, rtol=1e-12)
    np.testing.assert_allclose(cal.matrix[0, 0], ref_minibatch_cka(x, y, batches), rtol=1e-10)


def test_leave_one_out_of_uneven_minibatches_equals_brute_force():
    x, y, batches = _uneven()
    cal = stats.calibrate([x], [y], estimator="minibatch", batches=batches)
    for k in (0, 40, 69):  # image cal.rows[k] removed from its batch, the others unchanged
        rest = [np.setdiff1d(b, [cal.rows[k]]) for b in batches]
        assert cal.loo[k, 0, 0] == pytest.approx(ref_minibatch_cka(x, y, rest), rel=1e-10)


def test_minibatch_null_of_uneven_batches_is_cka_recomputed_on_the_permutations():
    x, y, batches = _uneven()
    cal = stats.calibrate([x], [y], estimator="minibatch", batches=batches, permutations=20,
                          seed=5)
    g, draws = torch.Generator().manual_seed(5), []
    for _ in range(20):  # A's rows re-ordered within each batch, in the null's own stream
        xp = x.copy()
        for b in batches:
            xp[b] = x[b[torch.randperm(len(b), generator=g).numpy()]]
        draws.append(ref_minibatch_cka(xp, y, batches))
    assert cal.null["null_mean"][0, 0] == pytest.approx(np.mean(draws), abs=1e-12)
    assert cal.null["null_q95"][0, 0] == pytest.approx(np.quantile(draws, 0.95), abs=1e-12)


def test_rbf_calibration_of_a_constant_layer_gives_nan_like_the_engine():
    # its median squared distance, so its bandwidth, is 0: the engine counts it dead
    x, y = _gauss(40, 6, 0), _gauss(40, 5, 1)
    with pytest.warns(RuntimeWarning, match="zero variance"):
        res = compare([x, np.ones((40, 3))], [y], kernel="rbf", estimator="debiased")
    res = stats.calibrate_result(res, [x, np.ones((40, 3))], [y], permutations=9)
    assert np.isfinite(res.matrix[0, 0]) and np.isfinite(res.se[0, 0])
    assert np.isnan(res.matrix[1, 0]) and np.isnan(res.se[1, 0])


def test_a_cell_without_a_value_has_no_p_value():
    x, y = _gauss(40, 6, 0), _gauss(40, 5, 1)
    cal = stats.calibrate([x, np.ones((40, 3))], [y], estimator="debiased", permutations=19)
    assert np.isnan(cal.matrix[1, 0])
    assert np.isnan(cal.null["p_value"][1, 0])  # not 1/20, the smallest p-value there is
    assert 0 < cal.null["p_value"][0, 0] <= 1


def test_a_result_with_influence_of_a_nan_cell_is_strict_json():
    x, y = _gauss(40, 6, 0), _gauss(40, 5, 1)
    with pytest.warns(RuntimeWarning, match="zero variance"):
        res = compare([x, np.ones((40, 3))], [y], estimator="debiased")
    res = stats.calibrate_result(res, [x, np.ones((40, 3))], [y], influence=2)
    json.dumps(res.to_dict(), allow_nan=False)  # NaN is not JSON; to_dict makes it None


def test_influence_names_the_outlier():
    x, y = _gauss(50, 5, 0), _gauss(50, 5, 1)
    x[13] += 40
    y[13] += 40
    cal = stats.calibrate([x], [y], estimator="debiased")
    (row, change), *_ = cal.influence(0, 0, 3)
    assert row == 13 and change < -0.1


def test_participation_ratio_of_isotropic_and_rank_one_data():
    x = _gauss(30, 1, 0) @ _gauss(1, 20, 1)
    assert stats.participation_ratio(stats.grams([x]))[0] == pytest.approx(1.0)
    assert stats.participation_ratio(stats.grams([_gauss(30, 3000, 2)]))[0] > 27


def test_grams_accept_torch_and_numpy_alike():
    x = _gauss(10, 4, 0)
    np.testing.assert_array_equal(stats.grams([x]).numpy(), stats.grams([torch.tensor(x)]).numpy())


@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_gram_strips_give_the_whole_grams_numbers(estimator, kernel, monkeypatch):
    """Strips of 4 rows (dividing neither n = 67 nor the batches of 30, 30 and 7 rows) give
    every number of the whole Grams, a constant layer's NaN included, and no Gram block
    taller than a strip is ever formed."""
    n = 67
    a = [_gauss(n, 7, 0), _gauss(n, 30, 1) ** 2, np.ones((n, 3))]
    b = [a[0] @ _gauss(7, 5, 2) + _gauss(n, 5, 3), _gauss(n, 4, 4)]
    kw = {"estimator": estimator, "kernel": kernel}
    if estimator == "minibatch":
        kw["batches"] = minibatches(n, 30, 0)
        assert sorted(map(len, kw["batches"])) == [7, 30, 30]
    if kernel == "rbf":  # the constant layer's bandwidth is 0: dead, as in the engine
        kw["sigma2_a"], kw["sigma2_b"] = rbf_bandwidths(a), rbf_bandwidths(b)
    whole = stats.calibrate(a, b, **kw, strip=n)
    blocks, gram = [], stats.gram
    monkeypatch.setattr(stats, "gram", lambda *x, **k: blocks.append(gram(*x, **k)) or blocks[-1])
    strips = stats.calibrate(a, b, **kw, strip=4)
    assert blocks and max(len(g) for g in blocks) == 4
    assert np.isnan(strips.matrix[2]).all() and np.isnan(strips.se[2]).all()
    for name in ("matrix", "se", "loo", "pr_a", "pr_b", "biased_null_mean", "rows"):
        np.testing.assert_allclose(getattr(strips, name), getattr(whole, name), rtol=1e-12,
                                   atol=1e-14, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("estimator, fix", [("debiased", "--estimator 'minibatch'"),
                                            ("minibatch", "--batch-size")])
def test_a_permutation_null_beyond_the_memory_budget_is_refused(estimator, fix):
    x, y = _gauss(40, 6, 0), _gauss(40, 5, 1)
    batches = [np.arange(40)] if estimator == "minibatch" else None
    need = stats.NULL_COPIES * 8 * 2 * 40**2  # two layers' Grams of 40 rows, and copies
    with pytest.raises(UserError, match="permutations=9 needs") as err:
        stats.calibrate([x], [y], estimator=estimator, batches=batches, permutations=9,
                        memory_budget=need - 1)
    assert "\n" not in str(err.value) and fix in as_flags(str(err.value))
    cal = stats.calibrate([x], [y], estimator=estimator, batches=batches, permutations=9,
                          memory_budget=need)
    assert 0 < cal.null["p_value"][0, 0] <= 1


def _u_centred(k):
    """Song et al.'s U-centring entry by entry: no large sums cancel (unlike the identity)."""
    m, k = len(k), k.copy()
    np.fill_diagonal(k, 0)
    r = k.sum(1)
    c = k - (r[:, None] + r[None, :]) / (m - 2) + r.sum() / ((m - 1) * (m - 2))
    np.fill_diagonal(c, 0)
    return c


def test_a_wide_rbf_bandwidth_passes_the_engine_cross_check_within_rounding():
    """threshold=100: the Grams are nearly constant, so the centring identity cancels sums some
    1e9 times the HSIC, in the engine and here alike, each in its own order: calibrate_result's
    cross-check (1e-12) raised. Both stay within the rounding bound of the exact value."""
    x, y = _gauss(50, 30, 2), _gauss(50, 20, 3)
    res = compare([x], [y], kernel="rbf", estimator="debiased", threshold=100)
    sig = [[1e4 * v for v in b] for b in (res.bandwidths_a, res.bandwidths_b)]
    cal = stats.calibrate([x], [y], kernel="rbf", sigma2_a=sig[0], sigma2_b=sig[1])
    ca, cb = (_u_centred(ref_gram_rbf(z, threshold=100)) for z in (x, y))
    exact = (ca * cb).sum() / np.sqrt((ca * ca).sum() * (cb * cb).sum())
    assert abs(cal.matrix[0, 0] - exact) <= cal.rounding[0, 0] < 1e-3
    assert abs(res.matrix[0, 0] - exact) <= cal.rounding[0, 0]
    stats.calibrate_result(res, [x], [y])  # no RuntimeError


@pytest.mark.parametrize("scale", [1e-50, 1e40])
def test_null_and_rounding_bound_are_scale_invariant_where_self_hsic_products_overflow(scale):
    # HSIC scales as scale^4: HSIC_aa * HSIC_bb under- or overflows float64, each does not.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, 4))
    y = x[:, :2] + rng.standard_normal((20, 2))
    want = stats.calibrate([x], [y], permutations=19)
    got = stats.calibrate([x * scale], [y * scale], permutations=19)
    for k in ("p_value", "null_mean", "null_q95"):
        np.testing.assert_allclose(got.null[k], want.null[k], rtol=1e-9, err_msg=k)
    np.testing.assert_allclose(got.rounding, want.rounding, rtol=1e-9)


def test_a_nan_cell_lists_no_influential_images():
    # A dead layer (zero variance) has no CKA, so no image moves it: rows 0, 1 with a null
    # change would read as the most influential images.
    rng = np.random.default_rng(5)
    a, b = [rng.standard_normal((12, 3)), np.ones((12, 2))], [rng.standard_normal((12, 2))]
    with pytest.warns(RuntimeWarning, match="zero variance"):
        res = stats.calibrate_result(compare(a, b), a, b, influence=2)
    assert len(res.influence[0][0]) == 2 and res.influence[1][0] == []


@pytest.mark.parametrize("estimator, n, batch", [("debiased", 4, None), ("biased", 2, None),
                                                 ("biased", 3, None), ("minibatch", 5, 4)])
def test_too_few_rows_for_a_jackknife_give_nan_standard_errors_with_one_warning(estimator, n,
                                                                                batch):
    # Leaving one row out leaves too few for the estimator: unbiased HSIC needs 4 rows, and
    # biased CKA of 2 rows is 1 whatever the data (its jackknife would say SE 0).
    x, y = _gauss(n, 3, 0), _gauss(n, 2, 1)
    batches = minibatches(n, batch, 0) if batch else None
    with pytest.warns(RuntimeWarning, match="standard errors are NaN") as got:
        cal = stats.calibrate([x, x[:, :2]], [y], estimator=estimator, batches=batches)
    assert len([w for w in got if "standard error" in str(w.message)]) == 1
    assert "\n" not in str(got[0].message) and "rows" in str(got[0].message)
    assert np.isfinite(cal.matrix).all() and np.isnan(cal.se).all()


@pytest.mark.parametrize("estimator, n", [("debiased", 5), ("biased", 4)])
def test_one_row_more_than_too_few_gives_finite_standard_errors_without_warning(estimator, n):
    x, y = _gauss(n, 3, 0), _gauss(n, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal = stats.calibrate([x], [y], estimator=estimator)
    assert np.isfinite(cal.se).all() and cal.se[0, 0] > 1e-6


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_non_finite_features_are_refused_naming_the_layer(bad, kernel):
    x, y = _gauss(30, 6, 0), _gauss(30, 5, 1)
    y[7, 2] = bad
    sig = {"sigma2_a": [1.0], "sigma2_b": [1.0]} if kernel == "rbf" else {}
    with pytest.raises(ValueError, match=r"mats_b\[0\] has non-finite values") as err:
        stats.calibrate([x], [y], kernel=kernel, **sig)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"estimator": "unbiased"}, "estimator='unbiased' is unknown"),
    ({"kernel": "rbf"}, "kernel='rbf' needs sigma2_a and sigma2_b"),
    ({"kernel": "rbf", "sigma2_a": [1.0, 2.0], "sigma2_b": [1.0]},
     "got 2 for the 1 layers of mats_a"),
    ({"kernel": "rbf", "sigma2_a": 2.0, "sigma2_b": [1.0]}, "got 2.0 for the 1 layers"),
    ({"kernel": "rbf", "sigma2_a": [1.0], "sigma2_b": [np.inf]}, r"got \[inf\] for the 1"),
    ({"kernel": "rbf", "sigma2_a": [np.nan], "sigma2_b": [1.0]}, r"got \[nan\] for the 1"),
    ({"kernel": "rbf", "sigma2_a": ["2"], "sigma2_b": [1.0]}, r"got \['2'\] for the 1"),
    ({"short_b": True}, "has 20 rows but"),
    ({"single": True}, "mats_a is a single"),
    ({"n": 3}, "needs at least 4 rows, got n=3"),
])
def test_invalid_calibrate_arguments_are_refused_with_a_value_error(kwargs, match):
    # they were: an unknown estimator computed as unbiased, a TypeError, an einsum
    # RuntimeError, an IndexError and an all-NaN result
    kw = dict(kwargs)
    n = kw.pop("n", 30)
    x, y = _gauss(n, 6, 0), _gauss(n, 5, 1)
    a = x if kw.pop("single", False) else [x]
    b = [y[:20]] if kw.pop("short_b", False) else [y]
    with pytest.raises(ValueError, match=match) as err:
        stats.calibrate(a, b, **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("threshold", [0.01, 0.05])
def test_noise_from_identity_rbf_grams_does_not_fail_the_engine_cross_check(threshold):
    # Grams numerically the identity: the HSICs are rounding noise (bound 250 at 0.01), the
    # engine's cells NaN or noise; calibrate_result raised "differs from the engine's".
    x = _gauss(60, 10, 0)
    feats = {"x": x, "y": x[:, :4] + _gauss(60, 4, 1)}
    with pytest.warns(RuntimeWarning, match="nearly the identity"):
        res = compare(feats, dict(feats), kernel="rbf", threshold=threshold, batch_size=20)
    res = stats.calibrate_result(res, list(feats.values()), list(feats.values()))
    assert res.se.shape == (2, 2)


def test_a_jackknife_of_one_unit_has_no_standard_error():
    # one estimate says nothing about its spread: it was SE 0, a claim of certainty
    assert np.isnan(stats.jackknife_se(np.array([[0.5, 0.7]]))).all()
    assert stats.jackknife_se(np.array([[0.5], [0.7]]))[0] == pytest.approx(0.1)


def test_a_permutation_null_refused_at_a_tiny_budget_states_sizes_in_a_useful_unit():
    # 75 KiB of Grams against a 1,000-byte budget read "about 0 MiB ... 0 MiB"
    x, y = _gauss(40, 6, 0), _gauss(40, 5, 1)
    with pytest.raises(UserError, match="permutations=9 needs") as err:
        stats.calibrate([x], [y], permutations=9, memory_budget=1000)
    assert "about 75.0 KiB" in str(err.value) and "budget, 1,000 bytes" in str(err.value)


def test_a_numpy_integer_seed_gives_the_null_of_the_same_python_int():
    # seed=np.int64(2) (from np.arange, a config array) raised TypeError in torch.manual_seed
    x, y = _gauss(12, 3, 0), _gauss(12, 2, 1)
    want = stats.calibrate([x], [y], permutations=5, seed=2).null["null_mean"]
    got = stats.calibrate([x], [y], permutations=5, seed=np.int64(2)).null["null_mean"]
    assert got == want


@pytest.mark.parametrize("kwargs, match", [
    ({"permutations": -1}, "permutations=-1"), ({"permutations": 2.5}, "permutations=2.5"),
    ({"permutations": True}, "permutations=True"), ({"permutations": "9"}, "permutations='9'"),
    ({"seed": 1.5}, "seed=1.5"), ({"seed": None}, "seed=None")])
def test_a_permutation_count_or_seed_that_is_no_whole_number_is_a_value_error(kwargs, match):
    # they were a RuntimeError (negative dimension), TypeErrors from torch.empty and
    # manual_seed
    x, y = _gauss(12, 3, 0), _gauss(12, 2, 1)
    with pytest.raises(ValueError, match=match) as err:
        stats.calibrate([x], [y], **{"permutations": 3, **kwargs})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("estimator, rows", [("minibatch", 3), ("biased", 1)])
def test_a_batch_too_small_for_the_estimator_is_a_value_error(estimator, rows):
    # calibrate(batches=[...3 rows..., ...]) raised ZeroDivisionError from the centring
    x, y = _gauss(20, 3, 0), _gauss(20, 2, 1)
    batches = [np.arange(rows), np.arange(rows, 20)]
    with pytest.raises(ValueError, match=f"rows per batch; batch 0 has {rows}") as err:
        stats.calibrate([x], [y], estimator=estimator, batches=batches)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("k", [-1, 2.5, True])
def test_influence_of_a_count_that_is_no_whole_number_is_a_value_error(k):
    # k=-1 listed all rows but one (a slice [:-1]), 2.5 raised TypeError, True listed one
    cal = stats.calibrate([_gauss(12, 3, 0)], [_gauss(12, 2, 1)])
    with pytest.raises(ValueError, match=f"k={k!r} must be a whole number >= 0"):
        cal.influence(0, 0, k)


@pytest.mark.parametrize("case, match", [
    ("other rows", "have 2 and 1 layers of 30 rows, ids 30; res is of 2 and 1 layers of 40"),
    ("other layer count", "have 1 and 1 layers of 40 rows, ids 40; res is of 2 and 1"),
    ("other features", "differs from res.matrix"),
])
def test_calibrating_a_result_with_other_features_says_to_pass_its_own(case, match):
    # A notebook slip (the layers of another result, a subset of the rows): an IndexError,
    # a RuntimeError asking for a bug report, or for fewer rows minibatch CKA
    # silently calibrated on rows the matrix never saw.
    x, z, y = _gauss(40, 6, 0), _gauss(40, 4, 1), _gauss(40, 5, 2)
    res = compare([x, z], [y], estimator="minibatch", batch_size=10)
    mats_a = {"other rows": [x[:30], z[:30]], "other layer count": [x],
              "other features": [z, x]}[case]
    mats_b = [y[:30]] if case == "other rows" else [y]
    with pytest.raises(ValueError, match=match) as err:
        stats.calibrate_result(res, mats_a, mats_b)
    assert "\n" not in str(err.value)


def test_influence_ids_of_another_length_than_the_rows_are_a_value_error():
    # ids=... of another store's length raised an IndexError (or named the wrong images)
    x, y = _gauss(20, 3, 0), _gauss(20, 2, 1)
    with pytest.raises(ValueError, match="of 20 rows, ids 19; res is of 1 and 1 layers") as err:
        stats.calibrate_result(compare([x], [y]), [x], [y], influence=2, ids=np.arange(19))
    assert "\n" not in str(err.value)


def test_a_batch_of_all_rows_in_another_order_labels_each_row_as_itself():
    # calibrate(batches=[rows]) read all n rows in their own order whenever len(rows) == n,
    # but labelled the leave-one-out values by ``rows``: influence named the wrong images
    x, y = _gauss(12, 3, 0), _gauss(12, 2, 1)
    x[5] *= 20  # the one influential image
    want = dict(stats.calibrate([x], [y]).influence(0, 0, 12))
    got = dict(stats.calibrate([x], [y], batches=[np.arange(12)[::-1]]).influence(0, 0, 12))
    assert got.keys() == want.keys() and all(got[r] == pytest.approx(want[r]) for r in want)
    assert stats.calibrate([x], [y]).influence(0, 0, 1)[0][0] == 5


def test_a_seed_beyond_the_generators_range_is_the_settings_value_error():
    # seed=2**64 raised torch's "Overflow when unpacking long long"
    x, y = _gauss(12, 3, 0), _gauss(12, 2, 1)
    with pytest.raises(ValueError, match=r"seed=18446744073709551616 must be.*-2\*\*63 to 2\*\*64"):
        stats.calibrate([x], [y], permutations=3, seed=2**64)


def test_a_layer_constant_without_one_row_warns_once_naming_it_and_ranks_that_row_first():
    # Without row 5 the layer is constant: CKA without that row is undefined (NaN), which made
    # the standard error NaN silently and sorted the decisive row last in influence.
    x, y = np.zeros((12, 3)), _gauss(12, 4, 0)
    x[5] = [1.0, 2.0, 3.0]
    with pytest.warns(RuntimeWarning) as got:
        cal = stats.calibrate([x, x], [y], estimator="biased")
    said = [str(w.message) for w in got if "no variance" in str(w.message)]
    assert len(said) == 1 and "mats_a[0]" in said[0] and "row 5" in said[0]
    assert np.isnan(cal.se[0, 0])
    (row, change), *rest = cal.influence(0, 0, 3)
    assert row == 5 and np.isnan(change)
    full = ref_cka(x, y)
    for r, d in rest:  # the next rows by their brute-force change
        keep = np.arange(12) != r
        assert d == pytest.approx(ref_cka(x[keep], y[keep]) - full, abs=1e-12)


@pytest.mark.parametrize("estimator, batch_size, rows", [("minibatch", 50, 50),
                                                          ("minibatch", 500, 200),
                                                          ("debiased", None, 200)])
def test_images_per_dimension_count_the_rows_of_one_gram(estimator, batch_size, rows):
    # A rank-one layer has PR exactly 1 in every Gram. Minibatch PRs are measured on (and
    # bounded by) one batch, yet n_over_pr divided all n rows by them: 200 images per
    # dimension where each Gram sees 50.
    x, y = _gauss(200, 1, 0) * [1.0, 2.0, -1.0], _gauss(200, 6, 1)
    res = stats.calibrate_result(compare([x], [y], estimator=estimator, batch_size=batch_size),
                                 [x], [y])
    assert res.pr_a == pytest.approx([1.0], rel=1e-12)
    assert res.to_dict()["n_over_pr_a"] == pytest.approx([rows], rel=1e-12)


@pytest.mark.parametrize("influence", [True, 2.0, -1, "3"])
def test_an_influence_count_that_is_no_whole_number_names_influence(influence):
    # calibrate_result(influence=True) computed everything, then said "k=True must be ...",
    # naming a parameter the caller never passed (and "3" was a TypeError).
    x, y = _gauss(20, 3, 0), _gauss(20, 4, 1)
    with pytest.raises(ValueError, match=rf"^influence={influence!r} must be a whole number"):
        stats.calibrate_result(compare([x], [y]), [x], [y], influence=influence)


@pytest.mark.parametrize("sigma2", [None, [], [1.0, 2.0]])
def test_rbf_grams_without_one_bandwidth_per_matrix_are_a_value_error(sigma2):
    # None gave "'>' not supported between 'NoneType' and 'int'"; too many were used silently.
    with pytest.raises(ValueError, match=r"kernel='rbf' needs sigma2, .* per matrix; got"):
        stats.grams([_gauss(10, 3, 0)], kernel="rbf", sigma2=sigma2)


@pytest.mark.parametrize("batches", [None, minibatches(30, 10)])
def test_the_null_of_a_self_comparison_is_symmetric(batches):
    # cell (i, j) permuted layer i's rows, cell (j, i) layer j's: two null samples of one pair,
    # so a self-similarity heatmap's p-values differed across its diagonal (by 0.16 at 50
    # permutations). As `repsim cka --a M --b M` passes them: equal copies, not one object.
    feats = [_gauss(30, 5, 0), _gauss(30, 3, 1)]
    feats.append(feats[0][:, :2] + 0.5 * _gauss(30, 2, 2))
    cal = stats.calibrate(feats, [x.copy() for x in feats], batches=batches, permutations=30)
    for v in cal.null.values():
        assert np.array_equal(v, v.T)
    assert cal.null["p_value"][0, 2] < cal.null["p_value"][0, 1]  # still each pair's own null


def test_jackknife_se_of_no_estimates_is_nan_as_documented():
    # "NaN for g < 2": g = 0 raised ZeroDivisionError.
    got = stats.jackknife_se(np.ones((0, 2, 3)))
    assert got.shape == (2, 3) and np.isnan(got).all()


@pytest.mark.parametrize("strip", [-1, 0, 2.5, "8", True])
def test_calibrate_refuses_a_strip_that_is_no_row_count(strip):
    # strip=-1 gave NaN standard errors silently; 2.5 and "8" a TypeError from deep inside.
    x = np.random.default_rng(0).standard_normal((12, 3))
    with pytest.raises(ValueError, match=rf"strip={strip!r} must be a whole number >= 1"):
        stats.calibrate([x], [x[:, :2]], strip=strip)


def test_gram_statistics_of_float32_grams_are_computed_in_float64():
    # Float32 Grams were worked on in float32: leave-one-out HSIC 1.6e-3 off (relative).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)) + 3
    y = x[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((40, 4))
    k32, l32 = (torch.tensor(z @ z.T, dtype=torch.float32)[None] for z in (x, y))
    k64, l64 = k32.double(), l32.double()  # the same values, exactly
    for f in (stats.hsic, stats.leave_one_out):
        got = f(k32, l32, True)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got, f(k64, l64, True), rtol=1e-12)
    assert stats.participation_ratio(k32).dtype == torch.float64
    np.testing.assert_allclose(stats.participation_ratio(k32), stats.participation_ratio(k64),
                               rtol=1e-12)
