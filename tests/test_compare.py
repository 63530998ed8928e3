"""`repsim cka`: stores in, matrix file and heatmap out; alignment checks, caching, the
bundled probe set, and extraction on demand from model names."""

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import reference
import torch

from repsim import cli
from repsim.compare import CKAConfig, ProbeSpec, StoreRef, resolve_store, run_cka, select_layers
from repsim.paths import ids_digest
from repsim.store import StoreWriter

BLOCKS = [f"blocks.{i}" for i in range(12)]  # blocks.10 sorts before blocks.2 in HDF5


def make_store(path, feats: dict, ids=None, labels=None, meta=None, dtype="float32"):
    """A complete store holding ``feats`` (name -> (n, D)) in the given order."""
    n = len(next(iter(feats.values())))
    ids = np.arange(n) * 7 if ids is None else np.asarray(ids)
    labels = np.arange(n) % 3 if labels is None else np.asarray(labels)
    meta = meta or {"model": path.stem, "data": {"dataset": "toy", "split": "test", "n": n}}
    w = StoreWriter(path, meta, ids, labels, batch_size=n)
    w.create_layers({k: v.shape[1] for k, v in feats.items()}, dtype, n, None)
    w.write(0, {k: v.astype(dtype) for k, v in feats.items()})
    w.finish()
    return path


def toy_feats(names, n=24, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 6))
    return {name: np.tanh(base @ rng.standard_normal((6, 5 + i))) + 0.3 * rng.standard_normal(
        (n, 5 + i)) for i, name in enumerate(names)}


def result_stem(folder, prefix):
    """The one result in ``folder`` named ``<prefix>-<digest of its inputs>.json``, less .json."""
    (path,) = folder.glob(f"{prefix}-*.json")
    return path.with_suffix("")


def run_cli(capsys, *argv):
    code = cli.main(["cka", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    """``repsim cka ARGV --json``, which must succeed: its one JSON object, and stderr."""
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out), err


@pytest.fixture
def pair(tmp_path):
    fa, fb = toy_feats(BLOCKS, seed=1), toy_feats(["stem", "layer1", "layer2"], seed=2)
    return (make_store(tmp_path / "a.h5", fa), make_store(tmp_path / "b.h5", fb), fa, fb)


def test_json_has_layers_in_model_order_and_reference_values(tmp_path, pair, capsys):
    pa, pb, fa, fb = pair
    r, _ = run_json(capsys, "--a", pa, "--b", pb, "--out", tmp_path / "o", "--estimator",
                    "biased")
    for key in ("model_a", "model_b", "layers_a", "layers_b", "kernel", "estimator", "n",
                "matrix"):
        assert key in r
    assert (r["model_a"], r["model_b"], r["n"]) == ("a", "b", 24)
    assert r["layers_a"] == BLOCKS and r["layers_b"] == ["stem", "layer1", "layer2"]
    m = np.array(r["matrix"])
    assert m.shape == (12, 3)
    for i, j in [(0, 0), (10, 2), (11, 1)]:
        want = reference.cka(fa[BLOCKS[i]].astype(np.float32), fb[r["layers_b"][j]]
                             .astype(np.float32))
        assert m[i, j] == pytest.approx(want, abs=1e-10)


def test_result_file_and_heatmaps_carry_metadata(tmp_path, pair, capsys):
    pa, pb, _, _ = pair
    code, out, err = run_cli(capsys, "--a", pa, "--b", pb, "--out", tmp_path / "o",
                             "--estimator", "minibatch", "--batch-size", "8")
    assert code == 0, err
    stem = result_stem(tmp_path / "o", "a__b__linear-minibatch")
    for ext in ("json", "png", "pdf"):
        assert (stem.parent / f"{stem.name}.{ext}").stat().st_size > 0
        assert f"{stem.name}.{ext}" in out  # the summary line says where things went
    r = json.loads(stem.with_suffix(".json").read_text())
    assert r["batch_size"] == 8 and r["n_batches"] == 3 and r["batch_seed"] == 0
    assert r["samples"]["ids_sha256"] == ids_digest(np.arange(24) * 7)
    assert r["inputs"]["a"]["path"] == str(pa) and r["inputs"]["b"]["path"] == str(pb)
    assert set(r["versions"]) >= {"repsim", "torch", "numpy"}


def test_self_similarity_has_unit_diagonal_and_is_bit_identical(tmp_path, pair, capsys):
    pa = pair[0]
    args = ["--a", pa, "--b", pa, "--out", tmp_path / "o", "--estimator", "debiased"]
    assert run_cli(capsys, *args)[0] == 0
    stem = result_stem(tmp_path / "o", "a__a__linear-debiased")
    first = {ext: (stem.parent / f"{stem.name}.{ext}").read_bytes()
             for ext in ("json", "png", "pdf")}
    m = np.array(json.loads(first["json"])["matrix"])
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
    np.testing.assert_array_equal(m, m.T)
    assert run_cli(capsys, *args, "--force")[0] == 0  # recomputed from scratch
    for ext, data in first.items():
        assert (stem.parent / f"{stem.name}.{ext}").read_bytes() == data, ext


@pytest.mark.parametrize("n, ids, labels, message", [
    (16, None, None, "A has 24 rows and B has 16"),  # both sizes
    (24, np.arange(24) * 7 + (np.arange(24) >= 5), None,  # the ids differ from row 5 on
     "first differ at row 5 (A id 35, B id 36)"),
    (24, None, np.arange(24) % 5, "different labels")])
def test_stores_of_other_samples_are_refused_in_one_line(tmp_path, pair, capsys, n, ids, labels,
                                                         message):
    pc = make_store(tmp_path / "c.h5", toy_feats(["x"], n=n), ids=ids, labels=labels)
    code, out, err = run_cli(capsys, "--a", pair[0], "--b", pc, "--out", tmp_path / "o")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert message in err and "ids sha256" in err


def test_incomplete_store_is_refused_in_one_line(tmp_path, pair, capsys):
    w = StoreWriter(tmp_path / "half.h5", {"model": "m"}, np.arange(24), np.zeros(24), 8)
    w.close()
    code, _, err = run_cli(capsys, "--a", pair[0], "--b", tmp_path / "half.h5")
    assert code == 1 and err.count("\n") == 1 and "incomplete" in err


def test_corrupt_store_is_refused_in_one_line(tmp_path, pair, capsys):
    (tmp_path / "bad.h5").write_bytes(b"\x89HDF garbage")
    code, _, err = run_cli(capsys, "--a", tmp_path / "bad.h5", "--b", pair[1])
    assert code == 1 and err.count("\n") == 1 and "bad.h5 is not a repsim store" in err


def test_full_disk_while_drawing_the_heatmap_is_one_line(tmp_path, pair, file_size_limit):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "repsim", "cka", "--a", str(pair[0]), "--b",
                        str(pair[1]), "--out", str(out), "--json"], capture_output=True,
                       text=True, preexec_fn=file_size_limit(20_000), timeout=120)  # json fits
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert f"cannot write {out}" in line and ".png: File too large" in line
    assert "--out PATH" in line and not list(out.glob("*.png")) + list(out.glob(".*"))


def test_the_default_is_minibatch_of_1024_rows_and_batch_size_needs_it(tmp_path, pair,
                                                                       capsys):
    pa, pb, fa, fb = pair
    r, _ = run_json(capsys, "--a", pa, "--b", pb)
    assert (r["estimator"], r["batch_size"], r["n_batches"]) == ("minibatch", 1024, 1)
    want = reference.cka(fa["blocks.3"].astype(np.float32), fb["layer1"].astype(np.float32),
                         debiased=True)  # one batch of all 24 rows: debiased CKA
    assert r["matrix"][3][1] == pytest.approx(want, abs=1e-10)
    code, _, err = run_cli(capsys, "--a", pa, "--b", pb, "--estimator", "debiased",
                           "--batch-size", "8")
    assert code == 1 and "--batch-size 8 applies to --estimator 'minibatch' only" in err


def test_second_run_does_no_work_until_a_store_changes(tmp_path, pair, capsys):
    pa, pb, _, _ = pair
    args = ["--a", pa, "--b", pb, "--out", tmp_path / "o"]
    run_json(capsys, *args)
    files = sorted((tmp_path / "o").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    assert run_json(capsys, *args)[0]["reused"] is True
    assert [f.stat().st_mtime_ns for f in files] == stamps
    later = time.time() + 5  # a re-written store (newer than the result) invalidates it
    os.utime(pb, (later, later))
    assert run_json(capsys, *args)[0]["reused"] is False


def test_new_axis_labels_are_not_answered_from_a_result_with_the_old_ones(tmp_path, pair):
    pa, pb, _, _ = pair
    common = dict(a=str(pa), b=str(pb), out=str(tmp_path / "o"), plots=False, progress=False,
                  se=False)
    run_cka(CKAConfig(**common, label_a="first"))
    again = run_cka(CKAConfig(**common, label_a="second", label_b="other"))
    assert again["result"]["model_a"] == "second" and again["result"]["model_b"] == "other"
    assert json.loads(open(again["files"][0]).read())["model_a"] == "second"


def test_the_default_output_folder_names_the_probe_set_with_its_seed(tmp_path):
    """README: ``$REPSIM_CACHE/cka/<dataset>-<split>-n<N>-seed<S>-<reduce>/``; two subsets of
    one size (other seeds) are other probe sets."""
    feats = toy_feats(["l0"], n=12)
    meta = {"model": "m", "reduce": "mean",
            "data": {"dataset": "toy", "split": "test", "n": 12, "seed": 3}}
    store = make_store(tmp_path / "m.h5", feats, meta=meta)
    res = run_cka(CKAConfig(a=str(store), b=str(store), plots=False, progress=False, se=False))
    assert os.path.basename(os.path.dirname(res["files"][0])) == "toy-test-n12-seed3-mean"


@pytest.mark.parametrize("memory_budget", [None, 4096])  # from sketches, or streamed
def test_a_constant_layer_gives_nan_and_a_warning_naming_it(tmp_path, memory_budget):
    feats = {**toy_feats(["l0"], n=24), "const": np.full((24, 3), 2.5)}
    store = make_store(tmp_path / "m.h5", feats)
    cfg = CKAConfig(a=str(store), b=str(store), plots=False, progress=False, se=False,
                    memory_budget=memory_budget, out=str(tmp_path / "o"))
    with pytest.warns(RuntimeWarning, match="'const' has zero variance"):
        m = np.array(run_cka(cfg)["result"]["matrix"], dtype=float)
    assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all() and m[0, 0] == pytest.approx(1)


def test_an_interrupted_recompute_does_not_leave_the_old_heatmap_looking_current(
        tmp_path, pair, monkeypatch):
    from repsim.figures import draw

    pa, pb, _, _ = pair
    cfg = CKAConfig(a=str(pa), b=str(pb), out=str(tmp_path / "o"), progress=False, se=False)
    for f in run_cka(cfg)["files"]:  # B re-written after the result: it is out of date
        os.utime(f, (time.time() - 20, time.time() - 20))
    os.utime(pb, (time.time() - 10, time.time() - 10))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(draw, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_cka(cfg)
    assert run_cka(cfg)["reused"] is False  # not the new matrix beside the old heatmap


def test_streamed_blocks_equal_the_in_memory_result(tmp_path, pair):
    pa, pb, _, _ = pair
    common = dict(a=str(pa), b=str(pb), out=str(tmp_path / "o"), plots=False, progress=False,
                  force=True)
    full = run_cka(CKAConfig(**common))["result"]["matrix"]
    tiny = run_cka(CKAConfig(**common, memory_budget=4096))["result"]["matrix"]
    np.testing.assert_allclose(tiny, full, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ bundled probe set


def test_bundled_probe_set_is_100_per_class_with_recorded_ids():
    from repsim.data import bundled_info, load_probe_set

    p = load_probe_set("cifar10-probe")
    assert p.images.shape == (1000, 32, 32, 3) and p.images.dtype == np.uint8
    assert np.bincount(p.labels).tolist() == [100] * 10
    assert np.all(np.diff(p.ids) > 0) and p.ids.max() < 10_000
    assert p.provenance()["ids_sha256"] == bundled_info()["ids_sha256"]
    assert p.provenance()["dataset"] == "cifar10" and "bundled" in p.source
    sub = load_probe_set("cifar10-probe", n=10, seed=3)
    assert set(sub.ids) <= set(p.ids) and len(sub) == 10


def test_bundled_probe_set_refuses_train_split_and_large_n():
    from repsim.data import load_probe_set
    from repsim.errors import UserError

    with pytest.raises(UserError, match="test images only"):
        load_probe_set("cifar10-probe", "train")
    with pytest.raises(UserError, match="larger than the 1000"):
        load_probe_set("cifar10-probe", n=1001)


# ------------------------------------------------------------------ model names


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    from repsim.models import build_model

    ck = tmp_path / "ckpt"
    ck.mkdir()
    for name in ("vit_cifar", "resnet18_cifar"):
        torch.save(build_model(name).state_dict(), ck / f"{name}.pt")
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    return ck


def test_model_names_are_extracted_on_demand_then_reused(checkpoints, capsys):
    from repsim.models import build_model

    args = ["--a", "vit_cifar", "--b", "resnet18_cifar", "--n", "8"]
    r, _ = run_json(capsys, *args)
    assert r["layers_a"] == ["embed"] + [f"blocks.{i}" for i in range(6)]
    assert r["layers_b"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert r["samples"]["dataset"] == "cifar10" and r["n"] == 8
    assert "bundled" in r["samples"]["source"]
    assert run_json(capsys, *args)[0]["reused"] is True
    # New weights under the same name: a new store (content-addressed), a new result.
    torch.save(build_model("vit_cifar", seed=1).state_dict(), checkpoints / "vit_cifar.pt")
    r2, err = run_json(capsys, *args)
    assert r2["reused"] is False and "extracted vit_cifar" in err
    assert "extracted resnet18_cifar" not in err  # B's store is reused
    assert r2["inputs"]["a"]["weights_sha256"] != r["inputs"]["a"]["weights_sha256"]
    assert r2["inputs"]["a"]["path"] != r["inputs"]["a"]["path"]
    assert os.path.exists(r["inputs"]["a"]["path"])  # the old weights' store is kept
    assert not np.allclose(r2["matrix"], r["matrix"])


def test_the_same_request_twice_reuses_the_store_without_extracting(checkpoints, monkeypatch):
    from repsim import models

    first = resolve_store("resnet18_cifar", probe=ProbeSpec(n=8), progress=False)
    assert first.how == "extracted"
    stamp = first.path.stat().st_mtime_ns

    def no_model(*args, **kwargs):
        raise AssertionError("a reused store needs no model")

    monkeypatch.setattr(models, "load_model", no_model)
    again = resolve_store("resnet18_cifar", probe=ProbeSpec(n=8), progress=False)
    assert (again.path, again.how) == (first.path, "reused")
    assert again.path.stat().st_mtime_ns == stamp


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A registered MLP ("tiny_cmp": layers "0", "1", "2") and its default weights file:
    extractions in milliseconds."""
    from torch import nn

    from repsim import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(tmp_path / "ckpt"))
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    build = registry.register_model("tiny_cmp", input_size=4, weights="tiny_cmp.pt")(
        lambda num_classes: nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.Linear(5, 3)))
    (tmp_path / "ckpt").mkdir()
    torch.save(build(3).state_dict(), tmp_path / "ckpt" / "tiny_cmp.pt")
    return build


def _side(layers, n=8):
    """``resolve_input`` of "tiny_cmp" as one side of a comparison: (store, selected layers)."""
    from repsim.compare import resolve_input

    return resolve_input("tiny_cmp", None, layers, None, False,
                         dict(probe=ProbeSpec(n=n), progress=False))


def test_a_layer_subset_of_a_model_extracts_only_those_layers(tiny):
    # --layers-a blocks.3 extracted the model's whole default store first (for vit_imagenet
    # about 8 GB), then picked the one layer from it.
    store, layers = _side("1")
    assert (store.how, store.layers, layers) == ("extracted", ["1"], ["1"])
    assert [p.name for p in store.path.parent.glob("*.h5")] == [store.path.name]


@pytest.mark.parametrize("request_", ["all", "default", ["all"]])
def test_every_layer_of_a_model_is_its_default_store(tiny, request_):
    store, layers = _side(request_)
    assert store.layers == layers == ["0", "1", "2"]
    assert store.path == resolve_store("tiny_cmp", probe=ProbeSpec(n=8), progress=False).path


def test_a_layer_subset_reuses_a_default_store_that_holds_it(tiny, monkeypatch):
    from repsim import models

    full = resolve_store("tiny_cmp", probe=ProbeSpec(n=8), progress=False)
    _side("1", n=9)  # a store of other images, not to be taken for it

    def no_model(*args, **kwargs):
        raise AssertionError("a store that holds the layers needs no model")

    monkeypatch.setattr(models, "load_model", no_model)
    store, layers = _side("2,0")
    assert (store.path, store.how, layers) == (full.path, "reused", ["0", "2"])


def test_a_layer_subset_keeps_its_store_when_a_default_store_appears(tiny):
    # The second run read the default store made since, so its result (keyed on the store's
    # identity) was computed again, and the comparison's numbers came from another file.
    first, _ = _side("1")
    resolve_store("tiny_cmp", probe=ProbeSpec(n=8), progress=False)
    again, _ = _side("1")
    assert (again.path, again.how) == (first.path, "reused")


def test_a_layer_subset_does_not_reuse_the_store_of_other_weights(tiny):
    old = resolve_store("tiny_cmp", probe=ProbeSpec(n=8), progress=False)
    torch.manual_seed(1)
    torch.save(tiny(3).state_dict(), os.path.join(os.environ["REPSIM_CHECKPOINTS"],
                                                  "tiny_cmp.pt"))
    store, _ = _side("1")
    assert (store.how, store.layers) == ("extracted", ["1"]) and store.path != old.path


def _passes(monkeypatch):
    """The layer requests of every model run (extraction that was not a reuse), as a list."""
    from repsim import extraction

    runs, real = [], extraction.extract

    def counted(cfg, **kw):
        res = real(cfg, **kw)
        if not res["reused"]:
            runs.append(cfg.layers)
        return res

    monkeypatch.setattr(extraction, "extract", counted)
    return runs


def _self_cfg(layers_a, layers_b):
    return CKAConfig(a="tiny_cmp", b="tiny_cmp", layers_a=layers_a, layers_b=layers_b,
                     estimator="debiased", se=False, plots=False, progress=False,
                     probe=ProbeSpec(n=8))


def test_one_model_with_two_layer_subsets_runs_it_once(tiny, monkeypatch):
    # --a X --b X with --layers-a 1 --layers-b 2 ran the model twice, once per subset.
    runs = _passes(monkeypatch)
    r = run_cka(_self_cfg("1", "2"))["result"]
    assert len(runs) == 1 and (r["layers_a"], r["layers_b"]) == (["1"], ["2"])
    full = run_cka(_self_cfg(None, None))["result"]  # every layer: the same numbers
    assert r["matrix"][0][0] == pytest.approx(full["matrix"][1][2], abs=1e-12)
    assert run_cka(_self_cfg("1", "2"))["reused"] and len(runs) == 2  # a rerun: cached


def test_one_model_with_a_subset_against_all_its_layers_runs_it_once(tiny, monkeypatch):
    # The subset side was extracted first, then the default store for the other side.
    runs = _passes(monkeypatch)
    r = run_cka(_self_cfg("1", None))["result"]
    assert len(runs) == 1 and (r["layers_a"], r["layers_b"]) == (["1"], ["0", "1", "2"])
    assert r["matrix"][0][1] == pytest.approx(1.0, abs=1e-12)


def test_one_model_with_two_layer_subsets_names_the_side_of_an_unknown_layer(tiny):
    from repsim.errors import UserError

    with pytest.raises(UserError, match=r"^layers_b='9' matches nothing in tiny_cmp"):
        run_cka(_self_cfg("1", "9"))


def test_a_reused_store_needs_neither_torch_nor_timm(checkpoints):
    first = resolve_store("resnet18_cifar", probe=ProbeSpec(n=8), progress=False)
    code = ("import sys; from repsim.compare import ProbeSpec, resolve_store; "
            "s = resolve_store('resnet18_cifar', probe=ProbeSpec(n=8), progress=False); "
            "print(s.path, s.how, 'torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.getcwd()).stdout.split()
    assert out == [str(first.path), "reused", "False", "False"]


def test_a_store_with_other_options_is_another_store(checkpoints):
    from repsim.extraction import ExtractConfig, extract

    # repsim extract with non-default options, no --out: its own content-addressed file
    made = extract(ExtractConfig(model="vit_cifar", dataset="cifar10-probe", n=8,
                                 layers="blocks", dtype="float16", progress=False))
    before = open(made["path"], "rb").read()
    default = resolve_store("vit_cifar", probe=ProbeSpec(n=8), progress=False)
    assert default.how == "extracted" and default.path != made["path"]
    half = resolve_store("vit_cifar", probe=ProbeSpec(n=8, dtype="float16"), layers="blocks",
                         progress=False)
    assert str(half.path) == made["path"] and half.how == "reused"
    assert open(made["path"], "rb").read() == before
    assert default.meta["dtype"] == "float32" and half.meta["dtype"] == "float16"
    assert len({default.path.parent, half.path.parent}) == 1  # one cache


def test_two_random_inits_are_compared_on_one_image_subset(checkpoints, capsys):
    args = ["--a", "resnet18_cifar", "--b", "resnet18_cifar", "--weights-a", "random",
            "--weights-b", "random", "--n", "8", "--seed", "3"]
    same, _ = run_json(capsys, *args)
    other, _ = run_json(capsys, *args, "--weights-seed-b", "1")
    assert same["samples"] == other["samples"] and other["samples"]["seed"] == 3
    assert np.allclose(np.diag(same["matrix"]), 1.0)  # the same init: identical stores
    assert other["inputs"]["a"]["path"] != other["inputs"]["b"]["path"]
    assert other["model_b"] == "resnet18_cifar (random-seed1)"
    assert not np.allclose(np.diag(other["matrix"]), 1.0)


def test_a_layer_subset_result_does_not_overwrite_the_full_result(tmp_path, pair):
    pa, pb, _, _ = pair
    common = dict(a=str(pa), b=str(pb), out=str(tmp_path / "o"), progress=False)
    full = run_cka(CKAConfig(**common))
    part = run_cka(CKAConfig(**common, layers_a="blocks.0,blocks.1"))
    assert len(part["result"]["layers_a"]) == 2 and len(full["result"]["layers_a"]) == 12
    assert set(part["files"]).isdisjoint(full["files"])
    assert all(os.path.exists(f) for f in full["files"] + part["files"])
    again = run_cka(CKAConfig(**common))
    assert again["reused"] is True and again["result"] == full["result"]


def test_missing_weights_give_one_line_on_how_to_get_them(checkpoints, capsys):
    (checkpoints / "vit_cifar.pt").unlink()
    code, _, err = run_cli(capsys, "--a", "vit_cifar", "--b", "resnet18_cifar", "--n", "8")
    assert code == 1 and err.count("\n") == 1
    assert "no trained weights for vit_cifar" in err and "repsim train" in err


def test_unknown_name_that_is_no_file_is_refused(capsys):
    code, _, err = run_cli(capsys, "--a", "vit_cifr", "--b", "vit_cifar")
    assert code == 1 and "neither a store file" in err and "vit_cifar" in err


def test_a_typo_in_b_is_refused_before_a_is_extracted(checkpoints, capsys, tmp_path):
    code, _, err = run_cli(capsys, "--a", "vit_cifar", "--b", "resnt18_cifar", "--n", "8")
    assert code == 1 and "nor a known model: unknown --b 'resnt18_cifar'" in err
    assert "extracted" not in err and not list(tmp_path.rglob("*.h5"))


def test_missing_weights_of_one_side_name_that_sides_flag(checkpoints, capsys):
    (checkpoints / "resnet18_cifar.pt").unlink()
    code, _, err = run_cli(capsys, "--a", "vit_cifar", "--b", "resnet18_cifar", "--n", "8")
    assert code == 1 and "pass --weights-b PATH or --weights-b 'random'" in err


def test_layer_sketches_are_cached_and_reused_by_later_comparisons(tmp_path, pair):
    from repsim import cka

    pa, pb, fa, fb = pair
    common = dict(out=str(tmp_path / "o"), plots=False, progress=False,
                  estimator="minibatch", batch_size=8)
    run_cka(CKAConfig(a=str(pa), b=str(pb), **common))
    sketches = sorted((tmp_path / "cache" / "sketches").iterdir())
    assert len(sketches) == len(fa) + len(fb)  # one file per layer
    stamps = [p.stat().st_mtime_ns for p in sketches]
    self_sim = run_cka(CKAConfig(a=str(pb), b=str(pb), **common))["result"]
    assert sorted((tmp_path / "cache" / "sketches").iterdir()) == sketches  # nothing new
    assert [p.stat().st_mtime_ns for p in sketches] == stamps
    feats = [fb[k].astype(np.float32) for k in self_sim["layers_a"]]
    want = cka.compare(feats, feats, estimator="minibatch", batch_size=8).matrix
    np.testing.assert_allclose(np.array(self_sim["matrix"]), want, rtol=0, atol=1e-12)


def test_a_comparison_with_cached_sketches_does_not_import_torch(tmp_path, pair, capsys):
    pa, pb, _, _ = pair
    # --no-se: standard errors need the Grams (and torch)
    first, _ = run_json(capsys, "--a", pa, "--b", pb, "--out", tmp_path / "o1", "--no-se")
    script = ("import json, sys; from repsim import cli; "
              f"rc = cli.main(['cka', '--a', {str(pa)!r}, '--b', {str(pb)!r}, '--out', "
              f"{str(tmp_path / 'o2')!r}, '--json', '--no-se']); "
              "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()
    again, status = json.loads(lines[0]), json.loads(lines[-1])
    assert status == {"rc": 0, "torch": False}
    assert again["matrix"] == first["matrix"]  # bit for bit, from the cached sketches


def test_minibatch_of_a_class_sorted_store_agrees_with_debiased(tmp_path):
    # Stores hold rows sorted by class; the minibatch estimator must still sample batches
    # across classes (consecutive batches of 50 here would each hold one class).
    rng = np.random.default_rng(11)
    n, classes = 500, 10
    signal = rng.standard_normal((classes, 20))[np.repeat(np.arange(classes), n // classes)]
    feats = {f"l{i}": signal @ rng.standard_normal((20, 30)) + 0.5 * rng.standard_normal(
        (n, 30)) for i in range(2)}
    path = make_store(tmp_path / "s.h5", feats, labels=np.repeat(np.arange(classes), 50))
    common = dict(a=str(path), b=str(path), plots=False, progress=False, layers_a="l0",
                  layers_b="l1")
    mini = run_cka(CKAConfig(estimator="minibatch", batch_size=50, out=str(tmp_path / "m"),
                             **common))["result"]
    debiased = run_cka(CKAConfig(estimator="debiased", out=str(tmp_path / "d"),
                                 **common))["result"]["matrix"][0][0]
    # within a few of the minibatch estimate's own (jackknife) standard errors
    se = mini["se"][0][0]
    assert debiased > 0.5 and 0 < se < 0.05
    assert abs(mini["matrix"][0][0] - debiased) <= 3 * se


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ["biased", "minibatch"])
def test_cuda_comparison_of_stores_gives_the_cpu_result(tmp_path, pair, estimator,
                                                        monkeypatch):
    pa, pb, _, _ = pair
    bs = 8 if estimator == "minibatch" else None
    got = {}
    for dev in ("cpu", "cuda"):
        monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / f"cache-{dev}"))  # no shared sketches
        got[dev] = run_cka(CKAConfig(a=str(pa), b=str(pb), estimator=estimator, batch_size=bs,
                                     device=dev, out=str(tmp_path / dev), plots=False,
                                     progress=False))["result"]["matrix"]
    np.testing.assert_allclose(np.array(got["cuda"]), np.array(got["cpu"]), atol=1e-10)


def test_layer_globs_match_segment_by_segment_as_in_extract(tmp_path):
    names = ["blocks.0", "blocks.0.attn", "blocks.1", "head"]
    store = StoreRef(path=tmp_path / "s.h5", label="s", slug="s", meta={}, layers=names, n=1,
                     ids_sha256="", identity_sha256="", how="given")
    assert select_layers(store, "blocks.*") == ["blocks.0", "blocks.1"]
    assert select_layers(store, "blocks.*.attn,head") == ["blocks.0.attn", "head"]
    assert select_layers(store, "all") == names


def test_results_carry_standard_errors_and_participation_ratios(tmp_path, pair, capsys):
    r, _ = run_json(capsys, "--a", pair[0], "--b", pair[1], "--estimator", "debiased", "--out",
                    tmp_path / "r")
    se, pr_a = np.array(r["se"], dtype=float), np.array(r["pr_a"], dtype=float)
    assert se.shape == (12, 3) and r["se_method"] == "delete-one-image"
    # the jackknife over images, by brute force for one cell
    fa, fb = pair[2]["blocks.4"], pair[3]["layer2"]
    loo = [reference.cka(np.delete(fa, i, 0), np.delete(fb, i, 0), debiased=True)
           for i in range(24)]
    assert se[4, 2] == pytest.approx(np.sqrt(23 / 24 * np.sum((loo - np.mean(loo)) ** 2)))
    assert pr_a.shape == (12,) and np.all((pr_a >= 1) & (pr_a <= 23))
    h = np.eye(24) - 1 / 24  # the participation ratio of blocks.4, from its definition
    x = fa.astype(np.float32).astype(float)  # as stored
    c = h @ x @ x.T @ h
    assert pr_a[4] == pytest.approx(np.trace(c) ** 2 / np.sum(c * c), rel=1e-9)
    assert r["n_over_pr_a"] == pytest.approx(list(24 / pr_a))  # images per dimension
    assert r["p_value"] is None  # no permutations asked for
    code, out, _ = run_cli(capsys, "--a", pair[0], "--b", pair[1], "--estimator", "debiased",
                           "--out", tmp_path / "r")
    assert f"SE <= {se.max():.3f}" in out


def test_permutations_and_influence_are_in_the_result_and_its_cache_key(tmp_path, pair,
                                                                        capsys):
    args = ["--a", pair[0], "--b", pair[1], "--out", tmp_path / "r"]
    r, _ = run_json(capsys, *args, "--permutations", "49", "--influence", "2")
    p = np.array(r["p_value"], dtype=float)
    assert r["permutations"] == 49 and p.shape == (12, 3)
    assert np.all((p >= 1 / 50) & (p <= 1))
    assert np.array(r["null_q95"], dtype=float).shape == (12, 3)
    ids = set((np.arange(24) * 7).tolist())  # make_store's sample IDs
    assert len(r["influence"][0][0]) == 2 and {i for i, _ in r["influence"][0][0]} <= ids
    again, _ = run_json(capsys, *args)
    assert again["reused"] is False and again["p_value"] is None
    np.testing.assert_array_equal(again["matrix"], r["matrix"])


def test_influence_is_listed_without_the_standard_errors_too(tmp_path, pair, capsys):
    r, _ = run_json(capsys, "--a", pair[0], "--b", pair[1], "--out", tmp_path / "r", "--no-se",
                    "--influence", "2")
    assert r["influence"] is not None and len(r["influence"][0][0]) == 2


def test_the_biased_estimator_warns_when_its_null_level_is_high(tmp_path, capsys):
    rng = np.random.default_rng(0)
    wide = {"x": rng.standard_normal((24, 240))}  # p = 10 n: biased null level about 0.9
    narrow = {"x": rng.standard_normal((24, 2))}  # PR <= 2: null level at most about 0.1
    a, b = make_store(tmp_path / "a.h5", wide), make_store(tmp_path / "b.h5", wide)
    c = make_store(tmp_path / "c.h5", narrow)
    r, err = run_json(capsys, "--a", a, "--b", b, "--estimator", "biased")
    assert "warning: the biased estimator reads up to" in err
    assert r["biased_null_mean"][0][0] > 0.8 and r["matrix"][0][0] > 0.8  # unrelated data
    _, err = run_json(capsys, "--a", a, "--b", b)
    assert "warning" not in err  # the default (minibatch, here debiased) has null level 0
    r, err = run_json(capsys, "--a", c, "--b", c, "--estimator", "biased")
    assert r["biased_null_mean"][0][0] <= 0.1 and "warning" not in err


def test_the_biased_estimator_warns_without_the_standard_errors_too(tmp_path, capsys):
    rng = np.random.default_rng(0)
    wide = {"x": rng.standard_normal((24, 240))}  # biased null level about 0.9
    a, b = make_store(tmp_path / "a.h5", wide), make_store(tmp_path / "b.h5", wide)
    r, err = run_json(capsys, "--a", a, "--b", b, "--estimator", "biased", "--no-se")
    assert "warning: the biased estimator reads up to 0.9" in err and r["se"] is None
    assert "--estimator 'minibatch' (the default)" in err  # the CLI's words for parameters
    full, _ = run_json(capsys, "--a", a, "--b", b, "--estimator", "biased", "--out",
                       tmp_path / "se")  # the same level as repsim.stats gives
    assert r["biased_null_mean"][0] == pytest.approx(full["biased_null_mean"][0], rel=1e-9)
    c = make_store(tmp_path / "c.h5", {"x": rng.standard_normal((24, 2))})  # PR <= 2
    _, err = run_json(capsys, "--a", c, "--b", c, "--estimator", "biased", "--no-se")
    assert "warning" not in err


def test_the_streamed_biased_estimator_without_se_says_its_null_level_is_unchecked(
        tmp_path, capsys, monkeypatch):
    from repsim import storecka

    monkeypatch.setattr(storecka, "SKETCH_MAX_BYTES", 0)  # too big for sketches: streamed
    wide = {"x": np.random.default_rng(0).standard_normal((24, 240))}
    a, b = make_store(tmp_path / "a.h5", wide), make_store(tmp_path / "b.h5", wide)
    _, err = run_json(capsys, "--a", a, "--b", b, "--estimator", "biased", "--no-se")
    assert "whether the biased estimator reads high here was not checked" in err


def test_the_streamed_biased_estimator_without_se_or_log_runs(tmp_path, monkeypatch):
    from repsim import compare, storecka

    monkeypatch.setattr(storecka, "SKETCH_MAX_BYTES", 0)  # streamed: no null level to read
    wide = {"x": np.random.default_rng(0).standard_normal((24, 240))}
    a, b = make_store(tmp_path / "a.h5", wide), make_store(tmp_path / "b.h5", wide)
    res = compare.run_cka(compare.CKAConfig(a=str(a), b=str(b), estimator="biased", se=False,
                                            plots=False, out=str(tmp_path / "o"), log=None))
    assert res["result"]["biased_null_mean"] is None
    assert res["result"]["matrix"][0][0] == pytest.approx(1.0)


def test_seeds_give_the_mean_the_spread_and_the_seed_ceiling(checkpoints, capsys):
    from repsim.models import build_model

    files = []
    for s in range(3):
        files.append(checkpoints / f"r{s}.pt")
        torch.save(build_model("resnet18_cifar", seed=10 + s).state_dict(), files[-1])
    seeds_a = ",".join(map(str, files[:2]))
    r, _ = run_json(capsys, "--a", "resnet18_cifar", "--weights-a", seeds_a, "--b",
                    "resnet18_cifar", "--weights-b", str(files[2]), "--n", "8")
    each = [np.array(json.load(open(f))["matrix"]) for f in r["comparisons"]]
    assert r["n_comparisons"] == 2 and r["model_a"] == "resnet18_cifar (2 seeds)"
    np.testing.assert_allclose(r["matrix"], np.mean(each, 0), atol=1e-15)
    np.testing.assert_allclose(r["seed_sd"], np.std(each, 0, ddof=1), atol=1e-15)
    pair_01, _ = run_json(capsys, "--a", "resnet18_cifar", "--weights-a", str(files[0]), "--b",
                          "resnet18_cifar", "--weights-b", str(files[1]), "--n", "8")
    np.testing.assert_allclose(r["seed_ceiling_a"], np.diag(pair_01["matrix"]))
    assert r["seed_ceiling_b"] is None  # one seed of B
    assert np.array(r["se"]).shape == (5, 5)  # image-level SE, apart from the seed spread


def test_the_seeds_aggregate_carries_its_provenance(checkpoints, capsys):
    from repsim.compare import versions
    from repsim.models import build_model

    files = []
    for s in range(2):
        files.append(checkpoints / f"p{s}.pt")
        torch.save(build_model("resnet18_cifar", seed=20 + s).state_dict(), files[-1])
    r, _ = run_json(capsys, "--a", "resnet18_cifar", "--weights-a", ",".join(map(str, files)),
                    "--b", "resnet18_cifar", "--n", "8", "--no-se")
    assert r["format"] == "repsim-cka-seeds/1" and r["versions"] == versions()
    assert [set(s) for s in r["stores"]] == [{"a", "b"}] * 2  # how each comparison had its own
    assert r["comparison_keys"] == [json.load(open(f))["cache_key"] for f in r["comparisons"]]


def test_the_seeds_aggregate_under_home_is_written_there(checkpoints, capsys, tmp_path,
                                                          monkeypatch):
    from repsim.models import build_model

    files = []
    for s in range(2):
        files.append(checkpoints / f"h{s}.pt")
        torch.save(build_model("resnet18_cifar", seed=30 + s).state_dict(), files[-1])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    r, _ = run_json(capsys, "--a", "resnet18_cifar", "--weights-a", ",".join(map(str, files)),
                    "--b", "resnet18_cifar", "--n", "8", "--no-se", "--layers-a", "layer4",
                    "--layers-b", "layer4", "--out", "~/agg")
    assert r["files"] and all(f.startswith(str(tmp_path / "home" / "agg")) for f in r["files"])
    assert not (tmp_path / "~").exists()


def test_an_unknown_layer_of_one_side_names_that_sides_flag(checkpoints, capsys):
    code, _, err = run_cli(capsys, "--a", "resnet18_cifar", "--b", "resnet18_cifar",
                           "--weights-a", "random", "--weights-b", "random", "--n", "8",
                           "--layers-b", "layer9")
    assert code == 1 and "error: --layers-b 'layer9' matches nothing in resnet18_cifar" in err


def test_extraction_settings_with_two_store_files_are_refused_not_ignored(tmp_path, pair,
                                                                          capsys):
    code, _, err = run_cli(capsys, "--a", pair[0], "--b", pair[1], "--n", "10")
    assert code == 1
    assert "error: --n 10 chooses what to extract, but --a and --b are both store files" in err


@pytest.mark.parametrize("extra, want", [
    (["--estimator", "biased", "--batch-seed", "3"],
     "--batch-seed 3 applies to --estimator 'minibatch' only, not 'biased'"),
    (["--batch-seed", "0"], "--batch-seed 0 has no effect: the 24 rows fit in one "
     "--batch-size 1024; give one below 24, or drop --batch-seed"),
    (["--permutation-seed", "2"], "--permutation-seed 2 has no effect without --permutations"),
])
def test_a_seed_given_where_it_has_no_effect_is_refused(tmp_path, pair, capsys, extra, want):
    code, _, err = run_cli(capsys, "--a", pair[0], "--b", pair[1], "--out", tmp_path, *extra)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert want in err


def test_seeds_given_where_they_apply_are_used(tmp_path, pair, capsys):
    r, _ = run_json(capsys, "--a", pair[0], "--b", pair[1], "--out", tmp_path, "--batch-size",
                    "8", "--batch-seed", "3", "--permutations", "9", "--permutation-seed", "2")
    assert r["batch_seed"] == 3 and r["permutation_seed"] == 2


def test_seed_aggregate_by_hand_and_a_nan_cell_stays_nan():
    # A cell that is NaN in one comparison (a dead layer in one seed) has no mean over the
    # comparisons: the mean of the others would pass for it, beside a NaN seed_sd and se.
    from repsim.seeds import aggregate

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" either
        got = aggregate([{"matrix": [[0.5, None, None]], "se": [[0.1, None, None]]},
                         {"matrix": [[0.7, 0.2, None]], "se": [[0.3, 0.1, None]]}])
    assert got["matrix"] == [[0.6, None, None]] and got["se"] == [[0.2, None, None]]
    assert got["seed_sd"] == [[pytest.approx(0.2 / 2**0.5, abs=1e-15), None, None]]
    one = aggregate([{"matrix": [[0.5, None]], "se": None}])
    assert one == {"matrix": [[0.5, None]], "seed_sd": None, "se": None, "n_comparisons": 1}


@pytest.mark.parametrize("estimator, n, need", [("debiased", 3, 4), ("minibatch", 3, 4),
                                                ("biased", 1, 2)])
def test_stores_with_too_few_rows_are_a_user_error_naming_the_rows(tmp_path, estimator, n,
                                                                   need):
    from repsim.errors import UserError

    pa = make_store(tmp_path / "a.h5", toy_feats(["x"], n=n))
    with pytest.raises(UserError, match=rf"a= and b= hold {n} samples each, but "
                       rf"estimator='{estimator}' needs at least {need}"):
        run_cka(CKAConfig(a=str(pa), b=str(pa), estimator=estimator, plots=False,
                          out=str(tmp_path / "o")))


def test_too_few_rows_at_the_cli_is_one_line_without_a_made_up_flag(tmp_path, capsys):
    pa = make_store(tmp_path / "a.h5", toy_feats(["x"], n=3))
    code, out, err = run_cli(capsys, "--a", pa, "--b", pa, "--estimator", "debiased")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("repsim cka: error: --a and --b hold 3 samples each")
    assert "--n 3" not in err  # no --n was given: the stores are files


@pytest.mark.parametrize("setting", [{"batch_seed": -1, "batch_size": 8}, {"batch_seed": 1.5},
                                     {"permutations": -5}, {"permutations": 3.5},
                                     {"influence": -2}, {"memory_budget": 0},
                                     {"memory_budget": "2GiB"}])
def test_settings_out_of_range_are_refused_before_any_work(tmp_path, pair, setting):
    from repsim.errors import UserError

    (k, v), *_ = setting.items()
    with pytest.raises(UserError, match=rf"^{k}={v!r}: valid values are integers >= "):
        run_cka(CKAConfig(a=str(pair[0]), b=str(pair[1]), out=str(tmp_path), **setting))
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("seed", [1.5, "3", True, 2**64, -2**63 - 1])
def test_a_permutation_seed_that_is_no_seed_is_refused_before_any_work(tmp_path, pair, seed,
                                                                        monkeypatch):
    # It was a ValueError naming 'seed=', raised once the whole matrix had been computed.
    from repsim import compare
    from repsim.errors import UserError

    monkeypatch.setattr(compare, "cka_of_stores", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(UserError, match=rf"^permutation_seed={seed!r}: valid values are "
                                        r"integers from -2\*\*63 to 2\*\*64 - 1"):
        run_cka(CKAConfig(a=str(pair[0]), b=str(pair[1]), out=str(tmp_path), permutations=9,
                          permutation_seed=seed))


def test_a_negative_batch_seed_at_the_cli_is_one_line_naming_the_flag(tmp_path, pair, capsys):
    code, _, err = run_cli(capsys, "--a", pair[0], "--b", pair[1], "--batch-size", "8",
                           "--batch-seed", "-1", "--out", tmp_path)
    assert code == 1 and err == ("repsim cka: error: --batch-seed -1: valid values are integers "
                                 ">= 0; fix: give one, or leave --batch-seed out\n")


@pytest.mark.parametrize("se", [True, False])
def test_a_biased_comparison_of_a_constant_layer_warns_of_it_and_of_nothing_else(tmp_path, se):
    store = make_store(tmp_path / "m.h5", {"const": np.full((24, 3), 2.5)})
    cfg = CKAConfig(a=str(store), b=str(store), estimator="biased", se=se, plots=False,
                    progress=False, out=str(tmp_path / "o"), log=lambda msg: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cka(cfg)["result"]["matrix"] == [[None]]
    assert {str(w.message) for w in caught} == {
        "layer 'const' has zero variance (every row is identical); its CKA values are NaN"}


def test_an_unknown_layer_of_a_store_file_names_that_sides_flag(tmp_path, pair, capsys):
    code, _, err = run_cli(capsys, "--a", pair[0], "--b", pair[1], "--layers-b", "stem,nope")
    assert code == 1 and err == (f"repsim cka: error: --layers-b 'nope' matches nothing in "
                                 f"{pair[1]} (layers: stem, layer1, layer2); pick from those\n")


def test_an_output_folder_under_home_is_expanded_as_extract_does(tmp_path, pair, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    res = run_cka(CKAConfig(a=str(pair[0]), b=str(pair[1]), out="~/res", se=False, plots=False,
                            progress=False))
    assert res["files"][0].startswith(str(tmp_path / "home" / "res") + os.sep)
    assert not (tmp_path / "~").exists()


def test_a_reused_biased_result_warns_as_the_computed_one_did(tmp_path, capsys):
    wide = {"x": np.random.default_rng(0).standard_normal((24, 240))}  # null level about 0.9
    a, b = make_store(tmp_path / "a.h5", wide), make_store(tmp_path / "b.h5", wide)
    first, err1 = run_json(capsys, "--a", a, "--b", b, "--estimator", "biased")
    again, err2 = run_json(capsys, "--a", a, "--b", b, "--estimator", "biased")
    assert again["reused"] and not first["reused"]
    assert "warning: the biased estimator reads up to 0.9" in err1 and err2 == err1


def test_a_batch_larger_than_the_store_is_sized_by_its_rows_for_the_sketch_cache(tmp_path, pair):
    # 24 rows of at most 16 columns in float64 are 3,072 bytes, within half of 8,192: the
    # layers are sketched (and cached) although one batch could hold 1,024 rows.
    run_cka(CKAConfig(a=str(pair[0]), b=str(pair[1]), out=str(tmp_path / "o"), plots=False,
                      progress=False, se=False, memory_budget=8192))
    assert len(list((tmp_path / "cache" / "sketches").iterdir())) == len(pair[2]) + len(pair[3])


def test_store_paths_may_be_path_objects(tmp_path, pair):
    res = run_cka(CKAConfig(a=pair[0], b=pair[1], out=str(tmp_path), se=False, plots=False,
                            progress=False))
    assert res["stores"] == {"a": "given", "b": "given"}
    assert res["result"]["inputs"]["a"]["path"] == str(pair[0])


@pytest.mark.parametrize("estimator, n, need", [("minibatch", 3, 4), ("biased", 1, 2)])
def test_too_few_images_for_model_names_are_refused_before_extraction(tmp_path, monkeypatch,
                                                                       estimator, n, need):
    # n=3 extracted both models first, and only then were 3 samples found too few.
    import repsim.extraction
    from repsim.errors import UserError

    def extract(cfg):
        raise AssertionError(f"extracted {cfg.model} before refusing n={cfg.n}")

    monkeypatch.setattr(repsim.extraction, "extract", extract)
    with pytest.raises(UserError, match=rf"^n={n}: estimator='{estimator}' needs at least "
                       rf"{need} samples; fix: give n={need} or more$"):
        run_cka(CKAConfig(a="vit_cifar", b="resnet18_cifar", estimator=estimator,
                          probe=ProbeSpec(n=n), out=str(tmp_path)))


def test_a_probe_size_is_no_limit_on_two_store_files(tmp_path, pair):
    # repsim figures passes its stores with the probe they were made on: nothing to extract.
    res = run_cka(CKAConfig(a=str(pair[0]), b=str(pair[1]), probe=ProbeSpec(n=3), se=False,
                            plots=False, progress=False, out=str(tmp_path / "o")))
    assert res["result"]["n"] == 24


def test_too_few_images_at_the_cli_are_one_line_naming_the_flags(monkeypatch, capsys):
    import repsim.extraction

    monkeypatch.setattr(repsim.extraction, "extract", None)  # calling it fails the test
    code, out, err = run_cli(capsys, "--a", "vit_cifar", "--b", "resnet18_cifar", "--n", "3")
    assert code == 1 and out == "" and err == (
        "repsim cka: error: --n 3: --estimator 'minibatch' needs at least 4 samples; fix: give "
        "--n 4 or more\n")


def _narrow_rbf(tmp_path, pair, out, threshold=0.05):
    """run_cka at an RBF threshold that makes every Gram the identity, and its warnings."""
    pa, pb, _, _ = pair
    cfg = CKAConfig(a=str(pa), b=str(pb), kernel="rbf", threshold=threshold, estimator="debiased",
                    se=False, plots=False, progress=False, out=str(tmp_path / out))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_cka(cfg)
    return r, [str(w.message) for w in caught]


def test_a_reused_result_repeats_the_warnings_its_computation_gave(tmp_path, pair):
    first, said = _narrow_rbf(tmp_path, pair, "o")
    again, resaid = _narrow_rbf(tmp_path, pair, "o")
    assert not first["reused"] and again["reused"]
    assert any("nearly the identity" in m for m in said) and sorted(resaid) == sorted(said)


def test_cached_sketches_repeat_the_warnings_their_computation_gave(tmp_path, pair):
    _, said = _narrow_rbf(tmp_path, pair, "o1")
    again, resaid = _narrow_rbf(tmp_path, pair, "o2")  # a new result from the cached sketches
    assert not again["reused"] and any("nearly the identity" in m for m in resaid)
    assert sorted(resaid) == sorted(said)


def test_rbf_grams_made_the_identity_are_not_called_zero_variance(tmp_path, pair):
    _, said = _narrow_rbf(tmp_path, pair, "o", threshold=0.001)  # U-centred: exactly zero
    assert said and not any("zero variance" in m for m in said)
    assert any("has RBF Grams that are numerically the identity" in m for m in said)


def test_force_recomputes_the_cached_sketches_too(tmp_path, pair):
    # --force ("recompute even when cached") recomputed the matrix from the cached layer
    # sketches, so a stale sketch (e.g. from older code of the same version) stayed in use.
    from repsim.paths import cache_dir

    cfg = CKAConfig(a=str(pair[0]), b=str(pair[1]), estimator="debiased", se=False,
                    layers_a="blocks.0", layers_b="stem", plots=False, out=str(tmp_path / "o"),
                    progress=False)
    first = run_cka(cfg)["result"]["matrix"]
    for path in cache_dir("sketches").glob("*.npz"):  # make every cached sketch wrong
        with np.load(path) as z:
            wrong = dict(z, sketch=z["sketch"][::-1].copy())
        np.savez(path, **wrong)
    assert run_cka(dataclasses.replace(cfg, force=True))["result"]["matrix"] == first


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, pair, monkeypatch):
    # --out FILE failed only when the heatmap was saved, after the whole computation (minutes
    # with --permutations), as 'cannot use FILE: File exists'.
    from repsim import compare
    from repsim.errors import UserError

    def computed(*args, **kwargs):
        raise AssertionError("computed before out= was checked")

    monkeypatch.setattr(compare, "cka_of_stores", computed)
    (tmp_path / "notes.txt").write_text("mine")
    cfg = CKAConfig(a=str(pair[0]), b=str(pair[1]), out=str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match=r"out='.*notes.txt' is a file; valid: a folder"):
        run_cka(cfg)
    with pytest.raises(OSError):  # a folder under a file cannot be made: before the work too
        run_cka(dataclasses.replace(cfg, out=str(tmp_path / "notes.txt" / "sub")))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_fix_that_changes_what_cka_computes_invalidates_cached_results_and_sketches(
        tmp_path, pair, monkeypatch):
    # Both keys held repsim.__version__, which is never raised: after a fix to the engine or
    # the statistics, a rerun reused the stale result and sketches.
    from repsim import cka, sketch

    pa, pb, fa, fb = pair
    cfg = CKAConfig(a=str(pa), b=str(pb), out=str(tmp_path / "o"), plots=False, progress=False)
    run_cka(cfg)
    monkeypatch.setattr(sketch, "CONTENT_VERSION", sketch.CONTENT_VERSION + 1)
    made, real = [], cka.layer_sketch
    monkeypatch.setattr(cka, "layer_sketch", lambda x, **kw: made.append(x) or real(x, **kw))
    assert run_cka(cfg)["reused"] is False and len(made) == len(fa) + len(fb)
    assert run_cka(cfg)["reused"] is True


def test_a_list_of_weights_files_for_one_comparison_points_at_the_seeds():
    # A list reached the extraction, whose Path(list) raised a TypeError.
    from repsim.errors import UserError

    cfg = CKAConfig(a="vit_cifar", b="resnet18_cifar", weights_a=["s0.pt", "s1.pt"])
    with pytest.raises(UserError, match=r"^weights_a=\['s0.pt', 's1.pt'\] is a list of seeds; "
                                        r"compare them with repsim.seeds.run_cka_seeds"):
        run_cka(cfg)


@pytest.mark.parametrize("flag", ["se", "plots", "force"])
def test_a_switch_that_is_no_bool_is_refused_not_read_by_its_truth(tmp_path, pair, flag):
    # force="False" (from a config file's string) forced a re-extraction and recompute, and
    # se="False" computed the standard errors: any non-empty string is true.
    from repsim.errors import UserError

    cfg = CKAConfig(a=str(pair[0]), b=str(pair[1]), out=str(tmp_path / "o"), **{flag: "False"})
    with pytest.raises(UserError, match=rf"^{flag}='False' is not a bool; valid: True or False"):
        run_cka(cfg)


def test_a_probe_that_is_no_probespec_is_refused_in_one_line(tmp_path, pair):
    # probe={"n": 100} (or None) from a notebook raised AttributeError: no attribute 'n'.
    from repsim.errors import UserError

    with pytest.raises(UserError, match=r"^probe=\{'n': 100\} is not a ProbeSpec; valid: "
                                        r"repsim.compare.ProbeSpec\(n=100\)"):
        run_cka(CKAConfig(a="vit_cifar", b="resnet18_cifar", probe={"n": 100}))


def test_probe_none_is_the_default_probe_set(tmp_path, pair):
    cfg = CKAConfig(a=str(pair[0]), b=str(pair[1]), probe=None, out=str(tmp_path / "o"),
                    plots=False, progress=False, se=False)
    assert run_cka(cfg)["result"]["n"] == 24


@pytest.mark.parametrize("side", ["a", "b"])
def test_an_empty_weights_value_is_refused_not_read_as_the_default(side):
    # --weights-a "$CKPT" with CKPT unset: with the default store cached, the model's own
    # weights were compared silently; without it, 'weights file . is a directory'.
    from repsim.errors import UserError

    cfg = CKAConfig(a="vit_cifar", b="resnet18_cifar", **{f"weights_{side}": " "})
    with pytest.raises(UserError, match=rf"^weights_{side}=' ' names no weights file"):
        run_cka(cfg)


@pytest.mark.parametrize("damage", [lambda b: b[:100], lambda b: b""])
def test_an_unreadable_cached_sketch_is_made_again(tmp_path, pair, damage):
    # A truncated or empty sketch in the cache (a cut-short copy of it) stopped every later
    # comparison of that layer with a traceback: BadZipFile, EOFError.
    from repsim.paths import cache_dir

    cfg = CKAConfig(a=str(pair[0]), b=str(pair[1]), estimator="debiased", se=False,
                    layers_a="blocks.0", layers_b="stem", plots=False, progress=False)
    first = run_cka(dataclasses.replace(cfg, out=str(tmp_path / "o1")))["result"]["matrix"]
    for path in cache_dir("sketches").glob("*.npz"):
        path.write_bytes(damage(path.read_bytes()))
    again = run_cka(dataclasses.replace(cfg, out=str(tmp_path / "o2")))["result"]["matrix"]
    assert again == first
    third = run_cka(dataclasses.replace(cfg, out=str(tmp_path / "o3")))["result"]["matrix"]
    assert third == first  # from the sketches made again


def test_an_image_folder_is_read_once_per_comparison(tiny, cifar_root, monkeypatch):
    # With nothing cached, --layers-a read the folder three times (two store lookups, then
    # the extraction), and side B as many again.
    from repsim import data

    reads, real = [], data.load_probe_set
    monkeypatch.setattr(data, "load_probe_set", lambda *a, **k: reads.append(a) or real(*a, **k))
    probe = ProbeSpec(dataset="cifar10", data_root=str(cifar_root), n=12)
    for layers_b in ("2", "0,1"):
        cfg = dataclasses.replace(_self_cfg("1", layers_b), probe=probe, b="tiny_cmp")
        reads.clear()
        r = run_cka(dataclasses.replace(cfg, weights_b="random"))["result"]
        assert len(reads) == 1 and r["n"] == 12


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_a_non_finite_store_layer_is_one_line_naming_the_store_and_layer(tmp_path, kernel,
                                                                          capsys):
    # Under --kernel rbf, its bandwidth was computed outside the guard: a bare ValueError
    # that named 'a[0]', not the store file and the layer.
    fa = toy_feats(["stem", "blocks.0"])
    fa["blocks.0"][3, 2] = np.nan
    a = make_store(tmp_path / "a.h5", fa)
    code, _, err = run_cli(capsys, "--a", a, "--b", a, "--kernel", kernel)
    assert code == 1 and err.count("\n") == 1
    assert f"{a} layer 'blocks.0'" in err and "a[0]" not in err


@pytest.mark.parametrize("bad_side", ["a", "b"])
def test_a_non_finite_layer_of_large_stores_names_its_store(tmp_path, bad_side, monkeypatch,
                                                            capsys):
    # Streamed (sketches too large), it named only the layer: not which of the two files.
    from repsim import storecka

    monkeypatch.setattr(storecka, "SKETCH_MAX_BYTES", 0)
    feats = {s: toy_feats(["stem", "head"], seed=i) for i, s in enumerate("ab")}
    feats[bad_side]["head"][5, 1] = np.inf
    a, b = (make_store(tmp_path / f"{s}.h5", feats[s]) for s in "ab")
    code, _, err = run_cli(capsys, "--a", a, "--b", b, "--layers-a", "head", "--out", tmp_path)
    bad, good = (a, b) if bad_side == "a" else (b, a)
    last = err.splitlines()[-1]  # after the progress bar's
    assert code == 1 and last.startswith(f"repsim cka: error: {bad}: layer 'head' has non-")
    assert str(good) not in err


def test_linear_sketches_do_not_depend_on_the_rbf_threshold(tmp_path, pair):
    # The sketch cache key held the threshold for every kernel: a linear comparison with
    # another threshold (which it does not use) recomputed and stored every sketch again.
    common = dict(a=str(pair[0]), b=str(pair[0]), plots=False, progress=False, se=False)
    run_cka(CKAConfig(threshold=0.5, out=str(tmp_path / "o1"), **common))
    sketches = sorted((tmp_path / "cache" / "sketches").iterdir())
    run_cka(CKAConfig(threshold=1.0, out=str(tmp_path / "o2"), **common))  # no result to reuse
    assert sorted((tmp_path / "cache" / "sketches").iterdir()) == sketches
