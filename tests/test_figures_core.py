"""`repsim figures` core (context, runner, report, draw): edge cases found in review round 30,
each with a fast offline test (no extraction)."""

import json
from pathlib import Path

import pytest
from torch import nn

from repsim.compare import ProbeSpec
from repsim.figures.context import FigureContext
from repsim.figures.runner import KINDS, build_all, figure_kind


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(text)
    return folder / f"{name}.toml"


def test_a_model_entry_listing_one_seed_is_compared_not_refused(tmp_path, monkeypatch):
    """`weights = ["s0.pt"]` (the first seed of a recipe, the others still training) in a
    cka_grid failed with "lists seeds, but this figure reads one model"; CKA kinds take seeds."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "s0.pt").write_bytes(b"weights")
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    result = {"matrix": [[0.5]], "layers_a": ["x"], "layers_b": ["x"], "se": [[0.1]],
              "model_a": "a", "model_b": "b", "n": 8}
    monkeypatch.setattr(FigureContext, "_load_cka", lambda self, d: dict(result))
    ctx = FigureContext(tmp_path / "f")
    ctx.deps = {}
    ref = ctx.model_ref({"model": "vit_cifar", "weights": ["s0.pt"]})
    res = ctx.cka(ref, ref, ProbeSpec(), ctx.cka_settings({}))
    assert res["matrix"] == [[0.5]] and res["se"] == [[0.1]]


def test_a_cka_batch_size_of_0_is_not_taken_as_the_default(tmp_path):
    """`[cka] batch_size = 0` was silently replaced by 1,024 (a falsy value), while -4 was
    refused; it goes to the engine as given, which refuses it in one line."""
    ctx = FigureContext(tmp_path)
    assert ctx.cka_settings({"cka": {"batch_size": 0}})["batch_size"] == 0
    assert ctx.cka_settings({})["batch_size"] == 1024


def test_a_registered_models_weights_file_is_fingerprinted_with_its_architecture(
        tmp_path, monkeypatch):
    """README: edit MyNet and what was made of it is made again. A figure of a registered
    model read from a weights file kept its key (the file's sha256) when a parameter-free
    layer was added, so the old figure was `cached`."""
    import repsim
    from repsim import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (tmp_path / "w.pt").write_bytes(b"same file")

    def fingerprint(extra: list) -> dict:
        registry._REGISTRY.pop("arch_file_fig", None)
        repsim.register_model("arch_file_fig", input_size=4)(lambda num_classes: nn.Sequential(
            nn.Flatten(), nn.Linear(48, 5), *extra, nn.Linear(5, num_classes)))
        return FigureContext(tmp_path).fingerprint(
            {"type": "model", "ref": {"model": "arch_file_fig", "weights": str(tmp_path / "w.pt")}})

    assert fingerprint([]) != fingerprint([nn.ReLU()]) and fingerprint([]) == fingerprint([])
    builtin = FigureContext(tmp_path).fingerprint(
        {"type": "model", "ref": {"model": "vit_cifar", "weights": str(tmp_path / "w.pt")}})
    assert len(builtin["ref"]) == 64  # built-ins keep their keys: the file's sha256


def test_the_report_links_a_figure_whose_name_has_spaces(tmp_path, monkeypatch):
    """`analyses/my grid (v2).toml` wrote `![..](my grid (v2).png)` into REPORT.md, which
    Markdown does not read as an image; the link is percent-encoded."""
    def build_png(spec, ctx):
        """Writes a stand-in picture."""
        return [ctx.write_text(".png", "png\n")]

    monkeypatch.setitem(KINDS, "png", None)  # restored after the test
    figure_kind("png")(build_png)
    write(tmp_path / "a", "my grid (v2)", 'kind = "png"\n')
    build_all(tmp_path / "a", tmp_path / "f", progress=False)
    report = (tmp_path / "f" / "REPORT.md").read_text()
    assert "![my grid (v2)](my%20grid%20%28v2%29.png)" in report, report


LONG = [f"encoder.layer.{i}.attention.output.dense.very_long_layer_name" for i in range(3)]


def _axes_inches(fig) -> list[tuple[float, float]]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied": panels collapsed
        fig.canvas.draw()
    w, h = fig.get_size_inches()
    return [(a.get_position().width * w, a.get_position().height * h) for a in fig.axes]


@pytest.mark.parametrize("draw_it", ["heatmap", "grid", "best_match"])
def test_long_layer_names_leave_every_panel_room(draw_it):
    """A model with 60-character layer names and one layer on the other side: the heatmap's
    axes collapsed to nothing (matplotlib warned, the PNG showed only labels); the grid's and
    best-match panels shrank to a sliver. Figures grow by their labels' length."""
    from repsim.figures import draw

    res = {"matrix": [[0.5, None, -0.2]], "layers_a": ["only"], "layers_b": LONG,
           "model_a": "A", "model_b": "B", "kernel": "linear", "estimator": "minibatch", "n": 8,
           "batch_size": 8}
    if draw_it == "heatmap":
        fig, axes = draw.cka_heatmap(res), 1
    elif draw_it == "grid":
        fig = draw.cka_grid(["A", "B"], {(i, j): {"matrix": [[0.5] * 3] * 3, "layers_a": LONG,
                                                  "layers_b": LONG}
                                         for i in range(2) for j in range(2)}, "t")
        axes = 4
    else:
        match = draw.best_matches({"matrix": [[1.0, 0, 0]] * 3})
        fig = draw.best_match([{"label_a": "A", "label_b": "B", "layers_a": LONG,
                                "layers_b": LONG, **match}], "t")
        axes = 2
    sizes = _axes_inches(fig)[:axes]
    assert all(w >= 1.0 and h >= 1.0 for w, h in sizes), sizes


def test_a_kinds_numpy_data_is_recorded_and_the_other_figures_still_built(tmp_path,
                                                                          monkeypatch):
    """A registered kind putting a CKA matrix (ndarray) or a numpy scalar in ctx.data stopped
    the whole run with "Object of type ndarray is not JSON serializable", after its files were
    written; numpy values are recorded as numbers and lists, other non-JSON data fails that
    figure in one line."""
    import numpy as np

    def build_np(spec, ctx):
        """numpy data, or (title "bad") a set."""
        ctx.data.update(m=np.array([[1.0, np.nan]]), f=np.float32(0.5), i=np.int64(2))
        if spec.get("title") == "bad":
            ctx.data["s"] = {1}
        return [ctx.write_text(".txt", "built\n")]

    monkeypatch.setitem(KINDS, "np", None)  # restored after the test
    figure_kind("np")(build_np)
    write(tmp_path / "a", "a", 'kind = "np"\n')
    write(tmp_path / "a", "b", 'kind = "np"\ntitle = "bad"\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["a"]
    assert json.loads((tmp_path / "f" / "a.json").read_text())["data"] == {
        "m": [[1.0, None]], "f": 0.5, "i": 2}
    (failed,) = res["failed"]
    assert "not JSON" in failed["reason"] and not (tmp_path / "f" / "b.json").exists()


def test_a_data_scale_spec_with_both_base_and_bases_is_refused(tmp_path, monkeypatch):
    """`base = "vit_cifar"` next to `bases = ["resnet18_cifar"]`: base was ignored without a
    word (the figure showed only the bases)."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    write(tmp_path / "a", "s", 'kind = "data_scale"\nbase = "vit_cifar"\n'
          'bases = ["resnet18_cifar"]\n')
    (failed,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["failed"]
    assert "takes base or bases, not both" in failed["reason"], failed


def test_only_builds_its_specs_while_another_spec_is_being_written(tmp_path):
    """`--only grid` was refused because analyses/wip.toml (not asked for) had a typo; only
    the specs asked for are read, and a full run still refuses the broken one."""
    from repsim.errors import UserError
    from repsim.figures.runner import load_specs

    write(tmp_path / "a", "grid", 'kind = "cka_grid"\nmodels = ["vit_cifar"]\n')
    write(tmp_path / "a", "wip", 'kind = "cka_grid"\nmodles = ["vit_cifar"]\n')
    write(tmp_path / "a", "half", 'kind = "cka_grid\n')
    assert list(load_specs(tmp_path / "a", ["grid"])) == ["grid"]
    with pytest.raises(UserError, match="wip.toml: keys \\['modles'\\] are unknown"):
        load_specs(tmp_path / "a", ["grid", "wip"])
    with pytest.raises(UserError, match="half.toml: not valid TOML"):
        load_specs(tmp_path / "a")


def _kept_snap(tmp_path: Path, monkeypatch):
    """A figure built (as on a GPU machine) whose inputs are then gone: ``run()`` keeps it;
    ``here["stop"] = True`` makes its next check stop as Ctrl-C does. Returns (run, here)."""
    from repsim.compare import InputUnavailable

    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [{"name": "m"}]}))
    here = {"inputs": True, "stop": False}

    def build_snap(spec, ctx):
        ctx.manifest()  # an input: changed below, so the figure is looked at again
        if here["stop"]:
            raise KeyboardInterrupt
        if not here["inputs"]:
            raise InputUnavailable("no snapshots here")
        return [ctx.write_text(".txt", "built\n")]

    monkeypatch.setitem(KINDS, "snap", None)  # restored after the test
    figure_kind("snap")(build_snap)
    write(tmp_path / "a", "s", 'kind = "snap"\n')
    run = lambda: build_all(tmp_path / "a", tmp_path / "f", progress=False)  # noqa: E731
    run()
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": []}))
    here["inputs"] = False
    return run, here


def test_a_kept_figure_survives_a_run_stopped_during_its_check(tmp_path, monkeypatch):
    """Ctrl-C while a kept figure (built on a GPU machine) was being looked at deleted its
    record for good: every later run skipped it and the report dropped it. The record stays,
    vouching for nothing until the figure is kept or built again."""
    run, here = _kept_snap(tmp_path, monkeypatch)
    here["stop"] = True
    with pytest.raises(KeyboardInterrupt):
        run()
    here["stop"] = False
    res = run()
    assert [e["name"] for e in res["kept"]] == ["s"], res
    assert json.loads((tmp_path / "f" / "s.json").read_text())["cache_key"]


def test_a_manifest_accuracy_that_is_no_number_fails_its_table_by_name(tmp_path, monkeypatch):
    """A hand-edited "test_accuracy": "77.5 %" failed the table with "could not convert
    string to float: '77.5 %'", naming neither the manifest nor the checkpoint."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [
        {"name": "vit_cifar", "model": "vit_cifar", "dataset": "cifar10",
         "test_accuracy": "77.5 %"}]}))
    write(tmp_path / "a", "acc", 'kind = "accuracy_table"\n[[rows]]\ndataset = "cifar10"\n'
          'model = "vit_cifar"\nstudy = 81.36\n')
    (failed,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["failed"]
    assert ("checkpoint 'vit_cifar' has test_accuracy='77.5 %', not a number" in failed["reason"]
            and "manifest.json" in failed["reason"]), failed


def test_a_dynamics_panel_without_accuracies_draws_without_a_warning():
    """Snapshots saved without evaluation (accuracy None at every epoch): the accuracy panel's
    empty legend made matplotlib warn "No artists with labels found" on every build."""
    import warnings

    from repsim.figures import draw

    m = {"label": "V", "epochs": [0, 1], "layers": ["x"], "cka": {"x": [0.5, 1.0]},
         "settled_epoch": {"x": 1}, "final_epoch": 1, "test_accuracy": [None, None],
         "train_accuracy": [None, None], "final_test_accuracy": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draw.dynamics([m], "t", 0.9).canvas.draw()


@pytest.fixture
def probe_snap(tmp_path, monkeypatch):
    """A kind "snap" standing for a figure built on a GPU machine: it reads the probe images
    and the manifest (of a checkpoint folder of its own). Calling the fixture's value makes
    its snapshots leave, and changes the manifest so that the figure is looked at again."""
    from repsim.compare import InputUnavailable

    manifest = tmp_path / "ckpt" / "manifest.json"
    manifest.parent.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(manifest.parent))
    manifest.write_text(json.dumps({"checkpoints": [{"name": "m"}]}))
    here = {"inputs": True}

    def build_snap(spec, ctx):
        ctx.images(ctx.probe_spec(spec))
        ctx.manifest()
        if not here["inputs"]:
            raise InputUnavailable("no snapshots here")
        return [ctx.write_text(".txt", "built\n")]

    monkeypatch.setitem(KINDS, "snap", None)  # restored after the test
    figure_kind("snap")(build_snap)

    def leave():
        here["inputs"] = False
        manifest.write_text(json.dumps({"checkpoints": []}))
    return leave


def test_a_kept_figure_of_other_probe_settings_says_so(tmp_path, probe_snap):
    """`repsim figures --n 4` kept a figure built (on a GPU machine) from 8 images and listed
    it like the others, in the summary and REPORT.md: its numbers passed for the n asked.
    It is still kept (it cannot be rebuilt here), and both say which settings it is of."""
    from repsim.figures.runner import summary_text

    write(tmp_path / "a", "s", 'kind = "snap"\n[probe]\ndataset = "cifar10-probe"\nn = 8\n')
    run = lambda **o: build_all(tmp_path / "a", tmp_path / "f", overrides=o,  # noqa: E731
                                progress=False)
    run()
    probe_snap()
    res = run(n=4, seed=1)
    (kept,) = res["kept"]
    note = "built with n = 8, seed = 0; this run asks n = 4, seed = 1"
    assert kept["settings"] == note
    line = f"kept    s: no snapshots here; not of this run's probe settings: {note}"
    assert line in summary_text(res)
    report = (tmp_path / "f" / "REPORT.md").read_text()
    assert f"Not of this run's probe settings: {note}." in report
    (kept,) = run()["kept"]  # the settings it was built with: nothing to say
    assert "settings" not in kept
    assert "this run asks" not in (tmp_path / "f" / "REPORT.md").read_text()


def test_a_kept_figure_that_reads_no_probe_is_of_any_probe_settings(tmp_path, monkeypatch):
    """The note on a kept figure of other probe settings is for figures that read a probe:
    one of the manifest alone is the same whatever --n asks."""
    from repsim.compare import InputUnavailable

    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [{"name": "m"}]}))

    def build_runs(spec, ctx):
        """Reads the manifest; the runs it names then leave."""
        if not ctx.manifest()["checkpoints"]:
            raise InputUnavailable("no runs here")
        return [ctx.write_text(".txt", "built\n")]

    monkeypatch.setitem(KINDS, "runs", None)  # restored after the test
    figure_kind("runs")(build_runs)
    write(tmp_path / "a", "r", 'kind = "runs"\n')
    build_all(tmp_path / "a", tmp_path / "f", progress=False)
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": []}))
    (kept,) = build_all(tmp_path / "a", tmp_path / "f", overrides={"n": 4},
                        progress=False)["kept"]
    assert "settings" not in kept


def test_a_registered_models_preprocessing_is_in_its_figures_fingerprint(tmp_path, monkeypatch):
    """Fixing a registered model's mean/std (or input size) makes new stores, but its figures
    kept their key (the same architecture and file), so `repsim figures` said `cached` and
    showed the numbers of the old preprocessing."""
    import repsim
    from repsim import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (tmp_path / "w.pt").write_bytes(b"same file")

    def fingerprint(weights: str, **prep) -> dict:
        registry._REGISTRY.pop("prep_fig", None)
        repsim.register_model("prep_fig", input_size=4, **prep)(
            lambda num_classes: nn.Sequential(nn.Flatten(), nn.Linear(48, num_classes)))
        return FigureContext(tmp_path).fingerprint(
            {"type": "model", "ref": {"model": "prep_fig", "weights": weights}})

    for weights in (str(tmp_path / "w.pt"), "random"):
        plain = fingerprint(weights)
        assert plain == fingerprint(weights)
        assert plain != fingerprint(weights, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        assert plain != fingerprint(weights, interpolation="bicubic")


def test_an_unknown_override_is_refused_in_one_line_before_any_figure(tmp_path):
    """build_all(overrides={"num": 8}) from a notebook stopped the run with "AttributeError:
    'ProbeSpec' object has no attribute 'num'"; it is refused by name, with the valid keys."""
    from repsim.errors import UserError

    write(tmp_path / "a", "acc", 'kind = "accuracy_table"\n[[rows]]\ndataset = "cifar10"\n'
          'model = "vit_cifar"\nstudy = 81.36\n')
    with pytest.raises(UserError, match=r"overrides keys \['num'\] are unknown; valid: dataset, "
                                        r"split, n, seed, .*data_root"):
        build_all(tmp_path / "a", tmp_path / "f", overrides={"num": 8}, progress=False)
    assert not (tmp_path / "f").exists()


def test_a_figure_rebuilt_with_only_says_the_report_was_not_updated(tmp_path, monkeypatch):
    """`repsim figures --only s` after a spec change rebuilt s, but REPORT.md (written by full
    runs only) kept the old caption beside the new picture without a word; the summary says
    that the report is of the last full run and how to update it."""
    from repsim.figures.runner import summary_text

    monkeypatch.setitem(KINDS, "note", None)  # restored after the test
    figure_kind("note")(lambda spec, ctx: [ctx.write_text(".txt", f"{spec['title']}\n")])
    write(tmp_path / "a", "s", 'kind = "note"\ntitle = "one"\n')
    run = lambda **kw: build_all(tmp_path / "a", tmp_path / "f", progress=False, **kw)  # noqa
    note = "REPORT.md not updated: it is of the last full run; build every spec to update it"
    assert note not in summary_text(run())
    assert note not in summary_text(run(only=["s"]))  # cached: the report is still of it
    write(tmp_path / "a", "s", 'kind = "note"\ntitle = "two"\n')
    assert note in summary_text(run(only=["s"]))


def test_a_fix_to_what_stores_hold_rebuilds_the_figures_made_from_them(tmp_path, monkeypatch):
    """Raising repsim.extraction.CONTENT_VERSION (a fix that changes what a store holds for
    the same inputs) makes the stores again, but the figures drawn from the old ones kept
    their key and stayed `cached` with the old numbers."""
    from repsim import extraction

    calls = []
    monkeypatch.setitem(KINDS, "note", None)  # restored after the test
    figure_kind("note")(lambda spec, ctx: calls.append(1) or [ctx.write_text(".txt", "x\n")])
    write(tmp_path / "a", "s", 'kind = "note"\n')
    run = lambda: build_all(tmp_path / "a", tmp_path / "f", progress=False)  # noqa: E731
    assert [e["name"] for e in run()["built"]] == ["s"]
    assert [e["name"] for e in run()["cached"]] == ["s"]
    monkeypatch.setattr(extraction, "CONTENT_VERSION", extraction.CONTENT_VERSION + 1)
    assert [e["name"] for e in run()["built"]] == ["s"] and len(calls) == 2


def test_a_fix_to_ckas_numbers_rebuilds_the_figures(tmp_path, monkeypatch):
    """Raising the CKA engine's content version (sketch.CONTENT_VERSION, a fix that changes
    CKA numbers) remade the cached results, but the figures drawn from them stayed `cached`."""
    from repsim import sketch

    monkeypatch.setitem(KINDS, "note", None)  # restored after the test
    figure_kind("note")(lambda spec, ctx: [ctx.write_text(".txt", "x\n")])
    write(tmp_path / "a", "s", 'kind = "note"\n')
    run = lambda: build_all(tmp_path / "a", tmp_path / "f", progress=False)  # noqa: E731
    assert [e["name"] for e in run()["built"]] == ["s"]
    assert [e["name"] for e in run()["cached"]] == ["s"]
    monkeypatch.setattr(sketch, "CONTENT_VERSION", sketch.CONTENT_VERSION + 1)
    assert [e["name"] for e in run()["built"]] == ["s"]


def test_a_kind_registered_with_one_field_without_its_comma_reads_that_field(tmp_path,
                                                                            monkeypatch):
    """`@figure_kind("mine", fields=("model"))` (a string: the tuple's comma forgotten) made
    the kind's keys m, o, d, e, l, so every spec naming `model` was refused as unknown."""
    monkeypatch.setitem(KINDS, "mine", None)  # restored after the test
    figure_kind("mine", fields=("model"), required=("model"))(
        lambda spec, ctx: [ctx.write_text(".txt", spec["model"] + "\n")])
    assert KINDS["mine"].fields == ("model",) and KINDS["mine"].required == ("model",)
    write(tmp_path / "a", "s", 'kind = "mine"\nmodel = "vit_cifar"\n')
    (built,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["built"]
    assert (tmp_path / "f" / "s.txt").read_text() == "vit_cifar\n"


def test_a_seed_over_the_whole_split_changes_no_figure_key(tmp_path):
    """`repsim figures --seed 1` rebuilt every figure reading the whole split (n = all): the
    seed chooses a subset, and with every image taken the images are the same ones; a seed
    still counts where the spec or the overrides take a subset."""
    whole = {"probe": {"dataset": "cifar10-probe"}}
    subset = {"probe": {"dataset": "cifar10-probe", "n": 100}}
    ctx = FigureContext(tmp_path, overrides={"seed": 1})
    assert ctx.key_overrides(whole) == {}
    assert ctx.probe_spec(whole).seed == 0
    assert ctx.key_overrides(subset) == {"seed": 1}
    assert FigureContext(tmp_path, overrides={"seed": 1, "n": 50}).key_overrides(whole) == \
        {"seed": 1, "n": 50}


def test_a_bug_in_one_kind_fails_that_figure_and_builds_the_others(tmp_path, monkeypatch):
    """A kind raising anything but UserError/ValueError/InputUnavailable (a bug in a user's
    kind: TypeError, KeyError) stopped the whole run with a traceback, though build_all
    promises that one figure's problem never stops the others; it fails that figure, with
    the exception's type, message and traceback in its entry."""
    monkeypatch.setitem(KINDS, "buggy", None)  # restored after the test
    monkeypatch.setitem(KINDS, "note", None)
    figure_kind("buggy")(lambda spec, ctx: {}["missing"])
    figure_kind("note")(lambda spec, ctx: [ctx.write_text(".txt", "x\n")])
    write(tmp_path / "a", "a_bug", 'kind = "buggy"\n')
    write(tmp_path / "a", "b_fine", 'kind = "note"\n')
    out = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in out["built"]] == ["b_fine"]
    (failed,) = out["failed"]
    assert failed["name"] == "a_bug" and failed["reason"].startswith("KeyError: 'missing'")
    assert "Traceback" in failed["traceback"]


def _stale_folder(tmp_path, monkeypatch, listed: bytes, here: bytes) -> Path:
    """A checkpoint folder whose manifest lists ``vit_cifar.pt`` by the sha256 of ``listed``
    while the file holds ``here`` (a run killed between the two writes, or a hand copy)."""
    import hashlib

    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    (ck / "vit_cifar.pt").write_bytes(here)
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [
        {"name": "vit_cifar", "file": "vit_cifar.pt", "model": "vit_cifar",
         "dataset": "cifar10", "train_fraction": 1.0, "epochs": 59, "epochs_planned": 70,
         "test_accuracy": 77.5, "sha256": hashlib.sha256(listed).hexdigest()}]}))
    write(tmp_path / "a", "acc", 'kind = "accuracy_table"\n[[rows]]\ndataset = "cifar10"\n'
          'model = "vit_cifar"\nstudy = 81.36\n')
    return ck


def test_an_accuracy_row_whose_entry_lists_other_bytes_than_its_file_is_marked(
        tmp_path, monkeypatch):
    """A manifest entry of another version of the checkpoint file (a run killed between
    writing the two) put that version's accuracy in the table as the file's, unsaid."""
    _stale_folder(tmp_path, monkeypatch, b"the old run", b"the new run")
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["acc"], res
    (row,) = json.loads((tmp_path / "f" / "acc.json").read_text())["data"]["rows"]
    assert "lists vit_cifar.pt with sha256" in row["note"], row
    md = (tmp_path / "f" / "acc.md").read_text()
    assert "| note |" in md and "another version of the file" in md


def test_an_accuracy_table_that_agrees_with_its_files_has_no_note(tmp_path, monkeypatch):
    _stale_folder(tmp_path, monkeypatch, b"the run", b"the run")
    build_all(tmp_path / "a", tmp_path / "f", progress=False)
    (row,) = json.loads((tmp_path / "f" / "acc.json").read_text())["data"]["rows"]
    assert "note" not in row and "note" not in (tmp_path / "f" / "acc.md").read_text()
    assert row["ours (%)"] == 77.5


def test_a_checkpoint_replaced_under_its_entry_rebuilds_the_cached_table(tmp_path,
                                                                         monkeypatch):
    """The table's key held the manifest alone: a checkpoint file replaced by hand under its
    entry left the cached table vouching for the entry's accuracy as the file's."""
    ck = _stale_folder(tmp_path, monkeypatch, b"the run", b"the run")
    run = lambda: build_all(tmp_path / "a", tmp_path / "f", progress=False)  # noqa: E731
    run()
    assert [e["name"] for e in run()["cached"]] == ["acc"]
    (ck / "vit_cifar.pt").write_bytes(b"another run")
    assert [e["name"] for e in run()["built"]] == ["acc"]
    (row,) = json.loads((tmp_path / "f" / "acc.json").read_text())["data"]["rows"]
    assert "another version of the file" in row["note"]


def test_a_fraction_checkpoint_whose_entry_lists_other_bytes_has_no_accuracy(tmp_path,
                                                                            monkeypatch):
    """data_scale's fraction checkpoints took their entry's accuracy whatever file it was of."""
    ck = _stale_folder(tmp_path, monkeypatch, b"the run", b"the run")
    data = json.loads((ck / "manifest.json").read_text())
    data["checkpoints"].append({**data["checkpoints"][0], "name": "vit_cifar_frac0.5",
                                "file": "vit_cifar_frac0.5.pt", "train_fraction": 0.5})
    (ck / "manifest.json").write_text(json.dumps(data))
    (ck / "vit_cifar_frac0.5.pt").write_bytes(b"a newer fraction run")
    ctx = FigureContext(tmp_path / "f", progress=False)
    (cp,) = ctx.checkpoints("vit_cifar", "vit_cifar_frac*")
    assert cp["train_fraction"] == 0.5 and cp["entry"] is None, cp
    assert "another version of the file" in cp["stale"]


def test_the_prefix_figure_names_no_class_token_in_a_vit_without_one(tmp_path, monkeypatch):
    """A ViT of register tokens only (timm class_token=False) had its token 0 labelled
    "0 (cls)" in both panels."""
    import timm

    import repsim
    from repsim import registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(tmp_path / "ckpt"))
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    for name, cls in (("regs_only_fig", False), ("cls_regs_fig", True)):
        repsim.register_model(name, family="vit", input_size=8)(
            lambda num_classes, cls=cls: timm.models.vision_transformer.VisionTransformer(
                img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                num_classes=num_classes, class_token=cls, reg_tokens=2,
                global_pool="token" if cls else "avg"))
    write(tmp_path / "a", "prefix", 'kind = "prefix_tokens"\nmodels = [{model = "regs_only_fig", '
          'weights = "random"}, {model = "cls_regs_fig", weights = "random"}]\n'
          'layer = "blocks.0"\n[probe]\nn = 4\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["prefix"], res
    regs, cls = json.loads((tmp_path / "f" / "prefix.json").read_text())["data"]["models"]
    assert regs["tokens"] == ["0", "1"] and cls["tokens"] == ["0 (cls)", "1", "2"]


def test_a_kept_figure_says_when_the_probe_images_it_read_are_not_those_here(
        tmp_path, monkeypatch, probe_snap):
    """A kept build says when the weights it read are not the files here, but not when the
    probe images are not (another copy of the data set, a re-encoded test split): its numbers
    passed for those of the images here."""
    from dataclasses import replace

    import repsim.data
    from repsim.figures.runner import summary_text

    write(tmp_path / "a", "s", 'kind = "snap"\n[probe]\ndataset = "cifar10-probe"\nn = 4\n')
    run = lambda: build_all(tmp_path / "a", tmp_path / "f", progress=False)  # noqa: E731
    run()
    probe_snap()
    (kept,) = run()["kept"]
    assert not kept.get("images_changed"), kept  # the same images: nothing to say
    load = repsim.data.load_probe_set
    monkeypatch.setattr(repsim.data, "load_probe_set", lambda *a, **k: (
        lambda ps: replace(ps, images=255 - ps.images))(load(*a, **k)))
    res = run()
    (kept,) = res["kept"]
    assert len(kept["images_changed"]) == 1 and "cifar10-probe" in kept["images_changed"][0]
    assert ("; its numbers are of other probe images than these here: "
            + kept["images_changed"][0]) in summary_text(res)
    report = (tmp_path / "f" / "REPORT.md").read_text()
    assert f"other probe images than these here now: {kept['images_changed'][0]}" in report


def test_the_prefix_figure_gives_no_accuracy_from_an_entry_of_other_bytes(tmp_path,
                                                                          monkeypatch):
    """The heading's accuracy came from the manifest entry of the weights' name whatever
    bytes the file held (the entry of a run killed before rewriting it)."""
    import hashlib

    import timm
    import torch

    import repsim
    from repsim import registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    ck = tmp_path / "ckpt"
    ck.mkdir()
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    build = repsim.register_model("cls_regs_acc", family="vit", input_size=8)(
        lambda num_classes: timm.models.vision_transformer.VisionTransformer(
            img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
            num_classes=num_classes, reg_tokens=2))
    torch.save(build(10).state_dict(), ck / "w.pt")
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": [
        {"name": "w", "file": "w.pt", "model": "cls_regs_acc", "test_accuracy": 90.0,
         "sha256": hashlib.sha256(b"the run before").hexdigest()}]}))
    write(tmp_path / "a", "prefix", 'kind = "prefix_tokens"\nmodels = [{model = "cls_regs_acc", '
          'weights = "w.pt"}]\nlayer = "blocks.0"\n[probe]\nn = 4\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["prefix"], res
    (entry,) = json.loads((tmp_path / "f" / "prefix.json").read_text())["data"]["models"]
    assert entry["test_accuracy"] is None


def test_two_runs_on_one_folder_build_each_figure_once_not_interleaved(tmp_path, monkeypatch):
    """Two `repsim figures` on one --out at once both rebuilt every figure, their files
    interleaved: with other settings (`--n 500` beside a plain run) a record could vouch for
    a picture of the other run's. The second run waits for the first, says so, and then
    finds its figures current."""
    import threading

    calls, started, go, second = [], threading.Event(), threading.Event(), threading.Event()

    def build(spec, ctx):
        """A slow build: the second run starts while it runs."""
        calls.append(1)
        (second if len(calls) > 1 else started).set()
        assert go.wait(10)
        return [ctx.write_text(".txt", "x\n")]

    monkeypatch.setitem(KINDS, "slow", None)  # restored after the test
    figure_kind("slow")(build)
    write(tmp_path / "a", "s", 'kind = "slow"\n')
    said, out = [], {}

    def run(key, log=None):
        out[key] = build_all(tmp_path / "a", tmp_path / "f", progress=False, log=log)

    first = threading.Thread(target=run, args=(1,))
    first.start()
    assert started.wait(10)
    later = threading.Thread(target=run, args=(2, lambda m: said.append(m) or second.set()))
    later.start()
    assert second.wait(10)  # it waits (and says so), or builds too
    go.set()
    first.join(10)
    later.join(10)
    assert len(calls) == 1 and [e["name"] for e in out[2]["cached"]] == ["s"], (calls, out)
    assert "waiting for another repsim figures" in said[0], said


def test_a_transposed_cka_result_names_its_row_models_store_as_input_a(tmp_path, monkeypatch):
    """ctx.cka(B, A) after the pair was computed as (A, B) swapped model_a/_b, the layers and
    every cell, but not `inputs`: inputs["a"] (store, weights, sha256) was the column model's,
    so a kind reading the rows' provenance got the other model's."""
    def load(self, d):
        """A result of the pair in the order asked for first, each side naming its model."""
        return {"matrix": [[0.1, 0.2]], "layers_a": ["x"], "layers_b": ["y", "z"],
                "model_a": d["a"]["model"], "model_b": d["b"]["model"],
                "inputs": {"a": {"model": d["a"]["model"]}, "b": {"model": d["b"]["model"]}}}

    monkeypatch.setattr(FigureContext, "fingerprint", lambda self, d: None)
    monkeypatch.setattr(FigureContext, "_load_cka", load)
    ctx = FigureContext(tmp_path)
    a, b = ctx.model_ref("resnet18_cifar"), ctx.model_ref("vit_cifar")
    for x, y in ((a, b), (b, a)):
        res = ctx.cka(x, y, ProbeSpec(), ctx.cka_settings({}))
        assert res["model_a"] == res["inputs"]["a"]["model"] == x.model, res
        assert res["model_b"] == res["inputs"]["b"]["model"] == y.model, res


def test_a_data_scale_base_without_fractions_is_no_input_of_the_figure(tmp_path, monkeypatch):
    """bases = [vit_cifar, resnet18_cifar] with fraction checkpoints of the ResNet only
    extracted the ViT's store too and recorded its weights: the figure (no ViT panel) was
    rebuilt when vit_cifar.pt changed, and kept, its report said its numbers were of another
    ViT. Only the bases drawn are read."""
    ck = tmp_path / "ckpt"
    ck.mkdir()
    for name in ("vit_cifar", "resnet18_cifar", "resnet18_cifar_frac0.5"):
        (ck / f"{name}.pt").write_bytes(name.encode())
    (ck / "manifest.json").write_text(json.dumps({"checkpoints": []}))
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(ck))
    stored = []
    monkeypatch.setattr(FigureContext, "_load_store",
                        lambda self, d: stored.append(d["ref"]["model"]))
    monkeypatch.setattr(FigureContext, "_load_cka", lambda self, d: {
        "matrix": [[0.9]], "layers_a": ["x"], "layers_b": ["x"], "se": [[0.01]], "n": 8})
    write(tmp_path / "a", "scale", 'kind = "data_scale"\nbases = ["vit_cifar", '
          '"resnet18_cifar"]\n')
    res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert [e["name"] for e in res["built"]] == ["scale"], res
    assert "vit_cifar" not in stored, stored
    deps = json.loads((tmp_path / "f" / "scale.json").read_text())["deps"]
    # its checkpoints lookup stays: ViT fractions arriving change the figure
    assert not [k for k in deps if '"vit_cifar"' in k and '"checkpoints"' not in k], list(deps)


def test_a_figure_that_cannot_be_written_fails_in_one_line_not_as_a_bug(tmp_path, monkeypatch):
    """An output folder the user may not write (another user's clone, a read-only mount) failed
    each figure as "PermissionError: ... (a bug? the traceback is in the summary)"; a file
    system's refusal is the user's to fix, so it is one line naming the file, as the CLI
    gives every other OSError."""
    def unwritable(spec, ctx):
        """What paths.atomic_write raises for a folder it may not write."""
        raise PermissionError(13, "Permission denied", str(ctx.path(".png")))

    monkeypatch.setitem(KINDS, "ro", None)  # restored after the test
    figure_kind("ro")(unwritable)
    write(tmp_path / "a", "s", 'kind = "ro"\n')
    (failed,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["failed"]
    assert "a bug?" not in failed["reason"] and "traceback" not in failed, failed
    assert failed["reason"].startswith("cannot use ") and "s.png: Permission denied; fix: " \
        in failed["reason"], failed


def test_a_rerun_does_not_rewrite_the_record_of_a_kept_figure(tmp_path, monkeypatch):
    """Every run rewrote a kept figure's record (figures/data_scale.json, dynamics.json) with
    the same bytes but a new mtime and file, though README says a rerun rewrites nothing."""
    run, _ = _kept_snap(tmp_path, monkeypatch)
    run()
    record = tmp_path / "f" / "s.json"
    before, text = record.stat(), record.read_text()
    (kept,) = run()["kept"]
    after = record.stat()
    assert kept["name"] == "s" and record.read_text() == text
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        ".figures.lock", "REPORT.md", "s.json", "s.txt"]


def test_a_kept_figure_in_a_folder_that_takes_no_file_is_kept_not_failed(tmp_path,
                                                                         monkeypatch):
    """In a read-only --out (another user's clone) a kept figure failed ("cannot use
    s.json: Permission denied"): keeping it wrote its record twice. Nothing to change:
    it is kept."""
    from repsim import paths

    run, _ = _kept_snap(tmp_path, monkeypatch)
    run()

    def refused(path, write):  # what a read-only folder does to every atomic write
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(paths, "atomic_write", refused)
    res = run()
    assert [e["name"] for e in res["kept"]] == ["s"] and not res["failed"], res


def _two_owners(monkeypatch):
    """Kind ``maps`` writes ``<name>.txt`` and ``<name>_maps.txt`` (as locality writes
    ``locality_maps.png``); kind ``one`` writes ``<name>.txt``."""
    def maps(spec, ctx):
        return [ctx.write_text(".txt", "maps\n"), ctx.write_text("_maps.txt", "maps of maps\n")]

    monkeypatch.setitem(KINDS, "maps", None)  # restored after the test
    monkeypatch.setitem(KINDS, "one", None)
    figure_kind("maps")(maps)
    figure_kind("one")(lambda spec, ctx: [ctx.write_text(".txt", "one\n")])


def test_a_spec_named_as_another_figures_file_is_refused_before_any_build(tmp_path,
                                                                          monkeypatch):
    """analyses/locality_maps.toml beside a built locality figure wrote locality_maps.png,
    which the locality figure owns: each then showed as cached, one with the other's
    picture. The run is refused in one line naming both specs and the file."""
    from repsim.errors import UserError

    _two_owners(monkeypatch)
    write(tmp_path / "a", "loc", 'kind = "maps"\n')
    build_all(tmp_path / "a", tmp_path / "f", progress=False)
    write(tmp_path / "a", "loc_maps", 'kind = "one"\n')
    with pytest.raises(UserError, match=r"loc_maps\.toml and .*loc\.toml would both write "
                       r".*loc_maps\.txt"):
        build_all(tmp_path / "a", tmp_path / "f", progress=False)
    assert (tmp_path / "f" / "loc_maps.txt").read_text() == "maps of maps\n"


def test_a_figure_writing_another_specs_file_fails_and_that_figure_is_rebuilt(tmp_path,
                                                                             monkeypatch):
    """Built at once for the first time, the two each said "built", one file holding the
    picture of the wrong one. The one writing the other's file fails, naming both, and the
    other is rebuilt: its file is its own, on this run and the next."""
    _two_owners(monkeypatch)
    write(tmp_path / "a", "loc", 'kind = "maps"\n')
    write(tmp_path / "a", "loc_maps", 'kind = "one"\n')
    for _ in range(2):
        res = build_all(tmp_path / "a", tmp_path / "f", progress=False)
        (failed,) = res["failed"]
        assert failed["name"] == "loc" and "loc_maps.txt" in failed["reason"]
        assert "loc_maps.toml" in failed["reason"] and not res["cached"], res
        assert (tmp_path / "f" / "loc_maps.txt").read_text() == "one\n"
        assert not (tmp_path / "f" / "loc.json").exists()


def test_a_figure_writing_report_md_fails_rather_than_losing_its_table(tmp_path, monkeypatch):
    """An accuracy table named analyses/REPORT.toml wrote REPORT.md, which the full run then
    replaced by its report: the table showed as cached, its file the report. It fails in
    one line naming the file."""
    monkeypatch.setitem(KINDS, "md", None)  # restored after the test
    figure_kind("md")(lambda spec, ctx: [ctx.write_text(".md", "| a |\n")])
    write(tmp_path / "a", "REPORT", 'kind = "md"\n')
    for _ in range(2):
        (failed,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["failed"]
        assert "REPORT.toml" in failed["reason"] and "REPORT.md" in failed["reason"], failed
