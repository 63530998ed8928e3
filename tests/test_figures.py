"""`repsim figures`: every panel type renders with labelled axes and one 0-1 scale; specs are
validated; figures are cached and rebuilt only when their spec or inputs change; a figure
whose weights are unavailable is skipped in one line while the others are built."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from repsim.errors import UserError
from repsim.figures import draw
from repsim.figures.runner import KINDS, build_all, figure_kind, load_specs

VIT = ["embed"] + [f"blocks.{i}" for i in range(6)]
RES = ["stem", "layer1", "layer2", "layer3", "layer4"]


def rand(shape, seed=0):
    return np.random.default_rng(seed).random(shape)


def heatmap_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def assert_saved(fig, stem):
    files = draw.save(fig, stem)
    assert [f.suffix for f in files] == [".png", ".pdf"]
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files[1].read_bytes()[:5] == b"%PDF-"


# ------------------------------------------------------------------ panels


def test_heatmap_labels_both_axes_and_uses_one_0_to_1_scale(tmp_path):
    m = rand((7, 5))
    m[2, 3] = np.nan
    result = {"matrix": [[None if np.isnan(v) else v for v in row] for row in m.tolist()],
              "layers_a": VIT, "layers_b": RES, "model_a": "vit_cifar",
              "model_b": "resnet18_cifar", "kernel": "linear", "estimator": "minibatch",
              "n": 1000, "batch_size": 250}
    fig = draw.cka_heatmap(result)
    (ax,) = heatmap_axes(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == VIT  # rows: model A
    assert [t.get_text() for t in ax.get_xticklabels()] == RES  # columns: model B
    assert "vit_cifar" in ax.get_ylabel() and "resnet18_cifar" in ax.get_xlabel()
    im = ax.images[0]
    assert (im.norm.vmin, im.norm.vmax) == (0.0, 1.0)
    assert len(fig.axes) == 2  # the heatmap and one colour bar
    assert "minibatch" in ax.get_title() and "n = 1,000" in ax.get_title()
    assert_saved(fig, tmp_path / "h")


def test_heatmap_dots_the_cells_not_above_the_permutation_null():
    p = np.full((7, 5), 0.01)
    p[1, 4] = p[6, 0] = 0.3
    result = {"matrix": rand((7, 5)).tolist(), "layers_a": VIT, "layers_b": RES,
              "model_a": "a", "model_b": "b", "kernel": "linear", "estimator": "debiased",
              "n": 1000, "p_value": p.tolist(), "permutations": 99}
    (ax,) = heatmap_axes(draw.cka_heatmap(result))
    (dots,) = ax.collections
    np.testing.assert_allclose(np.round(dots.get_offsets()), [[4, 1], [0, 6]])
    assert "not above the permutation null (p > 0.05, 99 permutations)" in ax.get_title()


def test_grid_has_every_pair_and_one_shared_colour_bar(tmp_path):
    labels, layers = ["A", "B", "C"], [VIT, RES, ["x", "y"]]
    panels = {(i, j): {"matrix": rand((len(layers[i]), len(layers[j])), 3 * i + j).tolist(),
                       "layers_a": layers[i], "layers_b": layers[j]}
              for i in range(3) for j in range(3)}
    fig = draw.cka_grid(labels, panels, "grid")
    axes = heatmap_axes(fig)
    assert len(axes) == 9 and len(fig.axes) == 10  # 3 x 3 panels + 1 colour bar
    assert {(a.images[0].norm.vmin, a.images[0].norm.vmax) for a in axes} == {(0.0, 1.0)}
    assert [t.get_text() for t in axes[5].get_yticklabels()] == RES  # panel (1, 2): B vs C
    assert [t.get_text() for t in axes[5].get_xticklabels()] == ["x", "y"]
    assert_saved(fig, tmp_path / "g")


def test_best_match_curve_picks_each_rows_maximum_and_skips_nan_rows(tmp_path):
    m = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.7], [np.nan, np.nan, np.nan]])
    idx, val = draw.best_match_curve(m)
    assert idx.tolist() == [1, 2, -1]
    assert val[:2].tolist() == [0.9, 0.7] and np.isnan(val[2])
    fig = draw.best_match([{"label_a": "A", "label_b": "B", "layers_a": ["a0", "a1", "a2"],
                             "layers_b": ["b0", "b1", "b2"], "index": idx.tolist(),
                             "value": [0.9, 0.7, None]}], "curves")
    top = fig.axes[0]
    assert top.lines[1].get_ydata()[:2].tolist() == [1.0, 2.0]
    assert [t.get_text() for t in top.get_yticklabels()] == ["b0", "b1", "b2"]
    assert_saved(fig, tmp_path / "b")


def test_a_best_match_below_zero_stays_on_the_cka_axis():
    """Unbiased CKA is not clamped: a layer whose best match is negative, and its error bar,
    must not fall off a 0-to-1 axis."""
    fig = draw.best_match([{"label_a": "A", "label_b": "B", "layers_a": ["a0", "a1"],
                            "layers_b": ["b0"], "index": [0, 0], "value": [0.8, -0.05],
                            "se": [0.01, 0.02]}], "curves")
    low, high = fig.axes[1].get_ylim()
    assert low <= -0.07 and high == 1.0


def test_a_best_match_above_one_stays_on_the_cka_axis():
    """Unbiased CKA can pass 1 on few images: the axis stopped at 1, so that point and its
    error bar were cut off the picture while the data and the CSV held them."""
    fig = draw.best_match([{"label_a": "A", "label_b": "B", "layers_a": ["a0", "a1"],
                            "layers_b": ["b0"], "index": [0, 0], "value": [0.8, 1.1],
                            "se": [0.01, 0.05]}], "curves")
    low, high = fig.axes[1].get_ylim()
    assert low == 0.0 and high >= 1.15


def scale_panel(label, fractions, layers, accuracy=80.0, missing=()):
    entries = [{"fraction": f, "label": f"{label} {f}", "test_accuracy": 40.0 + 10 * k,
                "layers": layers, "cka": rand(len(layers), k).tolist(),
                "se": (0.01 * rand(len(layers), k + 9)).tolist()}
               for k, f in enumerate(fractions)]
    return {"label": label, "entries": entries, "base_accuracy": accuracy,
            "missing": list(missing)}


def test_data_scale_draws_a_depth_curve_per_fraction_and_accuracy_beside(tmp_path):
    panels = [scale_panel("ViT", [0.1, 0.5], VIT, missing=[0.25]),
              scale_panel("ResNet-18", [0.25], RES, accuracy=None)]
    fig = draw.data_scale(panels, "scale")
    (vit_cka, vit_acc), (res_cka, res_acc) = np.reshape(fig.axes, (2, 2))
    for k, e in enumerate(panels[0]["entries"]):  # one curve per fraction, along the depth
        np.testing.assert_array_equal(vit_cka.containers[k].lines[0].get_ydata(), e["cka"])
    assert [t.get_text() for t in vit_cka.get_xticklabels()] == VIT
    assert [t.get_text() for t in vit_cka.get_legend().get_texts()] == [
        "0.1 of the data, 40.0 %", "0.5 of the data, 50.0 %"]
    assert "missing: 0.25" in vit_cka.get_title()
    np.testing.assert_array_equal(vit_acc.lines[0].get_xydata(),
                                  [[0.1, 40.0], [0.5, 50.0], [1.0, 80.0]])  # full data at 1
    assert res_acc.lines[0].get_xydata().tolist() == [[0.25, 40.0]]  # no full-data accuracy
    assert len(res_cka.containers) == 1
    assert_saved(fig, tmp_path / "d")


def test_a_title_wider_than_the_figure_wraps_inside_it():
    title = ("Data scale: ViTs trained on fractions of CIFAR-10 vs the full-data ViT, with "
             "a long title that runs on\n" + draw.describe("linear", "minibatch", 1000, 1000))
    fig = draw.data_scale([scale_panel("ViT", [0.1], VIT)], title)
    fig.canvas.draw()
    (text,) = [t for t in fig.texts if t.get_text().startswith("Data scale")]  # the suptitle
    box = text.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1


def test_attention_distance_numbers_blocks_from_0_like_the_cli():
    d = rand((6, 3))
    fig = draw.attention_distance({"ViT": d}, uniform={"ViT": 0.5})
    ax = fig.axes[0]
    assert ax.lines[0].get_xdata().tolist() == list(range(6))  # mean over heads per block
    assert sorted(set(ax.collections[0].get_offsets()[:, 0])) == list(range(6))


def test_table_renders_markdown_and_csv():
    md, csv_text = draw.table([{"model": "ViT", "acc": 81.364, "x": None}], ["model", "acc", "x"])
    assert md == "| model | acc | x |\n|---|---|---|\n| ViT | 81.36 | - |\n"
    assert csv_text == "model,acc,x\nViT,81.364,\n"


# ------------------------------------------------------------------ specs


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(text)
    return folder / f"{name}.toml"


PROBE = """
[probe]
dataset = "cifar10-probe"
n = 8
[cka]
estimator = "minibatch"
batch_size = 8
"""


@pytest.mark.parametrize("text, message", [
    ('kind = "pie_chart"\n', "kind 'pie_chart' is unknown; valid kinds: "),
    ('kind = ["cka_grid"]\n', "kind ['cka_grid'] is unknown; valid kinds: "),
    ('kind = "cka_grid"\nmodel = ["vit_cifar"]\n', "keys ['model'] are unknown"),
    ('kind = "cka_grid"\n', "needs models"),
    ('kind = "cka_grid"\nmodels = ["vit_cifar"]\n[probe]\nsize = 3\n', "[probe] keys"),
    ('kind = "cka_grid\n', "not valid TOML"),
    ('kind = "cka_grid"\nmodels = ["vit_cifar"]\n[cka]\npermutations = "x"\n',
     "[cka] permutations = 'x' must be an integer"),
    ('kind = "cka_grid"\nmodels = ["vit_cifar"]\n[probe]\nn = "x"\n',
     "[probe] n = 'x' must be an integer"),
    ('kind = "cka_grid"\nmodels = ["vit_cifar"]\n[cka]\nkernel="rbf"\nthreshold = "x"\n',
     "[cka] threshold = 'x' must be a number"),
    ('kind = "cka_grid"\nmodels = ["vit_cifar"]\ncka = 3\n', "cka = 3 must be a table"),
    ('kind = "cka_grid"\nmodels = ["vit_cifar"]\nlabels = "x"\n', "labels = 'x' must be a table"),
    ('kind = "cka_grid"\nmodels = "vit_cifar"\n', "models = 'vit_cifar' must be a non-empty "
     'list of models, e.g. models = ["vit_cifar", "resnet18_cifar"]'),
    ('kind = "attention"\nmodels = 5\n', "models = 5 must be a non-empty list of models"),
    ('kind = "data_scale"\nbases = []\n', "bases = [] must be a non-empty list of models"),
    ('kind = "accuracy_table"\nrows = [{dataset = "c", model = "m", study = 1}]\n'
     'description = 5\n', "description = 5 must be a string; fix the file"),
    ('kind = "cka_grid"\nmodels = ["vit_cifar"]\ntitle = ["a"]\n', "title = ['a'] must be a "
     "string"),
    ('kind = "accuracy_table"\nrows = 5\n', "rows = 5 must be a non-empty list of rows, e.g. "
     "one [[rows]] table"),
    ('kind = "best_match"\npairs = [["vit_cifar", {model = "resnet18_cifar"}]]\n[labels]\n'
     'resnet18_cifr = "R"\n', "[labels] keys ['resnet18_cifr'] name no model of this spec; "
     "its models: resnet18_cifar, vit_cifar"),
    ('kind = "prefix_tokens"\nmodels = ["vit_cifar_tiny_mcls4"]\n[cka]\nestimator = "biased"\n',
     "[cka] is not read by kind 'prefix_tokens'"),  # its token CKA was debiased regardless
])
def test_bad_specs_are_refused_with_the_file_name(tmp_path, text, message):
    path = write(tmp_path / "analyses", "bad", text)
    with pytest.raises(UserError, match=None) as exc:
        load_specs(tmp_path / "analyses")
    assert message in str(exc.value) and str(path) in str(exc.value)


@pytest.mark.parametrize("text, message", [
    ('kind = "data_scale"\nbase = "vit_cifar"\nfractions = 0.5\n',
     "fractions=0.5 must be a list of numbers"),
    ('kind = "data_scale"\nbase = "vit_cifar"\ncheckpoints = 5\n',
     "checkpoints=5 must be a file-name pattern"),
    ('kind = "accuracy_table"\nrows = [1]\n', "each [[rows]] needs dataset, model and study"),
    ('kind = "accuracy_table"\n[[rows]]\ndataset = "cifar10"\nmodel = "vit_cifar"\n'
     'study = "81.36 %"\n', "[[rows]] study='81.36 %' must be a number (the study's accuracy, "
     "%), e.g. study = 81.36"),
    ('kind = "cka_grid"\nmodels = [{model = "vit_cifar", weights = 5}]\n',
     "weights=5 must be a file name"),
    ('kind = "cka_grid"\nmodels = ["vit_cifar"]\n[labels]\nvit_cifar = 1\n',
     "[labels] vit_cifar=1 must be a string"),
    ('kind = "featuremaps"\nmodel = {model = "resnet18_cifar", weights = ["a.pt", "b.pt"]}\n',
     "weights=['a.pt', 'b.pt'] lists seeds, but this figure reads one resnet18_cifar model"),
    ('kind = "data_scale"\nbase = {model = "vit_cifar", weights = ["a.pt", "b.pt"]}\n',
     "weights=['a.pt', 'b.pt'] lists seeds, but this figure reads one vit_cifar model"),
    ('kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\nimages = 1\n'
     'renormalize = "false"\n[probe]\nn = 4\n', "renormalize='false' must be true or false"),
    ('kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\nimages = 1\n'
     'blocks = "9"\n[probe]\nn = 4\n', "blocks='9': block 9 does not exist"),
    ('kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\nimages = 1\n'
     'batch_size = 2.7\n[probe]\nn = 4\n', "batch_size=2.7 must be a positive integer"),
    ('kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\nimages = 1\n'
     'batch_size = "8"\n[probe]\nn = 4\n', "batch_size='8' must be a positive integer"),
    ('kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\nimages = 1\n'
     'batch_size = true\n[probe]\nn = 4\n', "batch_size=True must be a positive integer"),
    ('kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\nimages = 1\n'
     'batch_size = 0\n[probe]\nn = 4\n', "batch_size=0 must be a positive integer"),
    ('kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\nimages = 1.5\n'
     '[probe]\nn = 4\n', "images=1.5 must be a positive integer"),
    ('kind = "featuremaps"\nmodel = {model = "resnet18_cifar", weights = "random"}\n'
     'ids = [1.5]\n[probe]\nn = 4\n', "ids=[1.5] must be a list of sample ids (integers)"),
    ('kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\nimages = 1\n'
     'blocks = "nosuch"\n[probe]\nn = 4\n', "blocks='nosuch' matches nothing in vit_cifar"),
    ('kind = "featuremaps"\nmodel = {model = "resnet18_cifar", weights = "random"}\n'
     'top = 2.5\n[probe]\nn = 4\n', "top=2.5 must be a positive integer"),
    ('kind = "featuremaps"\nmodel = {model = "resnet18_cifar", weights = "random"}\n'
     'stages = 5\n[probe]\nn = 4\n', "stages=5 must be layer names: a string or a list of "
     'them, e.g. stages = "layer1,layer4"'),
    ('kind = "attention"\nmodels = [{model = "vit_cifar", weights = "random"}]\nimages = 1\n'
     'blocks = {a = 1}\n[probe]\nn = 4\n', "blocks={'a': 1} must be block numbers or names: "
     'a string or a list of them, e.g. blocks = "0,5"'),
    ('kind = "locality"\nvit = {model = "vit_cifar", weights = "random"}\n'
     'max_images = "8"\n[probe]\nn = 8\n', "max_images='8' must be a positive integer"),
    ('kind = "probes"\nmodels = [{model = "vit_cifar", weights = "random"}]\nsteps = 1.5\n',
     "steps=1.5 must be a positive integer"),
    ('kind = "probes"\nmodels = [{model = "vit_cifar", weights = "random"}]\n'
     'train_fraction = "0.5"\n', "train_fraction='0.5' must be a number"),
    ('kind = "probes"\nmodels = [{model = "vit_cifar", weights = "random"}]\n'
     'split_seed = 1.0\n', "split_seed=1.0 must be an integer"),
])
def test_a_wrongly_typed_value_fails_that_figure_only(tmp_path, monkeypatch, text, message):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": []}))
    write(tmp_path / "a", "bad", text)
    write(tmp_path / "a", "good", 'kind = "accuracy_table"\n[[rows]]\ndataset = "cifar10"\n'
          'model = "vit_cifar"\nstudy = 81.36\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["good"]
    (failed,) = res["failed"]
    assert failed["name"] == "bad" and message in failed["reason"], failed


def test_a_row_naming_a_checkpoint_of_another_dataset_or_model_fails_in_one_line(tmp_path,
                                                                                  monkeypatch):
    """A row's checkpoint gave its accuracy whatever it was trained on: a CIFAR-10 run's
    number stood in the CIFAR-100 row, as ours against the study's CIFAR-100 one."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [
        {"name": "vit_cifar", "model": "vit_cifar", "dataset": "cifar10",
         "test_accuracy": 77.5}]}))
    write(tmp_path / "a", "acc", 'kind = "accuracy_table"\n[[rows]]\ndataset = "cifar100"\n'
          'model = "vit_cifar"\nstudy = 54.31\ncheckpoint = "vit_cifar"\n')
    (failed,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["failed"]
    assert failed["reason"] == (
        "acc: [[rows]] checkpoint 'vit_cifar' is a vit_cifar run on cifar10, but its row is "
        "vit_cifar on cifar100; name a checkpoint of that model and dataset, or leave "
        "checkpoint out; fix the file"), failed


def test_a_manifest_entry_whose_train_fraction_is_null_is_no_full_data_run(tmp_path,
                                                                            monkeypatch):
    """A hand-edited "train_fraction": null stopped the whole run with TypeError (float(None));
    the entry is no full-data run, so the row reads the run that is one."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [
        {"name": "vit_cifar_x", "model": "vit_cifar", "dataset": "cifar10",
         "train_fraction": None, "test_accuracy": 11.0},
        {"name": "vit_cifar_yy", "model": "vit_cifar", "dataset": "cifar10",
         "test_accuracy": 77.5}]}))
    write(tmp_path / "a", "acc", 'kind = "accuracy_table"\n[[rows]]\ndataset = "cifar10"\n'
          'model = "vit_cifar"\nstudy = 81.36\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert not res["failed"] and "77.5" in (tmp_path / "f" / "acc.md").read_text()


def test_only_drops_empty_names_and_refuses_a_list_of_none(tmp_path, monkeypatch, capsys):
    """`--only acc,` builds acc (not "no spec named  "); `--only ,` names no spec: one line."""
    from repsim.cli import main

    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": []}))
    write(tmp_path / "a", "acc", 'kind = "accuracy_table"\n[[rows]]\ndataset = "cifar10"\n'
          'model = "vit_cifar"\nstudy = 81.36\n')
    args = ["figures", "--analyses", str(tmp_path / "a"), "--out", str(tmp_path / "f"), "--json"]
    assert main(args + ["--only", "acc,"]) == 0
    assert (tmp_path / "f" / "acc.md").exists()
    capsys.readouterr()
    assert main(args + ["--only", ","]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--only ','" in err and "no spec name" in err, err


def test_a_bad_spec_file_is_reported_by_its_keys_not_as_command_line_flags(tmp_path, capsys):
    """The CLI prints a library's `name=value` as `--name value`; a spec file's key is no
    flag, so the spec errors write TOML's `key = value`."""
    from repsim.cli import main

    write(tmp_path / "a", "bad", 'kind = "cka_grid"\nmodels = ["vit_cifar"]\n[cka]\n'
          'permutations = "x"\n')
    assert main(["figures", "--analyses", str(tmp_path / "a"), "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert "[cka] permutations = 'x' must be an integer" in err and "--perm" not in err, err


def test_a_registered_kind_is_built_then_cached_until_its_input_changes(tmp_path, monkeypatch):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [{"name": "m"}]}))
    calls = []

    def build_count(spec, ctx):
        """Counts checkpoints in the manifest."""
        calls.append(spec["label"])
        ctx.data["count"] = len(ctx.manifest()["checkpoints"])
        return [ctx.write_text(".txt", f"{spec['label']}: {ctx.data['count']}\n")]

    monkeypatch.setitem(KINDS, "count", None)  # restored after the test
    figure_kind("count", fields=("label",))(build_count)
    write(tmp_path / "a", "c", 'kind = "count"\nlabel = "n"\n')
    run = lambda: build_all(tmp_path / "a", tmp_path / "f", progress=False)  # noqa: E731
    assert [e["name"] for e in run()["built"]] == ["c"]
    assert (tmp_path / "f" / "c.txt").read_text() == "n: 1\n"
    assert [e["name"] for e in run()["cached"]] == ["c"] and len(calls) == 1
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [{"name": "m"}, {}]}))
    assert [e["name"] for e in run()["built"]] == ["c"]
    assert (tmp_path / "f" / "c.txt").read_text() == "n: 2\n"
    record = json.loads((tmp_path / "f" / "c.json").read_text())
    assert record["data"] == {"count": 2} and record["cache_key"]


def test_a_cached_figure_in_a_moved_folder_lists_the_files_here(tmp_path, monkeypatch):
    """A record names the files where they were built (another machine's folder, for the
    committed figures); a cached figure's summary lists the files in this output folder."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": []}))

    def build_note(spec, ctx):
        """Reads the manifest, writes one file."""
        ctx.manifest()
        return [ctx.write_text(".txt", "built\n")]

    monkeypatch.setitem(KINDS, "note", None)  # restored after the test
    figure_kind("note")(build_note)
    write(tmp_path / "a", "c", 'kind = "note"\n')
    build_all(tmp_path / "a", tmp_path / "gpu", progress=False)
    shutil.move(tmp_path / "gpu", tmp_path / "here")  # built elsewhere, brought here
    (cached,) = build_all(tmp_path / "a", tmp_path / "here", progress=False)["cached"]
    assert cached["files"] == [str(tmp_path / "here" / f) for f in ("c.txt", "c.json")]


def test_a_figures_record_is_strict_json_with_nan_as_null(tmp_path, monkeypatch):
    """NaN in a figure's data (a zero-variance layer's CKA, say) was written as the bare
    token NaN, which JSON has not (jq, browsers refuse the file); it is null, as in the CKA
    results."""
    def build_nan(spec, ctx):
        """Data with NaN and infinity inside lists and tables."""
        ctx.data.update(cka=[[1.0, float("nan")]], summary={"own": [np.float64("inf")]})
        return [ctx.write_text(".txt", "built\n")]

    monkeypatch.setitem(KINDS, "nan", None)  # restored after the test
    figure_kind("nan")(build_nan)
    write(tmp_path / "a", "n", 'kind = "nan"\n')
    build_all(tmp_path / "a", tmp_path / "f", progress=False)

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    record = json.loads((tmp_path / "f" / "n.json").read_text(), parse_constant=refuse)
    assert record["data"] == {"cka": [[1.0, None]], "summary": {"own": [None]}}


def test_a_record_that_is_json_but_no_object_is_rebuilt_not_a_crash(tmp_path, monkeypatch):
    """A file at a figure's record path holding JSON that is no object (``[1]``) stopped the
    whole run with AttributeError; it is no record, so the figure is built."""
    monkeypatch.setitem(KINDS, "note", None)  # restored after the test
    figure_kind("note")(lambda spec, ctx: [ctx.write_text(".txt", "built\n")])
    write(tmp_path / "a", "c", 'kind = "note"\n')
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "c.json").write_text("[1]\n")
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["c"] and not res["failed"], res


def test_a_manifest_that_is_no_object_fails_its_figure_in_one_line(tmp_path, monkeypatch):
    """A checkpoint manifest holding a JSON array stopped the whole run with AttributeError;
    the figure that reads it fails with the schema's one line."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text("[]\n")
    monkeypatch.setitem(KINDS, "note", None)  # restored after the test
    figure_kind("note", fields=("read",))(
        lambda spec, ctx: [ctx.manifest() and ctx.write_text(".txt", "built\n")])
    write(tmp_path / "a", "reads", 'kind = "note"\nread = true\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    (failed,) = res["failed"]
    assert failed["name"] == "reads" and "has no 'checkpoints' list" in failed["reason"]


def test_a_manifest_entry_that_is_no_object_fails_its_figure_in_one_line(tmp_path,
                                                                         monkeypatch):
    """A checkpoints entry that is no object ("vit.pt") stopped the whole run with
    AttributeError where the entries are read; the figure fails in one line naming it."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": ["vit.pt"]}))
    monkeypatch.setitem(KINDS, "note", None)  # restored after the test
    figure_kind("note")(lambda spec, ctx: [ctx.checkpoints("vit_cifar", "vit*")
                                           and ctx.write_text(".txt", "built\n")])
    write(tmp_path / "a", "reads", 'kind = "note"\n')
    (failed,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["failed"]
    assert "checkpoints entry 'vit.pt' is not an object" in failed["reason"]


def test_a_manifest_entry_whose_train_fraction_is_true_is_no_fraction(tmp_path, monkeypatch):
    """`"train_fraction": true` passed isinstance(int) and was read as the whole data (1.0)."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "vit_a.pt").write_bytes(b"")
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [
        {"name": "vit_a", "model": "vit_cifar", "train_fraction": True}]}))
    monkeypatch.setitem(KINDS, "note", None)  # restored after the test
    figure_kind("note")(lambda spec, ctx: [ctx.write_text(
        ".txt", f"{len(ctx.checkpoints('vit_cifar', 'vit*'))}\n")])
    write(tmp_path / "a", "reads", 'kind = "note"\n')
    build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert (tmp_path / "f" / "reads.txt").read_text() == "0\n"


def test_an_override_that_changes_no_input_rebuilds_nothing(tmp_path, monkeypatch):
    """--data-root (the bundled probe set reads none; a path is not content) and --dataset
    equal to the spec's own leave the figure cached; --n, which changes its images, does not."""
    calls = []

    def build_pixels(spec, ctx):
        """Sums the probe images it reads."""
        calls.append(1)
        ctx.data["sum"] = int(ctx.images(ctx.probe_spec(spec)).images.sum())
        return [ctx.write_text(".txt", f"{ctx.data['sum']}\n")]

    monkeypatch.setitem(KINDS, "pixels", None)  # restored after the test
    figure_kind("pixels")(build_pixels)
    write(tmp_path / "a", "p", 'kind = "pixels"\n[probe]\ndataset = "cifar10-probe"\nn = 8\n')
    run = lambda **o: build_all(tmp_path / "a", tmp_path / "f", overrides=o,  # noqa: E731
                                progress=False)
    assert [e["name"] for e in run()["built"]] == ["p"]
    same = run(data_root=str(tmp_path / "data"), dataset="cifar10-probe", n=8)
    assert [e["name"] for e in same["cached"]] == ["p"] and len(calls) == 1
    assert [e["name"] for e in run(n=4)["built"]] == ["p"] and len(calls) == 2
    assert str(tmp_path / "data") not in json.loads((tmp_path / "f" / "p.json").read_text())[
        "cache_key"] + json.dumps(json.loads((tmp_path / "f" / "p.json").read_text())["deps"])


def test_a_figures_record_names_no_data_folder_of_the_machine_that_built_it(tmp_path,
                                                                           monkeypatch):
    """--data-root is where the images were read, not which: it stays out of the key, and out
    of the committed record too (it was written there as this machine's path)."""
    def build_pixels(spec, ctx):
        """Sums the probe images it reads."""
        ctx.data["sum"] = int(ctx.images(ctx.probe_spec(spec)).images.sum())
        return [ctx.write_text(".txt", f"{ctx.data['sum']}\n")]

    monkeypatch.setitem(KINDS, "pixels", None)  # restored after the test
    figure_kind("pixels")(build_pixels)
    write(tmp_path / "a", "p", 'kind = "pixels"\n[probe]\ndataset = "cifar10-probe"\nn = 8\n')
    build_all(tmp_path / "a", tmp_path / "f", progress=False,
              overrides={"data_root": str(tmp_path / "data"), "n": 4})
    record = json.loads((tmp_path / "f" / "p.json").read_text())
    assert record["overrides"] == {"n": 4}
    assert str(tmp_path / "data") not in json.dumps(record)


def test_a_figures_record_names_its_files_not_the_folder_they_were_built_in(tmp_path,
                                                                          monkeypatch):
    """The committed records listed /work/main/.device/run/figures/...: the GPU machine's
    folder. A record lists its files by name (the output folder is where it lies)."""
    monkeypatch.setitem(KINDS, "note", None)  # restored after the test
    figure_kind("note")(lambda spec, ctx: [ctx.write_text(".txt", "built\n")])
    write(tmp_path / "a", "c", 'kind = "note"\n')
    (built,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["built"]
    assert built["files"] == [str(tmp_path / "f" / n) for n in ("c.txt", "c.json")]
    assert json.loads((tmp_path / "f" / "c.json").read_text())["files"] == ["c.txt", "c.json"]


def test_a_figure_whose_inputs_left_keeps_its_build_and_the_report_says_why(tmp_path,
                                                                           monkeypatch):
    from repsim.compare import InputUnavailable

    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [{"name": "m"}]}))
    here = {"inputs": True}

    def build_snap(spec, ctx):
        """Stands for a figure of GPU-machine snapshots: built there, its inputs absent here."""
        ctx.manifest()  # an input: the manifest here differs from the one it was built with
        if not here["inputs"]:
            raise InputUnavailable("no snapshots here")
        ctx.data["v"] = 1
        return [ctx.write_text(".txt", "built\n")]

    monkeypatch.setitem(KINDS, "snap", None)  # restored after the test
    figure_kind("snap")(build_snap)
    write(tmp_path / "a", "s", 'kind = "snap"\n')
    moved = tmp_path / "moved"
    build_all(tmp_path / "a", tmp_path / "f", progress=False)
    shutil.move(tmp_path / "f", moved)  # a folder built elsewhere, brought here
    here["inputs"] = False
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": []}))
    res = build_all(tmp_path / "a", moved, progress=False)
    assert [e["name"] for e in res["kept"]] == ["s"] and not res["skipped"]
    assert res["kept"][0]["reason"] == "no snapshots here"
    assert (moved / "s.txt").read_text() == "built\n"
    assert json.loads((moved / "s.json").read_text())["data"] == {"v": 1}
    report = (moved / "REPORT.md").read_text()
    assert "not rebuilt here: no snapshots here" in report and "Not built here" not in report
    (moved / "s.txt").unlink()  # an incomplete build is not kept
    assert [e["name"] for e in build_all(tmp_path / "a", moved, progress=False)["skipped"]] \
        == ["s"]


def _checkpoint_only(tmp_path: Path, monkeypatch, model: str, content: bytes) -> Path:
    """A checkpoint folder holding ``<model>.pt`` (``content``: only its hash matters), with
    load_model faked to read it without building the model."""
    import repsim.models

    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / f"{model}.pt").write_bytes(content)
    monkeypatch.setattr(repsim.models, "load_model",  # the model itself is not needed
                        lambda m, w=None: (None, {"weights": str(ck / f"{model}.pt")}))
    return ck


def test_a_kept_figure_says_when_the_weights_it_read_are_not_the_files_here(tmp_path,
                                                                            monkeypatch):
    """A kept build's numbers are those of the weights it read: once the checkpoint of that
    name here is another run, the report names it (else its accuracy and CKA pass for the
    committed model's)."""
    import hashlib

    ck = _checkpoint_only(tmp_path, monkeypatch, "resnet18_cifar", b"the run it was built from")
    (ck / "epoch0.pt").write_bytes(b"a snapshot")

    def build_snap(spec, ctx):
        """Reads the final model and a snapshot, which stays on the GPU machine."""
        ctx.model(ctx.model_ref("resnet18_cifar", spec))
        ctx.model(ctx.model_ref({"model": "resnet18_cifar", "weights": "epoch0.pt"}))
        return [ctx.write_text(".txt", "built\n")]

    monkeypatch.setitem(KINDS, "snap", None)  # restored after the test
    figure_kind("snap")(build_snap)
    write(tmp_path / "a", "s", 'kind = "snap"\n[labels]\nresnet18_cifar = "ResNet-18"\n')
    build_all(tmp_path / "a", tmp_path / "f", progress=False)
    (ck / "epoch0.pt").unlink()
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert res["kept"][0].get("changed", []) == []  # the same final model: nothing to say
    assert "not the files here" not in (tmp_path / "f" / "REPORT.md").read_text()
    old = hashlib.sha256((ck / "resnet18_cifar.pt").read_bytes()).hexdigest()
    (ck / "resnet18_cifar.pt").write_bytes(b"a newer run")
    new = hashlib.sha256(b"a newer run").hexdigest()
    (kept,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["kept"]
    line = f"ResNet-18 (resnet18_cifar.pt: it read sha256 {old[:12]}, here {new[:12]})"
    assert kept["changed"] == [line]
    assert line in (tmp_path / "f" / "REPORT.md").read_text()


def test_the_summary_of_a_kept_figure_names_the_weights_that_changed(tmp_path, monkeypatch,
                                                                     capsys):
    """The summary `repsim figures` prints (and its log line) shows what a kept figure's
    `changed` records, not only why it was kept: else the user never sees that its numbers
    are of another checkpoint than the one here."""
    from repsim.compare import InputUnavailable
    from repsim.figures.runner import summary_text

    ck = _checkpoint_only(tmp_path, monkeypatch, "vit_cifar", b"old run")
    here = {"inputs": True}

    def build_snap(spec, ctx):
        """Reads the final model; its snapshots then leave."""
        ctx.model(ctx.model_ref("vit_cifar", spec))
        if not here["inputs"]:
            raise InputUnavailable("no snapshots here")
        return [ctx.write_text(".txt", "built\n")]

    monkeypatch.setitem(KINDS, "snap", None)  # restored after the test
    figure_kind("snap")(build_snap)
    write(tmp_path / "a", "s", 'kind = "snap"\n')
    build_all(tmp_path / "a", tmp_path / "f", progress=False)
    here["inputs"] = False
    (ck / "vit_cifar.pt").write_bytes(b"new run")
    logged = []
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False, log=logged.append)
    (kept,) = res["kept"]
    assert len(kept["changed"]) == 1 and kept["changed"][0].startswith("vit_cifar (vit_cifar")
    text = summary_text(res)
    assert ("kept    s: no snapshots here; its numbers are of other weights than the files "
            f"here: {kept['changed'][0]}") in text.splitlines()
    assert any(kept["changed"][0] in line for line in logged), logged
    from repsim.cli import main  # and the command prints that summary

    capsys.readouterr()
    assert main(["figures", "--analyses", str(tmp_path / "a"), "--out", str(tmp_path / "f")]) == 0
    assert f"here: {kept['changed'][0]}" in capsys.readouterr().out


def test_a_build_that_stops_halfway_leaves_no_record_that_passes_for_complete(tmp_path,
                                                                               monkeypatch):
    """A rebuild that fails after rewriting some files left the old record behind: once the
    spec was back as it was, the mixed files were `cached` as the old figure."""
    def build_half(spec, ctx):
        """Writes its file, then (title "two") fails before the record is written."""
        files = [ctx.write_text(".txt", f"{spec['title']}\n")]
        if spec["title"] == "two":
            raise UserError("stopped halfway")
        return files

    monkeypatch.setitem(KINDS, "half", None)  # restored after the test
    figure_kind("half")(build_half)
    run = lambda: build_all(tmp_path / "a", tmp_path / "f", progress=False)  # noqa: E731
    write(tmp_path / "a", "s", 'kind = "half"\ntitle = "one"\n')
    assert [e["name"] for e in run()["built"]] == ["s"]
    write(tmp_path / "a", "s", 'kind = "half"\ntitle = "two"\n')
    assert [e["name"] for e in run()["failed"]] == ["s"]
    write(tmp_path / "a", "s", 'kind = "half"\ntitle = "one"\n')
    assert [e["name"] for e in run()["built"]] == ["s"]
    assert (tmp_path / "f" / "s.txt").read_text() == "one\n"


def test_a_build_of_another_spec_is_not_kept_when_the_inputs_are_gone(tmp_path, monkeypatch):
    """A kept build is a build of this spec: once the spec changed (here its title), the old
    files are not presented as its figure; it is skipped, and the report says why. Its
    record stays set aside: putting the spec back (`git checkout analyses/`) keeps the build
    again (it was deleted, so a GPU machine's build was lost for good)."""
    from repsim.compare import InputUnavailable

    here = {"inputs": True}

    def build_snap(spec, ctx):
        """Stands for a figure of GPU-machine snapshots: built there, its inputs absent here."""
        if not here["inputs"]:
            raise InputUnavailable("no snapshots here")
        return [ctx.write_text(".txt", f"{spec['title']}\n")]

    monkeypatch.setitem(KINDS, "snap", None)  # restored after the test
    figure_kind("snap")(build_snap)
    write(tmp_path / "a", "s", 'kind = "snap"\ntitle = "old"\n')
    build_all(tmp_path / "a", tmp_path / "f", progress=False)
    here["inputs"] = False
    write(tmp_path / "a", "s", 'kind = "snap"\ntitle = "new"\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["skipped"]] == ["s"] and not res["kept"]
    report = (tmp_path / "f" / "REPORT.md").read_text()
    assert "## old" not in report and "- `s`: no snapshots here" in report
    write(tmp_path / "a", "s", 'kind = "snap"\ntitle = "old"\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["kept"]] == ["s"]
    assert "## old" in (tmp_path / "f" / "REPORT.md").read_text()


# ------------------------------------------------------------------ the study's kinds


@pytest.fixture
def study(tmp_path, monkeypatch):
    """Random-weight checkpoints, a manifest, and one spec per built-in kind (n = 8)."""
    from repsim.models import build_model

    ck = tmp_path / "ckpt"
    ck.mkdir()
    for name, arch, seed in [("vit_cifar", "vit_cifar", 0), ("resnet18_cifar",
                             "resnet18_cifar", 0), ("vit_cifar_frac0.5", "vit_cifar", 1)]:
        torch.save(build_model(arch, seed=seed).state_dict(), ck / f"{name}.pt")
    manifest = {"checkpoints": [
        {"name": "vit_cifar", "file": "vit_cifar.pt", "model": "vit_cifar",
         "dataset": "cifar10", "train_fraction": 1.0, "epochs": 3, "epochs_planned": 500,
         "test_accuracy": 42.5, "recipe": "paper"},
        {"name": "vit_cifar_frac0.5", "file": "vit_cifar_frac0.5.pt", "model": "vit_cifar",
         "dataset": "cifar10", "train_fraction": 0.5, "test_accuracy": 30.0}]}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "analyses"
    write(a, "grid", 'kind = "cka_grid"\nmodels = ["vit_cifar", "resnet18_cifar"]\n' + PROBE)
    write(a, "best", 'kind = "best_match"\npairs = [["vit_cifar", "resnet18_cifar"]]\n' + PROBE)
    write(a, "acc", 'kind = "accuracy_table"\n[[rows]]\ndataset = "cifar10"\n'
          'model = "vit_cifar"\nstudy = 81.36\n[[rows]]\ndataset = "svhn"\n'
          'model = "resnet18_cifar"\nstudy = 95.78\n')
    write(a, "scale", 'kind = "data_scale"\nbase = "vit_cifar"\n'
          'checkpoints = "vit_cifar_frac*"\n' + PROBE)
    return tmp_path


def stamps(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_study_figures_are_built_cached_and_rebuilt_only_where_changed(study):
    run = lambda: build_all(study / "analyses", study / "figures", progress=False)  # noqa: E731
    first = run()
    assert sorted(e["name"] for e in first["built"]) == ["acc", "best", "grid", "scale"]
    assert not first["skipped"] and not first["failed"]
    figs = study / "figures"
    for name in ("grid", "best", "scale"):
        assert (figs / f"{name}.png").exists() and (figs / f"{name}.pdf").exists()
    grid = json.loads((figs / "grid.json").read_text())["data"]["panels"]
    assert [(p["row_model"], p["col_model"]) for p in grid] == [
        ("vit_cifar", "vit_cifar"), ("vit_cifar", "resnet18_cifar"),
        ("resnet18_cifar", "vit_cifar"), ("resnet18_cifar", "resnet18_cifar")]
    np.testing.assert_allclose(np.diag(grid[0]["matrix"]), 1.0, atol=1e-12)
    np.testing.assert_array_equal(np.array(grid[1]["matrix"]).T, grid[2]["matrix"])
    best = (figs / "best.csv").read_text().splitlines()
    assert best[0] == "model_a,layer_a,model_b,best_layer_b,cka,se" and len(best) == 1 + len(VIT)
    md = (figs / "acc.md").read_text()
    assert "| cifar10 | vit_cifar | 81.36 | 42.50 | -38.86 | 3/500 |" in md
    assert "| svhn | resnet18_cifar | 95.78 | - |" in md
    scale = json.loads((figs / "scale.json").read_text())["data"]["panels"][0]["entries"]
    assert [e["fraction"] for e in scale] == [0.5] and scale[0]["test_accuracy"] == 30.0

    before = stamps(figs)
    second = run()
    assert sorted(e["name"] for e in second["cached"]) == ["acc", "best", "grid", "scale"]
    assert stamps(figs) == before  # nothing rewritten

    spec = study / "analyses" / "best.toml"
    spec.write_text(spec.read_text().replace('kind = "best_match"',
                                             'kind = "best_match"\ntitle = "Renamed"'))
    third = run()
    assert [e["name"] for e in third["built"]] == ["best"]
    assert sorted(e["name"] for e in third["cached"]) == ["acc", "grid", "scale"]
    after = stamps(figs)
    assert all(after[k] == before[k] for k in before
               if not k.startswith("best.") and k != "REPORT.md")
    assert "## Renamed" in (figs / "REPORT.md").read_text()  # the report follows its figures


def test_the_cache_key_survives_moving_the_checkpoints_and_an_empty_cache(study, monkeypatch):
    """A fresh clone: the same checkpoint files elsewhere, no stores and no CKA results. The
    committed figures are reused as they are, and nothing is extracted to check them."""
    figs = study / "figures"
    build_all(study / "analyses", figs, progress=False)
    before = stamps(figs)
    assert not any(str(study / "ckpt") in (figs / f"{n}.json").read_text()
                   for n in ("acc", "best", "grid", "scale"))
    shutil.copytree(study / "ckpt", study / "elsewhere" / "checkpoints")
    shutil.rmtree(study / "ckpt")
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(study / "elsewhere" / "checkpoints"))
    monkeypatch.setenv("REPSIM_CACHE", str(study / "fresh-cache"))
    again = build_all(study / "analyses", figs, progress=False)
    assert sorted(e["name"] for e in again["cached"]) == ["acc", "best", "grid", "scale"]
    assert stamps(figs) == before and not (study / "fresh-cache").exists()
    # A changed weights file (same name, same place) is a changed input.
    vit = study / "elsewhere" / "checkpoints" / "vit_cifar_frac0.5.pt"
    from repsim.models import build_model

    torch.save(build_model("vit_cifar", seed=5).state_dict(), vit)
    third = build_all(study / "analyses", figs, progress=False)
    assert [e["name"] for e in third["built"]] == ["scale"]


def test_unavailable_weights_skip_that_figure_in_one_line_and_build_the_rest(study):
    write(study / "analyses", "imagenet", 'kind = "cka_grid"\nmodels = ["vit_imagenet", '
          '"vit_cifar"]\n' + PROBE)
    env = {**os.environ, "HF_HOME": str(study / "hf"), "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(study / "torch"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "repsim", "figures", "--analyses", str(study / "analyses"),
         "--out", str(study / "figures"), "--only", "imagenet,acc", "--offline"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    skipped = [ln for ln in lines if ln.startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped imagenet: pretrained weights")
    assert "vit_imagenet" in skipped[0] and "internet" in skipped[0]
    assert any(ln.startswith("built   acc:") for ln in lines)
    assert lines[-1].startswith("figures in ") and "1 built, 0 cached, 1 skipped" in lines[-1]
    assert (study / "figures" / "acc.md").exists()
    assert not (study / "figures" / "imagenet.png").exists()


@pytest.mark.parametrize("kind, models", [
    ("best_match", 'pairs = [["vit_cifar", {model = "resnet18_cifar", weights = "gone.pt"}]]'),
    ("cka_grid", 'models = ["vit_cifar", {model = "resnet18_cifar", weights = "gone.pt"}]')])
def test_a_missing_model_skips_the_figure_before_any_store_is_extracted(study, kind, models):
    """make demo offline: best_match_imagenet names vit_cifar before vit_imagenet, whose
    weights are not here; the figure is skipped without first extracting vit_cifar's store."""
    write(study / "analyses", "gone", f'kind = "{kind}"\n{models}\n' + PROBE)
    out = build_all(study / "analyses", study / "figures", only=["gone"], progress=False)
    assert [e["name"] for e in out["skipped"]] == ["gone"]
    assert "gone.pt" in out["skipped"][0]["reason"]
    assert not list((study / "cache").glob("stores/*.h5"))


def test_data_scale_builds_from_the_fractions_present_and_names_the_missing_ones(study):
    write(study / "analyses", "scale", 'kind = "data_scale"\nbases = ["vit_cifar", '
          '"resnet18_cifar"]\n' + PROBE)  # default: {base}_frac*, fractions 0.1, 0.25, 0.5
    write(study / "analyses", "none", 'kind = "data_scale"\nbase = "resnet18_cifar"\n' + PROBE)
    log: list[str] = []
    res = build_all(study / "analyses", study / "figures", only=["scale", "none"],
                    progress=False, log=log.append)
    assert [e["name"] for e in res["built"]] == ["scale"]
    data = json.loads((study / "figures" / "scale.json").read_text())["data"]
    assert data["missing"] == [{"base": "vit_cifar", "fractions": [0.1, 0.25]},
                               {"base": "resnet18_cifar", "fractions": [0.1, 0.25, 0.5]}]
    (panel,) = data["panels"]
    assert panel["label"] == "vit_cifar" and panel["base_accuracy"] == 42.5
    (entry,) = panel["entries"]
    assert entry["fraction"] == 0.5 and entry["test_accuracy"] == 30.0 and entry["layers"] == VIT
    assert entry["cka"] == [entry["matrix"][i][i] for i in range(len(VIT))]  # same layers
    assert all(se is not None and se >= 0 for se in entry["se"])
    (line,) = [ln for ln in log if "missing" in ln]
    assert "vit_cifar fractions 0.1, 0.25 (`repsim train --model vit_cifar --recipe paper " \
           "--train-fraction 0.1" in line and "resnet18_cifar fractions 0.1, 0.25, 0.5" in line
    assert (study / "figures" / "scale.png").exists()
    (skip,) = res["skipped"]  # no fraction checkpoint of any base: one line saying which
    assert skip["name"] == "none" and "\n" not in skip["reason"]
    assert "missing resnet18_cifar fractions 0.1, 0.25, 0.5" in skip["reason"]


def test_a_missing_manifest_skips_the_table_in_one_line(study):
    (study / "ckpt" / "manifest.json").unlink()
    res = build_all(study / "analyses", study / "figures", only=["acc"], progress=False)
    assert [e["name"] for e in res["skipped"]] == ["acc"]
    assert "no checkpoint manifest" in res["skipped"][0]["reason"]
    assert "\n" not in res["skipped"][0]["reason"]


def test_a_cka_figures_data_states_the_settings_and_n_its_title_gives(tmp_path, monkeypatch):
    """The title says "linear CKA, minibatch estimator (batch 8), n = 8"; the data behind it
    said nothing of the kind for best_match (no n at all), nor the settings for cka_grid."""
    from repsim.figures.context import FigureContext

    def fake_cka(self, a, b, probe, settings):
        """A 2 x 2 result of n = 8 rows: the builders' data, not CKA, is under test."""
        return {"matrix": [[0.9, 0.2], [0.3, 0.8]], "layers_a": ["a0", "a1"],
                "layers_b": ["b0", "b1"], "n": 8, "se": None, "p_value": None}

    monkeypatch.setattr(FigureContext, "store", lambda self, ref, probe: None)
    monkeypatch.setattr(FigureContext, "cka", fake_cka)
    monkeypatch.setattr(draw, "save", lambda fig, *a, **k: draw.plt.close(fig) or [])  # slow
    m = '{model = "vit_cifar", weights = "random"}, {model = "resnet18_cifar", weights = "random"}'
    write(tmp_path / "a", "best", f"kind = \"best_match\"\npairs = [[{m}]]\n" + PROBE)
    write(tmp_path / "a", "grid", f"kind = \"cka_grid\"\nmodels = [{m}]\n" + PROBE)
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert sorted(e["name"] for e in res["built"]) == ["best", "grid"], res
    want = {"kernel": "linear", "estimator": "minibatch", "batch_size": 8, "batch_seed": 0,
            "threshold": 1.0, "permutations": 0}
    for name in ("best", "grid"):
        data = json.loads((tmp_path / "f" / f"{name}.json").read_text())["data"]
        assert (data["n"], data["cka"]) == (8, want), name


def test_a_grid_with_a_null_carries_p_values_and_errors_transposed_with_each_panel(study):
    write(study / "analyses", "grid", 'kind = "cka_grid"\nmodels = ["vit_cifar", '
          '"resnet18_cifar"]\n' + PROBE + "permutations = 19\n")  # in PROBE's [cka]
    res = build_all(study / "analyses", study / "figures", only=["grid"], progress=False)
    assert [e["name"] for e in res["built"]] == ["grid"]
    panels = json.loads((study / "figures" / "grid.json").read_text())["data"]["panels"]
    for key in ("matrix", "se", "p_value"):
        np.testing.assert_array_equal(np.array(panels[1][key], dtype=float).T,
                                      np.array(panels[2][key], dtype=float))
    p = np.array(panels[1]["p_value"], dtype=float)
    assert p.shape == (len(VIT), len(RES)) and np.all((p >= 1 / 20) & (p <= 1))


def test_the_report_captions_each_figure_with_numbers_from_its_data(study, monkeypatch):
    write(study / "analyses", "imagenet", 'kind = "cka_grid"\nmodels = ["vit_imagenet", '
          '"resnet18_cifar"]\n' + PROBE)
    monkeypatch.setenv("REPSIM_OFFLINE", "1")  # vit_imagenet's weights: skipped, with why
    monkeypatch.setenv("HF_HOME", str(study / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(study / "torch"))
    res = build_all(study / "analyses", study / "figures", progress=False)
    report = (study / "figures" / "REPORT.md").read_text()
    assert res["report"] == str(study / "figures" / "REPORT.md")
    curve = json.loads((study / "figures" / "best.json").read_text())["data"]["curves"][0]
    hit = [v for v in curve["value"] if v >= 0.5]
    low = [v for v in curve["value"] if v < 0.5]
    assert hit or low
    if hit:
        assert f"at CKA {min(hit):.2f}-{max(hit):.2f}" in report
    if low:
        assert f"match nothing in resnet18_cifar above {max(low):.2f}." in report
    assert "![grid](grid.png)" in report and "## Not built here" in report
    assert "- `imagenet`: " in report
    assert "vit_cifar on cifar10: ours 42.50 % against the study's 81.36 %." in report
    assert report.index("![best]") < report.index("| cifar10 | vit_cifar | 81.36 | 42.50 |")
    again = build_all(study / "analyses", study / "figures", progress=False)
    assert (study / "figures" / "REPORT.md").read_text() == report and again["cached"]


def test_a_model_with_several_weights_files_is_drawn_as_the_mean_over_its_seeds(study, capsys):
    from repsim.cli import main
    from repsim.models import build_model

    for s in (1, 2):
        torch.save(build_model("vit_cifar", seed=20 + s).state_dict(), study / "ckpt" / f"s{s}.pt")
    write(study / "analyses", "grid", 'kind = "cka_grid"\nmodels = [{model = "vit_cifar", '
          'weights = ["s1.pt", "s2.pt"]}, "resnet18_cifar"]\n' + PROBE)
    res = build_all(study / "analyses", study / "figures", only=["grid"], progress=False)
    assert [e["name"] for e in res["built"]] == ["grid"], res
    panel = json.loads((study / "figures" / "grid.json").read_text())["data"]["panels"][1]
    assert panel["row_model"] == "vit_cifar (2 seeds)"
    each = []
    for s in (1, 2):
        assert main(["cka", "--a", "vit_cifar", "--weights-a", str(study / "ckpt" / f"s{s}.pt"),
                     "--b", "resnet18_cifar", "--n", "8", "--batch-size", "8", "--json"]) == 0
        each.append(json.loads(capsys.readouterr().out)["matrix"])
    np.testing.assert_allclose(panel["matrix"], np.mean(each, 0), atol=1e-12)


def test_the_prefix_figure_gives_the_accuracy_of_the_weights_it_drew(tmp_path, monkeypatch):
    """A model entry with other weights than the model's own: its heading's accuracy is that
    checkpoint's, not the default checkpoint's."""
    from repsim.models import build_model

    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    name = "vit_cifar_tiny_mcls4"
    for stem, seed in ((name, 0), (f"{name}_seed1", 1)):
        torch.save(build_model(name, seed=seed).state_dict(), ck / f"{stem}.pt")
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [
        {"name": name, "file": f"{name}.pt", "model": name, "test_accuracy": 90.0},
        {"name": f"{name}_seed1", "file": f"{name}_seed1.pt", "model": name,
         "test_accuracy": 60.0}]}))
    write(tmp_path / "a", "prefix", f'kind = "prefix_tokens"\nmodels = [{{model = "{name}", '
          f'weights = "{name}_seed1.pt"}}]\nlayer = "blocks.0"\n[probe]\nn = 4\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["prefix"], res
    (entry,) = json.loads((tmp_path / "f" / "prefix.json").read_text())["data"]["models"]
    assert entry["test_accuracy"] == 60.0
    assert entry["uniform_mass"] == pytest.approx(1 / (4 + 64), rel=1e-12)  # 4 + 8 x 8 tokens


def test_the_probes_cka_axes_reach_a_deletion_below_zero():
    """The CKA rows were fixed at -0.05..1.05: a deletion's CKA of -0.3 (unbiased, not
    clamped) fell off the picture while the data and the CSV held it."""
    from repsim.figures.probes import draw_probes

    entry = {"label": "R", "layers": ["l0", "l1"], "ks": [0, 1],
             "accuracy": [[0.5, 0.4], [0.9, 0.8]], "self_cka": [[1.0, -0.3], [1.0, 0.5]],
             "match_layers": None, "match_cka": None}
    fig = draw_probes([entry], 0.3, 10, "t")
    low, high = fig.axes[-1].get_ylim()
    assert low <= -0.3 and high >= 1.0


@pytest.mark.parametrize("layer, message", [
    ('"blocks.*"', "layer='blocks.*' names 9 layers (blocks.0 .. blocks.8); the prefix figure "
     "reads one, e.g. layer = \"blocks.8\""),
    ('"blocks.99"', "layer='blocks.99' matches nothing in vit_cifar_tiny_mcls4"),
    ("8", "layer=8 must be one layer name, e.g. layer = \"blocks.8\""),
])
def test_a_prefix_layer_that_is_not_one_layer_fails_that_figure_by_its_key(tmp_path, layer,
                                                                            message):
    """A glob crashed the whole run (KeyError); an unknown name was reported as `layers=`."""
    write(tmp_path / "a", "prefix", 'kind = "prefix_tokens"\nmodels = [{model = '
          f'"vit_cifar_tiny_mcls4", weights = "random"}}]\nlayer = {layer}\n[probe]\nn = 4\n')
    (failed,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["failed"]
    assert failed["reason"].startswith(message), failed


def test_the_rank_figure_draws_the_rank_line_of_the_models_it_measured():
    """It drew a dotted line at 64 captioned "rank 64" whatever the models: a full-rank ViT
    has no such rank. The lines are the low-rank models' own ranks (their data's)."""
    from repsim.figures.lowrank import draw_ranks

    full = {"label": "full", "n": 4, "rank": None, "weight_rank": [[150.0, 140.0]],
            "activation_rank": [[20.0, 21.0]]}

    def dotted(fig):
        return [line.get_ydata()[0] for line in fig.axes[0].lines if line.get_linestyle() == ":"]

    fig = draw_ranks([full], "t")
    assert dotted(fig) == [] and "rank" not in fig.axes[0].get_title()
    fig = draw_ranks([full, {**full, "label": "low q", "rank": 48}], "t")
    assert dotted(fig) == [48] and fig.axes[0].get_title().endswith("(dotted: rank 48)")


def test_force_recomputes_the_attention_distances_too(tmp_path, monkeypatch):
    """--force rebuilds ignoring caches: a cached attention distance is recomputed, and the
    cache holds the new value."""
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    write(tmp_path / "a", "attn", 'kind = "attention"\nmodels = [{model = "vit_cifar", '
          'weights = "random"}]\nimages = 1\nblocks = "0"\n[probe]\nn = 4\n')
    run = lambda **kw: build_all(tmp_path / "a", tmp_path / "f", progress=False,  # noqa: E731
                                 **kw)
    assert [e["name"] for e in run()["built"]] == ["attn"]
    (cached,) = (tmp_path / "cache" / "attention").glob("*.json")
    saved = json.loads(cached.read_text())
    stale = np.zeros_like(np.asarray(saved["distance_model_px"])).tolist()
    cached.write_text(json.dumps({**saved, "distance_model_px": stale}))
    assert [e["name"] for e in run(force=True)["built"]] == ["attn"]
    (model,) = json.loads((tmp_path / "f" / "attn.json").read_text())["data"]["models"]
    assert model["distance_model_px"] != stale
    assert json.loads(cached.read_text())["distance_model_px"] == model["distance_model_px"]


def test_the_attention_figures_data_names_the_weights_and_blocks_it_drew(tmp_path,
                                                                         monkeypatch):
    """Its data held the distances but not which weights gave them, nor which blocks the
    per-head maps show (`repsim attention`'s files carry both)."""
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(draw, "save", lambda fig, *a, **k: draw.plt.close(fig) or [])  # slow
    write(tmp_path / "a", "attn", 'kind = "attention"\nmodels = [{model = "vit_cifar", '
          'weights = "random"}]\nimages = 1\nblocks = "0,5"\n[probe]\nn = 4\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["attn"], res
    (model,) = json.loads((tmp_path / "f" / "attn.json").read_text())["data"]["models"]
    assert (model["weights"]["weights"], model["blocks"]) == ("random", [0, 5])


def test_the_locality_figures_forward_batch_is_the_probes_batch_size(tmp_path, monkeypatch):
    """[probe] batch_size is images per forward pass, as for every kind's extraction (it was
    always 64); unset, it stays 64, and 0 fails that figure in one line."""
    import repsim.locality

    seen, measure = [], repsim.locality.measure

    def spy(*args, **kw):
        seen.append(kw.get("forward_batch", 64))
        return measure(*args, **kw)

    monkeypatch.setattr(repsim.locality, "measure", spy)
    spec = ('kind = "locality"\nvit = {model = "vit_cifar", weights = "random", layers = '
            '"blocks.0"}\nmax_images = 4\n[probe]\nn = 8\n')
    write(tmp_path / "a", "loc3", spec + "batch_size = 3\n")
    write(tmp_path / "a", "loc", spec)
    write(tmp_path / "a", "loc0", spec + "batch_size = 0\n")
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["loc", "loc3"], res
    assert seen == [64, 3]
    (failed,) = res["failed"]
    assert failed["name"] == "loc0" and "[probe] batch_size=0" in failed["reason"], failed


def test_the_probes_figure_reads_a_model_entrys_layers_outside_the_default_store(tmp_path):
    """Like every kind, probes takes a model entry's ``layers`` even when the default store
    lacks them (a store of exactly those is made)."""
    write(tmp_path / "a", "p", 'kind = "probes"\nmodels = [{model = "resnet18_cifar", '
          'weights = "random", layers = "layer1.0,layer2"}]\nks = [1]\nsteps = 5\n'
          '[probe]\nn = 20\nreduce = "mean"\n[cka]\nestimator = "debiased"\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["p"], res
    (entry,) = json.loads((tmp_path / "f" / "p.json").read_text())["data"]["entries"]
    assert entry["layers"] == ["layer1.0", "layer2"]


def test_every_png_of_repsim_attention_names_the_models_weights(tmp_path, monkeypatch):
    """The README: every PNG carries its provenance (model, weights and sha256, data,
    versions) in its text chunk; the rollout and distance plots included."""
    from hashlib import sha256

    from PIL import Image

    from repsim.cli import main
    from repsim.models import build_model

    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "w.pt"
    torch.save(build_model("vit_cifar", seed=3).state_dict(), weights)
    out = tmp_path / "fig"
    assert main(["attention", "--model", "vit_cifar", "--weights", str(weights), "--probe", "4",
                 "--images", "1", "--layers", "0", "--out", str(out), "--json"]) == 0
    for png in ("attention_heads_vit_cifar", "attention_rollout", "attention_distance"):
        prov = json.loads(Image.open(out / f"{png}.png").text["Description"])
        text = json.dumps(prov)
        assert "vit_cifar" in text and str(weights) in text, png
        assert prov["data"]["n"] == 4 and prov["versions"]["repsim"], png
        assert sha256(weights.read_bytes()).hexdigest() in text, png


def test_seeds_given_to_the_probes_figure_fail_it_in_one_line(tmp_path, monkeypatch):
    """probes averages nothing over seeds: a list of weights files is refused, not a crash."""
    from repsim.models import build_model

    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    for s in (1, 2):
        torch.save(build_model("resnet18_cifar", seed=s).state_dict(), ck / f"s{s}.pt")
    write(tmp_path / "a", "p", 'kind = "probes"\nmodels = [{model = "resnet18_cifar", '
          'weights = ["s1.pt", "s2.pt"]}]\n[probe]\nn = 8\nreduce = "mean"\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    (failed,) = res["failed"]
    assert "weights=['s1.pt', 's2.pt'] lists seeds" in failed["reason"]


def test_a_caption_names_layers_that_are_not_neighbours_one_by_one():
    """Layers 0 and 2 of A match, layer 1 does not: the caption must not say 0..2 match."""
    from repsim.figures.report import match_caption

    la, lb = ["a0", "a1", "a2"], ["b0", "b1", "b2", "b3"]
    match = {"index": [0, 1, 3], "value": [0.9, 0.2, 0.8], "se": None}
    assert match_caption("A", "B", la, lb, match).splitlines() == [
        "A a0, a2 best match B b0, b3 at CKA 0.80-0.90.", "A a1 match nothing in B above 0.20."]
    match = {"index": [0, 1, 2], "value": [0.9, 0.7, 0.2], "se": None}  # runs stay spans
    assert match_caption("A", "B", la, lb, match).splitlines() == [
        "A a0..a1 best match B b0..b1 at CKA 0.70-0.90.", "A a2 match nothing in B above 0.20."]


def test_a_timm_models_default_tag_is_in_its_figures_fingerprint(tmp_path):
    # A figure of timm:resnet18 must rebuild when a timm release moves its default tag.
    import timm

    from repsim.figures.context import FigureContext, ModelRef

    tag = f"timm:resnet18.{timm.models.get_pretrained_cfg('resnet18').tag}"
    ctx = FigureContext(tmp_path)
    prints = [ctx.fingerprint({"type": "model", "ref": asdict(ModelRef(m))})["ref"]
              for m in ("timm:resnet18", tag, "vit_imagenet")]
    assert prints[0] == tag and prints[2] == "timm"  # a registry name pins its tag itself


def test_the_dynamics_caption_does_not_count_the_final_model_as_settling():
    """The snapshot at the final epoch is the final model (CKA 1): a layer that reaches the
    level only there has not settled during training."""
    from repsim.figures.report import caption

    run = {"label": "R", "final_epoch": 100, "final_test_accuracy": 92.85,
           "epochs": [0, 10, 100], "layers": ["a", "b"],
           "cka": {"a": [0.5, 0.95, 1.0], "b": [0.2, 0.6, 1.0]},
           "settled_epoch": {"a": 10, "b": 100}}
    assert caption("dynamics", {"settle": 0.9, "models": [run]}, {}) == (
        "R (final: epoch 100, 92.85 %): CKA to the final model at epoch 0 0.20-0.50; at or "
        "above 0.90 from epoch 10 (a); not before the final model (epoch 100): b.")
    run.update(test_accuracy=[10.0, 60.0, 92.85], train_accuracy=[None, 50.0, 90.0])
    fig = draw.dynamics([run], "t", 0.9)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["a (from 10)", "b (final model only)"]


def test_the_dynamics_caption_survives_a_layer_without_cka_at_the_first_epoch():
    """A zero-variance layer at epoch 0 has no CKA (null): the whole caption vanished (min
    over a None); the range is of the layers that have one."""
    from repsim.figures.report import caption

    run = {"label": "R", "final_epoch": 100, "epochs": [0, 100], "layers": ["a", "b"],
           "cka": {"a": [None, 1.0], "b": [0.2, 1.0]}, "settled_epoch": {"a": 100, "b": 100}}
    assert caption("dynamics", {"settle": 0.9, "models": [run]}, {}) == (
        "R (final: epoch 100): CKA to the final model at epoch 0 0.20-0.20; not before the "
        "final model (epoch 100): a..b.")


def test_the_grid_caption_states_the_permutation_null_of_each_model_pair():
    """A grid with a null dots the cells not above it; the caption says how many there are
    (a grid with no dot otherwise reads as if no null had been computed)."""
    from repsim.figures.report import caption

    def panel(a, b, p):
        return {"row_model": a, "col_model": b, "layers_a": ["x0", "x1"][:len(p)],
                "layers_b": ["y0", "y1"][:len(p[0])], "matrix": [[0.9] * len(p[0])] * len(p),
                "se": None, "p_value": p}

    p = [[0.005, 0.2]]
    data = {"panels": [panel("A", "A", [[0.005]]), panel("A", "B", p),
                       panel("B", "A", [list(r) for r in zip(*p)]), panel("B", "B", p)]}
    lines = caption("cka_grid", data, {}).splitlines()
    assert lines[-1] == "Permutation null: 1 of 2 cells of A vs B not above it (p > 0.05, dotted)."
    p = [[0.005, 0.01]]
    data["panels"][1:3] = [panel("A", "B", p), panel("B", "A", [list(r) for r in zip(*p)])]
    assert caption("cka_grid", data, {}).splitlines()[-1] == (
        "Permutation null: every cell of A vs B above it (p <= 0.010).")


def test_the_probes_caption_names_the_layer_whose_components_it_deletes():
    from repsim.figures.report import caption

    entry = {"label": "R", "layers": ["stem", "layer4"], "ks": [0, 1, 5],
             "accuracy": [[0.31, 0.28, 0.27], [0.926, 0.924, 0.91]],
             "self_cka": [[1.0, 0.42, 0.04], [1.0, 0.92, 0.6]],
             "match_layers": ["embed", "blocks.5"],
             "match_cka": [[0.76, 0.42, 0.01], [0.447, 0.301, 0.079]]}
    lines = caption("probes", {"pixel_accuracy": 0.302, "entries": [entry]}, {}).splitlines()
    assert lines[1] == (
        "R: probe accuracy 0.31 in stem to 0.93 in layer4, highest 0.93 in layer4; layer4 "
        "without its top 1 principal component(s): probe 0.92, CKA with itself 0.92, CKA "
        "with its best match blocks.5 0.45 -> 0.30.")


def test_the_locality_caption_names_the_spec_models_not_vit_and_resnet():
    """The place-by-place line called the two sides "ViT" and "ResNet" whatever the spec's
    models and labels; it names the labels the figure drew (the data records them)."""
    from repsim.figures.report import caption

    data = {"layers": ["input", "blocks.0"], "labels": ["tiny ViT", "ConvNeXt"],
            "summary": {"own": [1.0, 0.5], "elsewhere": [0.1, 0.2], "peak_at_own": [1.0, 0.5]},
            "position_cka": {"layers_a": ["blocks.0"], "layers_b": ["stages.0"],
                             "matrix": [[0.7]]}}
    last = caption("locality", data, {}).splitlines()[-1]
    assert last == ("Place by place: tiny ViT blocks.0 best match ConvNeXt stages.0 at CKA "
                    "0.70-0.70."), last
