"""Per-layer linear probes and principal-component deletion (repsim.probes), against known
answers: isometric layers probe exactly like their input, separable classes give accuracy 1,
deleting k components matches the SVD and CKA's closed form; and the ``probes`` figure."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from repsim.cka import cka_matrix, linear_cka
from repsim.errors import UserError
from repsim.probes import (
    linear_probe,
    probe_layers,
    probe_model,
    remove_top_pcs,
    stratified_split,
)


def blobs(n_per_class=40, classes=3, dim=8, spread=1.0, seed=0):
    """Gaussian classes around random centres: (n, dim) float32 features, (n,) labels."""
    g = np.random.default_rng(seed)
    centres = g.standard_normal((classes, dim)) * 1.5
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + spread * g.standard_normal((len(y), dim))
    return x.astype(np.float32), y


def orthonormal_columns(rows, cols, seed):
    """A (rows, cols) matrix with orthonormal columns (rows >= cols): an isometric map."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return torch.tensor(q, dtype=torch.float32)


class Scale(nn.Module):
    def forward(self, x):
        return 3.7 * x


def isometric_net(dim):
    """Layers that are fixed random isometries of the input (plus translations, a scale)."""
    rotate, embed = nn.Linear(dim, dim), nn.Linear(dim, 3 * dim)
    with torch.no_grad():
        rotate.weight.copy_(orthonormal_columns(dim, dim, 1))
        embed.weight.copy_(orthonormal_columns(3 * dim, dim, 2))
    return nn.Sequential(rotate, embed, Scale())


def test_isometric_layers_probe_exactly_like_the_input():
    # Hard enough that per-feature z-scoring breaks the equality (0.70, 0.75, 0.75 vs 0.717)
    x, y = blobs(n_per_class=30, classes=4, dim=16, spread=2.5)
    probes = probe_model(isometric_net(x.shape[1]), torch.from_numpy(x), y, layers=["0", "1", "2"],
                         ks=(), device="cpu", seed=3)
    train, test = stratified_split(y, 0.5, 3)
    direct = linear_probe(x[train], y[train], x[test], y[test], device="cpu")
    assert 0.5 < direct < 1.0  # overlapping classes: the equality below says something
    assert probes.layers == ["0", "1", "2"] and probes.ks == [0]
    np.testing.assert_array_equal(probes.accuracy[:, 0], [direct] * 3)
    # A non-isometric map (one feature stretched 20x) is not invariant: the test can fail.
    stretched = x * np.r_[20.0, np.ones(x.shape[1] - 1)].astype(np.float32)
    assert linear_probe(stretched[train], y[train], stretched[test], y[test],
                        device="cpu") != direct


def test_separable_classes_are_probed_perfectly_and_labels_may_be_any_integers():
    x, y = blobs(n_per_class=30, classes=4, dim=10, spread=0.05, seed=1)
    train, test = stratified_split(y, 0.5, 0)
    assert linear_probe(x[train], y[train] * 7 - 3, x[test], y[test] * 7 - 3,
                        device="cpu") == 1.0


def test_the_split_is_stratified_seeded_and_disjoint():
    y = np.repeat(np.arange(5), 20)
    train, test = stratified_split(y, 0.5, 0)
    assert np.bincount(y[train]).tolist() == [10] * 5
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == 100
    np.testing.assert_array_equal(train, stratified_split(y, 0.5, 0)[0])
    assert not np.array_equal(train, stratified_split(y, 0.5, 1)[0])


@pytest.mark.parametrize("n,p", [(40, 12), (12, 40)])  # both branches: X'X and the Gram
def test_removing_top_pcs_matches_the_svd_and_cka_closed_form(n, p):
    g = np.random.default_rng(0)
    x = g.standard_normal((n, p)) * np.geomspace(10, 0.1, p) + 5.0  # distinct spectrum, offset
    xc = x - x.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    for k in (0, 1, 3, 5):
        out = remove_top_pcs(x, k)
        assert out.shape == (n, p) and out.dtype == np.float64
        np.testing.assert_allclose(out, xc - (u[:, :k] * s[:k]) @ vt[:k], atol=1e-10)
        closed = np.sqrt((s[k:] ** 4).sum() / (s ** 4).sum())
        np.testing.assert_allclose(linear_cka(x, out, debiased=False), closed, rtol=1e-10)
    assert np.abs(remove_top_pcs(x, min(n, p))).max() < 1e-9  # everything deleted


def test_probe_layers_matches_reference_layers_and_is_deterministic():
    x, y = blobs(n_per_class=30, classes=3, dim=6, seed=2)
    g = np.random.default_rng(5)
    feats = {"a": x @ g.standard_normal((6, 9)), "narrow": x[:, :3]}
    ref = {"noise": g.standard_normal((len(y), 5)), "copy": np.tanh(feats["a"])}
    kw = dict(ks=(1, 5), reference=ref, estimator="biased", device="cpu")
    res = probe_layers(feats, y, **kw)
    assert res.ks == [0, 1, 5] and res.match_layers == ["copy", "copy"]
    full = cka_matrix(feats, ref, estimator="biased")
    np.testing.assert_allclose(res.match_cka[:, 0], full[:, 1], rtol=1e-12)
    np.testing.assert_allclose(res.self_cka[:, 0], 1.0, rtol=1e-12)
    s = np.linalg.svd(feats["a"] - feats["a"].mean(0), compute_uv=False)
    closed = [np.sqrt((s[k:] ** 4).sum() / (s ** 4).sum()) for k in (1, 5)]
    np.testing.assert_allclose(res.self_cka[0, 1:], closed, rtol=1e-10)
    assert np.isnan(res.accuracy[1, 2]) and np.isnan(res.self_cka[1, 2])  # 3 < k = 5
    assert np.isfinite(res.accuracy[:, :2]).all() and res.n_train == res.n_test == 45
    again = probe_layers(feats, y, **kw)
    for field in ("accuracy", "self_cka", "match_cka"):
        np.testing.assert_array_equal(getattr(res, field), getattr(again, field))
    assert json.loads(json.dumps(res.to_dict()))["accuracy"][1][2] is None


def test_bad_inputs_are_user_errors_naming_the_parameter():
    x, y = blobs()
    with pytest.raises(UserError, match="k=9"):
        remove_top_pcs(x, 9)
    with pytest.raises(UserError, match="labels"):
        probe_layers({"a": x}, y[:-1])
    with pytest.raises(UserError, match="weight_decay=-1"):
        linear_probe(x, y, x, y, weight_decay=-1)
    with pytest.raises(UserError, match="train_fraction=1"):
        stratified_split(y, 1.0, 0)


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_train_fraction_out_of_range_names_train_fraction(fraction):
    # balanced_subset refused these as "fraction=...", a name the caller never used.
    x, y = blobs()
    with pytest.raises(UserError, match=f"train_fraction={fraction} is out of range"):
        probe_layers({"a": x}, y, train_fraction=fraction)



def test_a_train_fraction_too_small_for_any_class_names_train_fraction():
    # One row per class: round(0.3) = 0 of each. balanced_subset said "fraction=0.3 selects
    # no samples", a parameter the caller never passed (the CLI showed it as --fraction).
    with pytest.raises(UserError, match=r"train_fraction=0.3 selects no training rows") as err:
        stratified_split(np.arange(3), 0.3, 0)
    assert "fraction=0.3 selects no samples" not in str(err.value)


# ------------------------------------------------------------------ the figure kind

SPEC = """kind = "probes"
models = ["vit_cifar", "resnet18_cifar"]
ks = [1, 5]
weight_decay = 0.01         # converges faster on 20 training images
[probe]
dataset = "cifar10-probe"
n = 40
reduce = "mean"
[cka]
estimator = "minibatch"
"""


def test_the_probes_figure_puts_accuracy_by_depth_next_to_the_best_match_curve(tmp_path,
                                                                               monkeypatch):
    from repsim.figures.runner import build_all
    from repsim.models import build_model

    ck = tmp_path / "ckpt"
    ck.mkdir()
    for name in ("vit_cifar", "resnet18_cifar"):  # random weights: the plumbing, not the study
        torch.save(build_model(name, seed=0).state_dict(), ck / f"{name}.pt")
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    a = tmp_path / "analyses"
    a.mkdir()
    (a / "probes.toml").write_text(SPEC)
    (a / "rbf.toml").write_text(SPEC.replace('estimator = "minibatch"', 'kernel = "rbf"'))
    (a / "missing.toml").write_text(SPEC.replace(
        'models = ["vit_cifar"', 'models = [{model = "vit_cifar", weights = "nope.pt"}'))
    out = build_all(a, tmp_path / "figures", progress=False)
    assert [e["name"] for e in out["built"]] == ["probes"]
    assert [e["name"] for e in out["skipped"]] == ["missing"]
    assert [e["name"] for e in out["failed"]] == ["rbf"] and "kernel" in out["failed"][0]["reason"]
    figs = tmp_path / "figures"
    assert (figs / "probes.png").exists() and (figs / "probes.pdf").exists()
    data = json.loads((figs / "probes.json").read_text())["data"]
    vit, res = data["entries"]
    assert vit["layers"] == ["embed"] + [f"blocks.{i}" for i in range(6)]
    assert res["layers"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    for e in (vit, res):
        assert e["ks"] == [0, 1, 5] and e["weight_decay"] == 0.01
        assert e["n_train"] + e["n_test"] == data["n"] == 40
        assert all(0 <= v <= 1 for row in e["accuracy"] for v in row)
        # the k = 0 column is the best-match curve of the figure's own CKA result
        assert e["match_layers"] == e["curve"]["best_layer_b"]
        np.testing.assert_allclose([r[0] for r in e["match_cka"]], e["curve"]["value"],
                                   rtol=1e-9)
    assert 0 <= data["pixel_accuracy"] <= 1
    csv = (figs / "probes.csv").read_text().splitlines()
    assert csv[0] == "model,layer,k,accuracy,self_cka,match_layer,match_cka"
    assert len(csv) == 1 + 3 * (7 + 5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_refused_not_probed_at_chance(bad):
    # A NaN (or inf) training row made every logit NaN: argmax picked class 0 for every test
    # row, so the probe returned the share of class 0 (1/3 here) with no warning at all, and
    # the L-BFGS gradient check, NaN > tolerance being False, stayed silent too.
    x, y = blobs(n_per_class=10, classes=3, dim=4, spread=0.05)
    train, test = stratified_split(y, 0.5, 0)
    assert linear_probe(x[train], y[train], x[test], y[test], device="cpu") == 1.0
    x[train[4], 2] = bad
    with pytest.raises(UserError, match="train_x has non-finite values \\(first at row 4\\)"):
        linear_probe(x[train], y[train], x[test], y[test], device="cpu")
    with pytest.raises(UserError, match="test_x has non-finite values"):
        linear_probe(x[test], y[test], x[train], y[train], device="cpu")
    with pytest.raises(UserError, match=f"layer 'a' has non-finite values \\(first at row "
                                        f"{train[4]}\\)"):
        probe_layers({"a": x}, y, ks=(1,), device="cpu")  # was a LinAlgError from eigh


@pytest.mark.parametrize("decay", [float("nan"), float("inf")])
def test_a_non_finite_weight_decay_is_refused_not_probed_at_chance(decay):
    """weight_decay = nan (valid TOML) passed the check `< 0`, made the loss NaN, and the
    probe reported the share of class 0 as its accuracy, with no warning."""
    x, y = blobs()
    with pytest.raises(UserError, match=f"weight_decay={decay}"):
        linear_probe(x, y, x, y, weight_decay=decay)


def test_a_boolean_in_the_probes_figures_ks_is_refused():
    """ks = [true] deleted one component: a bool passed the integer check."""
    from types import SimpleNamespace

    from repsim.figures.probes import _options

    ctx = SimpleNamespace(name="p", positive_int=lambda spec, key, default: default)
    assert _options({"ks": [0, 2]}, ctx)["ks"] == [0, 2]
    with pytest.raises(UserError, match=r"ks=\[True\] must be a list of non-negative integers"):
        _options({"ks": [True]}, ctx)


@pytest.mark.parametrize("ks", [5, (1.5,), (True,), "15"])
def test_ks_that_is_not_a_list_of_counts_is_refused_naming_ks(ks):
    # ks=5 raised TypeError ('int' object is not iterable); (1.5,) deleted 1 component and
    # (True,) one, silently; "15" deleted 1 and 5.
    x, y = blobs()
    with pytest.raises(UserError, match=r"ks=.* must be a list of non-negative integers"):
        probe_layers({"a": x}, y, ks=ks, device="cpu")


@pytest.mark.parametrize("k", [1.0, np.float64(2)])
def test_a_fractional_type_k_is_refused_naming_k(k):
    # remove_top_pcs(x, 1.0) raised TypeError: slice indices must be integers.
    x, _ = blobs()
    with pytest.raises(UserError, match=r"k=.* must be a whole number"):
        remove_top_pcs(x, k)


def test_torch_features_of_any_dtype_probe_like_their_float32_values():
    # A bfloat16 tensor (autocast activations) raised TypeError: unsupported ScalarType.
    x, y = blobs(n_per_class=10)
    xb = torch.from_numpy(x).bfloat16()
    kw = dict(ks=(1,), device="cpu", steps=50)
    got = probe_layers({"a": xb}, y, reference={"r": xb}, **kw)
    want = probe_layers({"a": xb.float().numpy()}, y, reference={"r": xb.float().numpy()}, **kw)
    np.testing.assert_array_equal(got.accuracy, want.accuracy)
    np.testing.assert_array_equal(got.match_cka, want.match_cka)


def test_deleting_every_component_of_a_low_rank_layer_leaves_zeros_not_rounding_noise():
    # A rank-1 layer of width 2 minus its top component was ~1e-16 noise, which the probe
    # rescaled and scored (0.77 on two classes) and CKA read as 0.31 with the layer.
    x, y = blobs(n_per_class=30, classes=2, dim=1)
    x = x.astype(np.float64)
    rank1 = np.c_[x, 2 * x]
    np.testing.assert_array_equal(remove_top_pcs(rank1, 1), np.zeros_like(rank1))
    with pytest.warns(RuntimeWarning, match="zero variance"):  # CKA says the layer is gone
        res = probe_layers({"p1": x, "rank1": rank1}, y, ks=(1,), device="cpu")
    np.testing.assert_array_equal(res.accuracy[1], res.accuracy[0])  # as a width-1 layer
    assert np.isnan(res.self_cka[1, 1])


def test_a_float32_low_rank_layer_loses_everything_as_its_float64_copy_does():
    # A rank-3 float32 layer of width 20 minus its top 3 components left its float32 rounding
    # (~1e-8 of its norm, above the float64-sized cut): the probe scored that noise (0.34 and
    # 0.30 on four classes where the float64 copy gave 0.25) and CKA read -0.04 for NaN.
    g = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    x = ((g.standard_normal((4, 3))[y] + g.standard_normal((200, 3)))
         @ g.standard_normal((3, 20))).astype(np.float32)
    train = np.arange(0, 200, 2)
    for fit_rows in (None, train):
        np.testing.assert_array_equal(remove_top_pcs(x, 3, fit_rows=fit_rows), np.zeros(x.shape))
        np.testing.assert_array_equal(remove_top_pcs(x + 100, 3, fit_rows=fit_rows),  # rounded
                                      np.zeros(x.shape))  # relative to 100, not to the spread
        np.testing.assert_array_equal(remove_top_pcs(torch.from_numpy(x), 3, fit_rows=fit_rows),
                                      np.zeros(x.shape))
    kept = remove_top_pcs(x, 2)  # one real component is left, and kept
    assert np.linalg.norm(kept) > 0.01 * np.linalg.norm(x - x.mean(0))


def test_the_probes_deletion_is_fitted_on_the_training_rows_only():
    # Training rows: the class on axis 0 (+-1), a larger class-free spread on axis 1 (+-3);
    # test rows: the class at +-10 on axis 0, nothing on axis 1. The training rows' top
    # component is axis 1, so deleting it leaves the class: accuracy 1. Fitted on all rows,
    # the test rows made axis 0 the top component and the probe scored 0.5, chance: the test
    # rows chose what the probe was trained on.
    y = np.repeat([0, 1], 40)
    train, test = stratified_split(y, 0.5, 0)
    x = np.zeros((80, 2))
    x[train, 0] = np.where(y[train] == 1, 1.0, -1.0)
    x[train, 1] = np.tile([3.0, -3.0], 20)  # +-3 within each class: no label in it
    x[test, 0] = np.where(y[test] == 1, 10.0, -10.0)
    res = probe_layers({"a": x}, y, ks=(1,), device="cpu")
    np.testing.assert_array_equal(res.accuracy, [[1.0, 1.0]])
    # CKA has no split: the layer's own deletion still uses all rows (axis 0 goes).
    np.testing.assert_allclose(res.self_cka[0, 1], linear_cka(x, remove_top_pcs(x, 1),
                                                              debiased=True), rtol=1e-12)


@pytest.mark.parametrize("n,p", [(40, 12), (12, 40)])  # both branches: X'X and the Gram
def test_removing_top_pcs_of_some_rows_projects_every_row_on_theirs(n, p):
    g = np.random.default_rng(1)
    x = g.standard_normal((n, p)) * np.geomspace(10, 0.1, p) + 5.0
    rows = np.arange(0, n, 2)
    mean = x[rows].mean(0)
    vt = np.linalg.svd(x[rows] - mean, full_matrices=False)[2]
    for k in (0, 1, 3):
        want = (x - mean) - (x - mean) @ vt[:k].T @ vt[:k]
        np.testing.assert_allclose(remove_top_pcs(x, k, fit_rows=rows), want, atol=1e-10)
    np.testing.assert_allclose(remove_top_pcs(x, 3, fit_rows=np.arange(n)),
                               remove_top_pcs(x, 3), atol=1e-10)
    # k at or above the rank of the fitting rows (len(rows) - 1, centred): nothing is left
    mask = np.isin(np.arange(n), rows)  # the same rows as a boolean mask
    for k in (min(len(rows) - 1, p), min(n, p)):
        assert not remove_top_pcs(x, k, fit_rows=mask).any()
    with pytest.raises(UserError, match=r"fit_rows="):
        remove_top_pcs(x, 1, fit_rows=[n])


def test_results_of_numpy_scalar_options_stay_json_able():
    # seed=np.int64 (a loop over np.arange) or weight_decay=np.float32 went into the result
    # as given, and json.dumps(res.to_dict()) raised "int64 is not JSON serializable".
    x, y = blobs(n_per_class=10)
    res = probe_layers({"a": x}, y, ks=(1,), seed=np.int64(1),
                       weight_decay=np.float32(0.01), device="cpu")
    back = json.loads(json.dumps(res.to_dict()))
    assert back["seed"] == 1 and back["weight_decay"] == pytest.approx(0.01)
    assert type(back["seed"]) is int


@pytest.mark.parametrize("steps", [2.5, True, "50"])
def test_steps_that_is_not_a_whole_number_is_refused(steps):
    # 2.5 and True ran as L-BFGS max_iter silently; "50" raised TypeError from a comparison.
    x, y = blobs()
    with pytest.raises(UserError, match=r"steps=.* must be a whole number"):
        linear_probe(x, y, x, y, steps=steps, device="cpu")


def test_a_layer_that_is_not_a_matrix_is_refused_naming_the_layer():
    # A (n, C, H, W) map was refused as "x has shape (...)", a parameter probe_layers has not.
    x, y = blobs(n_per_class=10, dim=8)
    with pytest.raises(UserError, match=r"layer 'maps' has shape \(30, 2, 2, 2\); pass"):
        probe_layers({"flat": x, "maps": x.reshape(30, 2, 2, 2)}, y, ks=(1,), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="labels on a GPU need one")
def test_labels_on_the_gpu_probe_like_their_cpu_copy():
    # np.asarray(labels) raised TypeError (can't convert cuda:0 device type tensor to numpy)
    # for a notebook's y.cuda(), in linear_probe, stratified_split and probe_layers alike.
    x, y = blobs(n_per_class=10)
    yg = torch.from_numpy(y).cuda()
    train, test = stratified_split(yg, 0.5, 0)
    np.testing.assert_array_equal(train, stratified_split(y, 0.5, 0)[0])
    assert linear_probe(x[train], yg[train], x[test], yg[test]) == linear_probe(
        x[train], y[train], x[test], y[test])
    kw = dict(ks=(1,), steps=50)
    np.testing.assert_array_equal(probe_layers({"a": x}, yg, **kw).accuracy,
                                  probe_layers({"a": x}, y, **kw).accuracy)
