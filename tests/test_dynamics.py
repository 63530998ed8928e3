"""Training snapshots and the figures built on runs (issue 17, points 2 and 3): snapshot
epochs are scored and kept in float16 beside the checkpoint; snapshots of a model that stops
changing have CKA 1 to the final one; the data-scale figure builds from whichever fraction
checkpoints exist and names the missing ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from repsim import checkpoints, recipes, train
from repsim.errors import UserError
from repsim.figures.dynamics import settled_epoch, suggested_epochs
from repsim.figures.runner import build_all
from tests.test_figures import PROBE, write  # the figure tests' probe settings and spec writer

# ------------------------------------------------------------------ pure parts


def test_snapshot_epochs_take_lists_and_every_k():
    assert checkpoints.snapshot_epochs("0,1,5,every:10", 25) == (0, 1, 5, 10, 20, 25)
    assert checkpoints.snapshot_epochs(" every:3 ", 7) == (3, 6, 7)  # and the last epoch
    assert checkpoints.snapshot_epochs([2, 1, 2], 3) == (1, 2)
    assert checkpoints.snapshot_epochs(None, 3) == checkpoints.snapshot_epochs("", 3) == ()
    for bad in ("1,x", "every:0", "9", "-1", "1,,2"):
        with pytest.raises(UserError, match=r"snapshots='.*'.*every:K"):
            checkpoints.snapshot_epochs(bad, 8)


@pytest.mark.parametrize("bad", [10, 0, 2.5])
def test_snapshots_given_as_one_number_are_refused_in_one_line(bad):
    # From Python: 10 raised TypeError (not iterable), 0 quietly kept no snapshot.
    with pytest.raises(UserError, match=rf"snapshots={bad} is not a list of epochs"):
        checkpoints.snapshot_epochs(bad, 20)


def test_settled_epoch_is_where_the_curve_stays_above_the_level():
    epochs = [0, 1, 2, 5, 10]
    assert settled_epoch(epochs, [0.2, 0.95, 0.5, 0.91, 1.0], 0.9) == 5  # dipped at 2
    assert settled_epoch(epochs, [0.95, 0.96, 0.97, 0.99, 1.0], 0.9) == 0
    assert settled_epoch(epochs, [0.2, 0.95, 0.96, 0.97, 0.8], 0.9) is None
    assert settled_epoch(epochs, [0.2, 0.95, None, 0.97, 1.0], 0.9) == 5
    assert settled_epoch(epochs, [0.2, 0.95, float("nan"), 0.97, 1.0], 0.9) == 5
    assert suggested_epochs(80) == "0,1,2,5,10,20,50,80"
    assert suggested_epochs(3) == "0,1,2,3"


# ------------------------------------------------------------------ a run that stops changing


@pytest.fixture(scope="module")
def trained(cifar_root, tmp_path_factory):
    """A ViT trained 2 epochs (2 steps each) with snapshots 0, 1, 2 and eval_every=5, whose
    learning rate is zero after its first epoch: from epoch 1 on its weights do not change.
    Trained once for the module (tests copy what they change)."""
    real = recipes.lr_at
    root = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipes, "lr_at", lambda step, total, spe, recipe, lr:
                   real(step, total, spe, recipe, lr) if step < spe else 0.0)
        mp.setenv("REPSIM_CACHE", str(root / "cache"))
        mp.setenv("REPSIM_CHECKPOINTS", str(root / "ckpt"))
        res = train.train(train.TrainConfig(
            model="vit_cifar", data_root=str(cifar_root), epochs=2, batch_size=10, lr=1e-2,
            eval_every=5, snapshots="0,1,2", out=str(root / "ckpt" / "vit_cifar.pt"),
            run_dir=str(root / "run"), progress=False))
    return root, res


@pytest.fixture
def stopped_run(trained, tmp_path, monkeypatch):
    """``trained``'s checkpoints and run, copied: (checkpoint folder, summary, folder)."""
    root, res = trained
    for sub in ("ckpt", "run"):
        shutil.copytree(root / sub, tmp_path / sub)
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(tmp_path / "ckpt"))
    return tmp_path / "ckpt", res, tmp_path


def test_snapshot_epochs_are_scored_and_kept_in_float16_beside_the_checkpoint(stopped_run):
    ck, res, tmp_path = stopped_run
    assert res["snapshots"] == [0, 1, 2]
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # eval_every=5 evaluates only the last epoch; snapshot epochs are evaluated as well
    assert all(r["test_accuracy"] is not None for r in rows)
    (entry,) = json.loads((ck / "manifest.json").read_text())["checkpoints"]
    snaps = entry["snapshots"]
    assert [s["epoch"] for s in snaps] == [0, 1, 2]
    assert [s["file"] for s in snaps] == [f"vit_cifar_snapshots/epoch{e}.pt" for e in range(3)]
    assert [s["test_accuracy"] for s in snaps[1:]] == [r["test_accuracy"] for r in rows]
    assert [s["train_loss"] for s in snaps[1:]] == [r["train_loss"] for r in rows]
    assert snaps[0]["train_loss"] is None and snaps[0]["test_accuracy"] is not None
    final = torch.load(ck / "vit_cifar.pt", weights_only=True)["state_dict"]
    sds = [torch.load(ck / s["file"], weights_only=True) for s in snaps]
    assert [sd["epochs"] for sd in sds] == [0, 1, 2]
    for sd in sds[1:]:  # the learning rate is 0 after epoch 1: all equal the final weights
        assert all(torch.equal(sd["state_dict"][k], v) for k, v in final.items())
        assert sd["state_dict"]["head.weight"].dtype == torch.float16
    assert not torch.equal(sds[0]["state_dict"]["head.weight"], final["head.weight"])


def test_a_run_from_scratch_drops_the_snapshots_of_the_checkpoint_it_replaces(
        stopped_run, cifar_root):
    ck, _, tmp_path = stopped_run
    assert (ck / "vit_cifar_snapshots" / "epoch0.pt").is_file()
    res = train.train(train.TrainConfig(  # one step, and no save: only the start matters
        model="vit_cifar", data_root=str(cifar_root), epochs=2, batch_size=10, lr=1e-2,
        out=str(ck / "vit_cifar.pt"), run_dir=str(tmp_path / "run"), restart=True,
        progress=False, max_steps=1))
    assert res["snapshots"] == [] and not (ck / "vit_cifar_snapshots").exists()


def test_snapshots_of_a_model_that_stops_changing_give_cka_1_to_the_final_one(stopped_run):
    from reference import cka as reference_cka

    import repsim
    from repsim.models import load_model, preprocess
    from repsim.registry import get_spec

    ck, _, tmp_path = stopped_run
    a = tmp_path / "analyses"
    write(a, "dyn", 'kind = "dynamics"\nmodels = ["vit_cifar"]\n' + PROBE)
    write(a, "none", 'kind = "dynamics"\nmodels = ["resnet18_cifar"]\n' + PROBE)
    write(a, "some", 'kind = "dynamics"\nmodels = ["vit_cifar", "resnet18_cifar"]\n' + PROBE)
    res = build_all(a, tmp_path / "figures", progress=False)
    assert sorted(e["name"] for e in res["built"]) == ["dyn", "some"], res
    (skip,) = res["skipped"]  # no run of resnet18_cifar at all: one line, with the command
    assert skip["name"] == "none" and "\n" not in skip["reason"]
    assert "no training snapshots of resnet18_cifar" in skip["reason"]
    assert "`repsim train --model resnet18_cifar" in skip["reason"]
    assert "--snapshots 0,1,2,5,every:10`" in skip["reason"]

    data = json.loads((tmp_path / "figures" / "dyn.json").read_text())["data"]
    (m,) = data["models"]
    assert m["epochs"] == [0, 1, 2] and m["layers"][0] == "embed"
    for layer, values in m["cka"].items():
        np.testing.assert_allclose(values[1:], 1.0, rtol=0, atol=1e-12)
        assert m["settled_epoch"][layer] == (0 if values[0] >= 0.9 else 1)
    # epoch 0 (the initialisation) is another model: checked against the reference CKA
    x = preprocess(get_spec("vit_cifar"),
                   torch.from_numpy(repsim.load_probe_set("cifar10-probe", n=8).images))
    init, final = (repsim.extract(load_model("vit_cifar", str(ck / f))[0], x,
                                  layers=["blocks.5"])["blocks.5"]
                   for f in ("vit_cifar_snapshots/epoch0.pt", "vit_cifar.pt"))
    expected = reference_cka(init, final, debiased=True)
    assert expected < 0.99
    np.testing.assert_allclose(m["cka"]["blocks.5"][0], expected, rtol=0, atol=1e-9)

    some = json.loads((tmp_path / "figures" / "some.json").read_text())["data"]
    assert [x["label"] for x in some["models"]] == ["vit_cifar"]
    assert [x["model"] for x in some["missing"]] == ["resnet18_cifar"]
    assert (tmp_path / "figures" / "some.png").exists()


def test_snapshots_listed_by_an_entry_of_other_bytes_than_the_final_file_are_not_read(
        stopped_run):
    """The final checkpoint replaced (another run killed before its manifest entry, or a
    file copied by hand): the entry's snapshots are of another run, yet each was compared
    with the new final model as if it were its training run."""
    ck, _, tmp_path = stopped_run
    shutil.copy(ck / "vit_cifar_snapshots" / "epoch0.pt", ck / "vit_cifar.pt")
    a = tmp_path / "analyses"
    write(a, "dyn", 'kind = "dynamics"\nmodels = ["vit_cifar"]\n' + PROBE)
    (skip,) = build_all(a, tmp_path / "figures", progress=False)["skipped"]
    assert "its entry's snapshots are not of its checkpoint" in skip["reason"]
    assert "the manifest lists vit_cifar.pt with sha256" in skip["reason"]


def test_the_dynamics_picture_has_a_curve_per_layer_on_a_symlog_epoch_axis(tmp_path):
    from repsim.figures import draw

    epochs = [0, 1, 2, 5, 10, 20]
    model = {"label": "ViT", "final_epoch": 20, "final_test_accuracy": 70.0, "epochs": epochs,
             "layers": ["embed", "blocks.0"],
             "cka": {"embed": [0.5, 0.95, 0.96, 0.99, 1.0, 1.0],
                     "blocks.0": [0.1, 0.2, None, 0.5, 0.95, 1.0]},
             "settled_epoch": {"embed": 1, "blocks.0": 10},
             "test_accuracy": [10.0, 20.0, 30.0, 50.0, 60.0, 70.0],
             "train_accuracy": [None, 25.0, 35.0, 60.0, 80.0, 99.0]}
    fig = draw.dynamics([model, {**model, "label": "ResNet"}], "dynamics", 0.9)
    top, bottom = fig.axes[0], fig.axes[2]  # row-major: the first model's two panels
    assert top.get_xscale() == "symlog" and [t.get_text() for t in top.get_xticklabels()] == [
        str(e) for e in epochs]
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["embed (from 1)",
                                                                     "blocks.0 (from 10)"]
    np.testing.assert_array_equal(top.lines[1].get_ydata(), [0.1, 0.2, np.nan, 0.5, 0.95, 1.0])
    assert [ln.get_label() for ln in bottom.lines] == ["test", "train"]
    assert "test accuracy 70.0 %" in top.get_title()
    files = draw.save(fig, tmp_path / "dyn")
    assert [f.suffix for f in files] == [".png", ".pdf"]


@pytest.mark.parametrize("value, shown", [('"high"', "'high'"), ("true", "True"),
                                          ("0", "0"), ("1.5", "1.5")])
def test_a_settle_level_that_is_not_a_cka_level_fails_in_one_line(tmp_path, monkeypatch, value,
                                                                  shown):
    """settle = "high" gave Python's "could not convert string to float", and true passed as
    1.0: a level is a number in (0, 1], refused by name otherwise."""
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(tmp_path / "ckpt"))
    write(tmp_path / "a", "dyn", f'kind = "dynamics"\nmodels = ["vit_cifar"]\nsettle = {value}\n'
          + PROBE)
    (failed,) = build_all(tmp_path / "a", tmp_path / "f", progress=False)["failed"]
    assert failed["reason"] == (f"dyn: settle={shown} must be a CKA level in (0, 1], e.g. "
                                "settle = 0.9; fix the file"), failed


def test_the_retrain_command_keeps_the_runs_seed_batch_size_and_lr():
    from repsim.figures import dynamics
    from repsim.figures.context import ModelRef

    entry = {"recipe": "paper", "epochs_planned": 10, "seed": 3, "batch_size": 100, "lr": 1e-4,
             "weights_seed": None}
    line = dynamics._command(ModelRef("vit_cifar"), None, entry)
    assert "--seed 3 --batch-size 100 --lr 0.0001 --snapshots" in line
    assert "--weights-seed" not in line


def test_the_retrain_command_writes_a_large_seed_as_an_integer():
    """A seed of 20261128 came out as --seed 2.02611e+07 (format :g), which train refuses."""
    from repsim.figures import dynamics
    from repsim.figures.context import ModelRef

    entry = {"epochs_planned": 10, "seed": 20261128, "batch_size": 1048576, "lr": 1e-4}
    line = dynamics._command(ModelRef("vit_cifar"), None, entry)
    assert "--seed 20261128 --batch-size 1048576 --lr 0.0001 --snapshots" in line


@pytest.mark.parametrize("fraction", [None, True, "0.5"])
def test_the_retrain_command_of_an_entry_whose_fraction_is_no_number_is_still_a_command(
        fraction):
    # train_fraction null raised TypeError (format None with :g): the figure failed instead
    # of naming the command that makes the snapshots.
    from repsim.figures import dynamics
    from repsim.figures.context import ModelRef

    entry = {"epochs_planned": 10, "train_fraction": fraction}
    line = dynamics._command(ModelRef("vit_cifar"), None, entry)
    assert line.startswith("repsim train --model vit_cifar --epochs 10")
    assert "--train-fraction" not in line


def test_the_retrain_command_quotes_a_checkpoint_path_with_spaces():
    # --out /tmp/my runs/vit_cifar.pt came out bare: pasted, the shell split it in two.
    import shlex
    from pathlib import Path

    from repsim.figures import dynamics
    from repsim.figures.context import ModelRef

    final = Path("/tmp/my runs/vit_cifar.pt")
    line = dynamics._command(ModelRef("vit_cifar"), final, {"epochs_planned": 10})
    words = shlex.split(line)
    assert words[words.index("--out") + 1] == str(final)
    assert words[:4] == ["repsim", "train", "--model", "vit_cifar"]
