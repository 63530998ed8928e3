"""Training and evaluation (issue 4): learning, exact resume, subsets, checkpoints, eval."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repsim import checkpoints, data, evaluation, models, paths, recipes, registry, train
from repsim.errors import UserError
from repsim.weights import sha256_file

N_TRAIN, N_TEST = 2, 2  # images per class
BATCH = 10


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A learnable 10-class CIFAR-10 tree: each class has its own mean colour."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for split, k in (("train", N_TRAIN), ("test", N_TEST)):
        for c in range(10):
            d = root / "cifar10" / split / f"class{c}"
            d.mkdir(parents=True)
            colour = np.array([c * 25, 255 - c * 25, (c * 97) % 256])
            for i in range(k):
                img = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def _cfg(toy_root, tmp_path, **kw):
    base = dict(model="vit_cifar", data_root=str(toy_root), epochs=2, batch_size=BATCH, lr=1e-3,
                out=str(tmp_path / "ck" / "m.pt"), run_dir=str(tmp_path / "run"),
                progress=False)
    base.update(kw)
    return train.TrainConfig(**base)


def _log(run_dir):
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def _train_and_losses(toy_root, cfg):
    """Train ``cfg``; the test loss of the seeded start and of the saved checkpoint (nats)."""
    spec = registry.get_spec(cfg.model)
    ps = data.load_probe_set("cifar10", "test", data_root=str(toy_root))
    x, y = torch.from_numpy(ps.images), torch.from_numpy(ps.labels.astype(np.int64))
    start, _ = train.initial_model(cfg.model, None, 10, seed=0)
    before = evaluation.evaluate(start, spec, x, y)["loss"]
    res = train.train(cfg)
    after = evaluation.evaluate(models.load_model(cfg.model, cfg.out)[0], spec, x, y)["loss"]
    return res, before, after


def test_training_lowers_the_loss(toy_root, tmp_path):
    res, before, after = _train_and_losses(toy_root, _cfg(toy_root, tmp_path, epochs=4))
    assert res["steps"] == 4 * 10 * N_TRAIN // BATCH
    assert after < before - 0.5, (before, after)  # nats; chance level is ln 10


@pytest.fixture(scope="module")
def uninterrupted(toy_root, tmp_path_factory):
    """``(folder, result)`` of the 2-epoch run the resume tests must reproduce (read only)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return folder, train.train(_cfg(toy_root, folder))


def test_resume_after_interruption_equals_uninterrupted_run(toy_root, tmp_path, uninterrupted):
    a_dir, ref = uninterrupted
    steps_per_epoch = math.ceil(10 * N_TRAIN / BATCH)
    # Stop mid-way through epoch 2: only epoch 1 is saved, then rerun the same command.
    cut = train.train(_cfg(toy_root, tmp_path / "b", max_steps=steps_per_epoch + 1))
    assert cut["stopped_early"] and cut["epochs"] == 1
    res = train.train(_cfg(toy_root, tmp_path / "b"))
    assert res["resumed_from"] == 1 and res["epochs"] == 2
    a = torch.load(a_dir / "run" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "state.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    drop = {"seconds"}
    la = [{k: v for k, v in r.items() if k not in drop} for r in _log(a_dir / "run")]
    lb = [{k: v for k, v in r.items() if k not in drop} for r in _log(tmp_path / "b" / "run")]
    assert la == lb
    assert ref["test_accuracy"] == res["test_accuracy"]


def test_resuming_a_state_saved_on_cuda_on_the_cpu_is_a_user_error(toy_root, tmp_path):
    steps_per_epoch = math.ceil(10 * N_TRAIN / BATCH)
    train.train(_cfg(toy_root, tmp_path, max_steps=steps_per_epoch + 1))  # epoch 1 saved
    state_path = tmp_path / "run" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    # What a CUDA run saves: its device generator's Philox state (seed and offset, 16
    # bytes) for the data order and augmentation, and the CUDA RNG's for dropout.
    state["rng"]["data"] = state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, state_path)
    with pytest.raises(UserError, match="saved on cuda.*device=cuda"):
        train.train(_cfg(toy_root, tmp_path, device="cpu"))


def test_interruption_while_writing_the_checkpoint_is_redone_on_resume(toy_root, tmp_path,
                                                                       monkeypatch):
    # Killed while writing the last epoch's checkpoint: rerunning the command must leave
    # that checkpoint, not report the run finished from its saved state without one.
    out = tmp_path / "ck" / "m.pt"
    write = paths.atomic_write

    def killed_at_the_checkpoint(path, fn):
        if Path(path) == out:
            raise KeyboardInterrupt
        return write(path, fn)

    monkeypatch.setattr(paths, "atomic_write", killed_at_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train.train(_cfg(toy_root, tmp_path, epochs=1))
    monkeypatch.setattr(paths, "atomic_write", write)
    res = train.train(_cfg(toy_root, tmp_path, epochs=1))
    assert res["epochs"] == 1
    assert torch.load(out, weights_only=True)["epochs"] == 1
    assert [r["epoch"] for r in _log(tmp_path / "run")] == [1]


def test_resume_after_a_kill_mid_way_through_a_log_line(toy_root, tmp_path, uninterrupted):
    # Killed while appending epoch 2's log row, before its state: the torn row must not
    # stop the same command from resuming at epoch 1 and finishing as an uninterrupted run.
    steps_per_epoch = math.ceil(10 * N_TRAIN / BATCH)
    train.train(_cfg(toy_root, tmp_path / "b", max_steps=steps_per_epoch + 1))
    log = tmp_path / "b" / "run" / "log.jsonl"
    log.write_text(log.read_text() + '{"epoch": 2, "train_lo')
    res = train.train(_cfg(toy_root, tmp_path / "b"))
    assert res["resumed_from"] == 1 and res["epochs"] == 2
    drop = {"seconds"}
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in _log(d / "run")]
            for d in (uninterrupted[0], tmp_path / "b")]
    assert rows[0] == rows[1]


def test_finished_run_is_not_retrained_nor_resumed_with_other_settings(toy_root, tmp_path):
    train.train(_cfg(toy_root, tmp_path, epochs=1))
    again = train.train(_cfg(toy_root, tmp_path, epochs=1))
    assert again["resumed_from"] == 1 and again["steps"] == math.ceil(10 * N_TRAIN / BATCH)
    with pytest.raises(UserError, match="restart=True"):
        train.train(_cfg(toy_root, tmp_path, epochs=1, lr=5e-4))


def test_a_state_of_other_settings_names_the_settings_that_differ(toy_root, tmp_path, mlp):
    # "other settings" alone left the researcher to guess which of a dozen changed.
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1)
    train.train(cfg)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    state["identity"]["recipe"]["cutout"] = 8
    torch.save(state, tmp_path / "run" / "state.pt")
    with pytest.raises(UserError, match=r"other settings \(recipe cutout 8, now 0; lr 0\.001, "
                       r"now 0\.0005\); valid: "):
        train.train(dataclasses.replace(cfg, lr=5e-4))


def test_a_state_of_other_settings_points_to_a_separate_out_and_run_dir(toy_root, tmp_path):
    # A new run_dir alone would start a fresh run that replaces the checkpoint and snapshots
    # at the same out: the fix must name both.
    (tmp_path / "run").mkdir()
    torch.save({"identity": {"model": "another run"}}, tmp_path / "run" / "state.pt")
    with pytest.raises(UserError, match=r"fix: restart=True to start over \(replacing \S*m\.pt "
                       r"and its snapshots\), or out=PATH and run_dir=PATH both new"):
        train.train(_cfg(toy_root, tmp_path, model="resnet18_cifar"))


def test_resuming_a_registered_model_whose_architecture_changed_is_refused(
        toy_root, tmp_path, monkeypatch):
    # Its saved weights no longer fit (a width changed): a one-line refusal, not torch's
    # size-mismatch traceback; an unchanged architecture still resumes.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def register(width: int) -> None:
        registry._REGISTRY.pop("resume_mlp_test", None)
        registry.register_model("resume_mlp_test", input_size=4)(
            lambda n: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, width),
                                          torch.nn.Linear(width, n)))

    cfg = _cfg(toy_root, tmp_path, model="resume_mlp_test", weights="random", epochs=1)
    register(5)
    train.train(cfg)
    register(7)
    with pytest.raises(UserError, match="belongs to a run with other settings"):
        train.train(cfg)
    register(5)
    assert train.train(cfg)["resumed_from"] == 1


def _reworded(monkeypatch, name: str) -> None:
    monkeypatch.setattr(recipes, "RECIPES", {**recipes.RECIPES, name: dataclasses.replace(
        recipes.RECIPES[name], description="reworded", source="another citation")})


def test_an_unfinished_run_resumes_after_its_recipes_prose_is_reworded(toy_root, tmp_path, mlp,
                                                                      monkeypatch):
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=2, max_steps=2)
    train.train(cfg)  # epoch 1 of 2 saved
    _reworded(monkeypatch, "paper")
    assert train.train(dataclasses.replace(cfg, max_steps=None))["resumed_from"] == 1


def test_a_state_saved_with_the_recipes_prose_in_its_identity_still_resumes(
        toy_root, tmp_path, mlp, monkeypatch):
    # States saved before the prose left the identity hold all of the recipe, as worded then.
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=2, max_steps=2)
    train.train(cfg)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    state["identity"]["recipe"] = dataclasses.asdict(recipes.RECIPES["paper"])
    torch.save(state, tmp_path / "run" / "state.pt")
    _reworded(monkeypatch, "paper")
    assert train.train(dataclasses.replace(cfg, max_steps=None))["resumed_from"] == 1


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(recipes.Recipe)
                                   if f.name not in ("description", "source")])
def test_every_recipe_field_that_changes_training_is_in_the_run_identity(field, monkeypatch):
    # "strong" (cosine) with the run's epochs, batch size and lr left to the recipe.
    base = recipes.RECIPES["strong"]
    value = getattr(base, field)
    changed = {bool: lambda v: not v, str: lambda v: v + "x"}.get(type(value), lambda v: v * 2 + 1)
    cfg = train.TrainConfig(model="vit_cifar", recipe="strong")
    before = train._identity(*train._resolve(cfg))
    monkeypatch.setattr(recipes, "RECIPES", {**recipes.RECIPES, "strong": dataclasses.replace(
        base, **{field: changed(value)})})
    assert train._identity(*train._resolve(cfg)) != before


def test_a_constant_schedule_with_a_warm_up_keeps_the_planned_length_in_the_identity(
        monkeypatch):
    # The warm-up is cut to half of a short run: the planned length decides its lr.
    monkeypatch.setattr(recipes, "RECIPES", {**recipes.RECIPES, "warm": dataclasses.replace(
        recipes.RECIPES["paper"], name="warm", warmup_epochs=3)})
    idents = [train._identity(*train._resolve(train.TrainConfig(
        model="vit_cifar", recipe="warm", epochs=e))) for e in (2, 6)]
    assert idents[0] != idents[1]


def test_a_dataset_named_in_capitals_is_the_same_run():
    # CIFAR10 trains on cifar10: its checkpoint is the model's own (checkpoints/vit_cifar.pt),
    # its run resumes a cifar10 one.
    cfg, recipe = train._resolve(train.TrainConfig(model="vit_cifar", dataset="CIFAR10"))
    assert train.run_name(cfg) == "vit_cifar" and cfg.dataset == "cifar10"


def test_a_finished_run_summary_names_its_manifest(toy_root, tmp_path):
    first = train.train(_cfg(toy_root, tmp_path, epochs=1))
    again = train.train(_cfg(toy_root, tmp_path, epochs=1))  # finished: nothing is saved
    assert again["manifest"] == first["manifest"] == str(tmp_path / "ck" / "manifest.json")
    rows = json.loads(Path(again["manifest"]).read_text())["checkpoints"]
    assert [r["name"] for r in rows] == ["m"]


def test_the_summary_says_whether_the_run_was_finished_before(toy_root, tmp_path, mlp):
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1)
    first = train.train(cfg)
    again = train.train(cfg)
    longer = train.train(dataclasses.replace(cfg, epochs=2))  # constant schedule: it goes on
    assert (first["finished_before"], again["finished_before"]) == (False, True)
    assert (longer["finished_before"], longer["resumed_from"], longer["epochs"]) == (False, 1, 2)


def test_snapshots_asked_of_a_finished_run_are_named_as_lost(toy_root, tmp_path):
    train.train(_cfg(toy_root, tmp_path, epochs=1))
    with pytest.warns(UserWarning, match=r"snapshots at epochs 0, 1 cannot be made.*restart"):
        again = train.train(_cfg(toy_root, tmp_path, epochs=1, snapshots="0,1"))
    assert again["snapshots"] == [] and again["epochs"] == 1


def test_the_cli_prints_a_library_warning_as_one_line(toy_root, tmp_path):
    cfg = _cfg(toy_root, tmp_path, epochs=1)
    train.train(cfg)
    r = _cli("train", "--model", "vit_cifar", "--data-root", str(toy_root), "--epochs", "1",
             "--batch-size", str(BATCH), "--lr", "1e-3", "--out", cfg.out, "--run-dir",
             cfg.run_dir, "--snapshots", "0,1", "--json", REPSIM_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("repsim train: warning: snapshots at epochs 0, 1 cannot be made")
    assert "fix: --restart to train it again" in line


def test_train_fraction_is_balanced_and_recorded(toy_root, tmp_path):
    out = tmp_path / "ck" / "m.pt"
    train.train(_cfg(toy_root, tmp_path, epochs=1, train_fraction=0.5))
    ck = torch.load(out, weights_only=True)
    assert ck["data"]["n_train"] == 10 * N_TRAIN // 2
    assert ck["data"]["train_fraction"] == 0.5
    labels = np.repeat(np.arange(10), N_TRAIN)  # the toy tree's canonical order
    keep = data.balanced_subset(labels, 0.5, seed=0)
    digest = hashlib.sha256(keep.astype(np.int64).tobytes()).hexdigest()
    assert ck["data"]["train_ids_sha256"] == digest


def test_the_manifest_entry_holds_the_settings_that_retrain_the_run(toy_root, tmp_path):
    # Without them, the retrain command a figure suggests dropped --seed, --lr, --batch-size.
    train.train(_cfg(toy_root, tmp_path, epochs=1, seed=2, lr=2e-3))
    (row,) = json.loads((tmp_path / "ck" / "manifest.json").read_text())["checkpoints"]
    assert (row["seed"], row["batch_size"], row["lr"], row["weights_seed"]) == (2, BATCH, 2e-3,
                                                                                None)


def test_checkpoint_round_trip_manifest_metrics_and_precision(toy_root, tmp_path):
    cpu = torch.device("cpu")
    assert evaluation.train_precision(cpu, "auto") == ("bf16" if evaluation.cpu_has_native_bf16()
                                                  else "fp32")
    assert evaluation.train_precision(torch.device("cuda"), "auto") == "bf16"
    # fp32 forced: bf16 is emulated (about 10x slower) on CPUs without native bf16
    res = train.train(_cfg(toy_root, tmp_path, epochs=1, precision="fp32"))
    assert res["precision"] == "fp32"
    out = tmp_path / "ck" / "m.pt"
    ck = torch.load(out, weights_only=True)
    assert ck["precision"] == "fp32"
    assert all(v.dtype == torch.float16 for v in ck["state_dict"].values()
               if v.is_floating_point())
    assert ck["model"] == "vit_cifar" and ck["epochs"] == 1 and ck["recipe"]["name"] == "paper"
    assert ck["repsim_version"] and ck["test_accuracy"] == res["test_accuracy"]
    model, prov = models.load_model("vit_cifar", out)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():  # float32 again, equal to the fp16-rounded weights
        assert v.dtype == torch.float32
        assert torch.equal(v, state[k].half().float()), k
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    (row,) = manifest["checkpoints"]
    assert row["file"] == "m.pt" and row["sha256"] == prov["weights_sha256"]
    assert row["epochs"] == 1 and row["epochs_planned"] == 1
    # the recorded metrics are those of the saved float16 weights, as `repsim eval` reports
    ev = evaluation.evaluate_model(evaluation.EvalConfig(
        model="vit_cifar", weights=res["checkpoint"], dataset="cifar10",
        data_root=str(toy_root), progress=False))
    assert res["test_loss"] == pytest.approx(ev["loss"], rel=1e-9, abs=0)
    assert (ck["test_loss"], ck["test_accuracy"]) == (res["test_loss"], ev["accuracy"])
    assert (row["test_loss"], row["test_accuracy"]) == (round(ev["loss"], 4),
                                                        round(ev["accuracy"], 2))


def test_eval_of_a_known_answer_model(toy_root, tmp_path):
    # Zero weights into the classifier and bias c on class 3: every image scores class 3,
    # so accuracy is the share of class 3 and the loss is known in closed form.
    model = models.build_model("resnet18_cifar")
    c = 2.0
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[3] = c
    path = tmp_path / "known.pt"
    torch.save(model.state_dict(), path)
    res = evaluation.evaluate_model(evaluation.EvalConfig(
        model="resnet18_cifar", weights=str(path), dataset="cifar10", data_root=str(toy_root),
        progress=False))
    assert res["n"] == 10 * N_TEST
    assert res["accuracy"] == pytest.approx(10.0)
    expected = math.log(math.exp(c) + 9) - c / 10
    assert res["loss"] == pytest.approx(expected, rel=1e-6)


def test_finetune_replaces_the_head_of_a_pretrained_file(tmp_path):
    # A 1000-class "pretrained" timm ViT written by the test; CIFAR-10 needs 10 outputs.
    arch = "timm:vit_tiny_patch16_224"
    path = tmp_path / "pre.pt"
    src = models.build_model(arch, seed=1)
    torch.save(src.state_dict(), path)
    model, prov = train.initial_model(arch, str(path), 10, seed=0)
    assert model.head.out_features == 10
    assert prov["init"] == str(path) and prov["init_sha256"] == sha256_file(path)
    assert prov["init_seed"] == 0  # the new head was drawn with it
    sd = model.state_dict()
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], src.state_dict()["blocks.0.attn.qkv.weight"])


def test_scratch_models_start_from_seeded_random_weights():
    a, prov = train.initial_model("resnet18_cifar", None, 10, seed=3)
    b, _ = train.initial_model("resnet18_cifar", None, 10, seed=3)
    assert prov["init"] == "random"
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_model_registered_with_random_default_weights_records_its_init_seed(monkeypatch):
    # Its start is drawn with the seed, but init_seed read None and weights_seed= was refused
    # as having no effect.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model("random_default_test", input_size=4, weights="random")(
        lambda n: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, n)))
    (a, prov), (b, _) = (train.initial_model("random_default_test", None, 10, s) for s in (3, 4))
    assert prov == {"init": "random", "init_sha256": None, "init_seed": 3}
    assert not torch.equal(a[1].weight, b[1].weight)


def test_a_weights_seed_that_draws_nothing_is_refused(toy_root, tmp_path):
    # A start file of the task's class count sets every weight, its head included.
    path = tmp_path / "start.pt"
    torch.save(models.build_model("resnet18_cifar").state_dict(), path)
    cfg = _cfg(toy_root, tmp_path, model="resnet18_cifar", weights=str(path), weights_seed=3)
    with pytest.raises(UserError, match=r"^weights_seed=3 has no effect: \S*start\.pt sets every "
                       r"parameter, its 10-class head included; fix: drop weights_seed="):
        train.train(cfg)
    assert not (tmp_path / "run").exists()


def test_weights_seed_changes_the_init_not_the_training_data(toy_root, tmp_path):
    cfgs = [_cfg(toy_root, tmp_path / str(w), epochs=1, train_fraction=0.5, weights_seed=w)
            for w in (None, 7)]
    assert train.run_name(cfgs[1]) == "vit_cifar_frac0.5_wseed7"
    cks = []
    for cfg in cfgs:
        train.train(cfg)
        cks.append(torch.load(cfg.out, weights_only=True))
    assert [ck["init_seed"] for ck in cks] == [0, 7]
    assert cks[0]["data"]["train_ids_sha256"] == cks[1]["data"]["train_ids_sha256"]
    start = [train.initial_model("vit_cifar", None, 10, seed=s)[0].state_dict() for s in (0, 7)]
    assert not torch.equal(start[0]["head.weight"], start[1]["head.weight"])


def test_lr_schedules():
    paper, strong = recipes.RECIPES["paper"], recipes.RECIPES["strong"]
    assert recipes.lr_at(0, 1000, 10, paper, 1e-4) == 1e-4
    assert recipes.lr_at(999, 1000, 10, paper, 1e-4) == 1e-4
    warm = strong.warmup_epochs * 10
    assert recipes.lr_at(0, 1000, 10, strong, 1e-3) == pytest.approx(1e-5)
    assert recipes.lr_at(warm, 1000, 10, strong, 1e-3) == pytest.approx(1e-3)
    assert recipes.lr_at(1000, 1000, 10, strong, 1e-3) == pytest.approx(0.0, abs=1e-12)


def test_a_run_shorter_than_its_warm_up_still_peaks_and_decays():
    """`--recipe strong --epochs 5` (10 warm-up epochs) ended its run half-way up the ramp at
    5e-4 and never decayed; warm-up takes at most half the steps, then the cosine runs."""
    strong = recipes.RECIPES["strong"]
    lrs = [recipes.lr_at(s, 50, 10, strong, 1e-3) for s in range(51)]
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 25
    assert lrs[50] == pytest.approx(0.0, abs=1e-12)


def test_triangular_schedule_matches_its_definition():
    # airbench's np.interp(step, [0, 0.2 T, T], [0.2, 1, 0]) times the peak rate
    fast = recipes.RECIPES["fast-resnet"]
    total = 1000
    expected = np.interp(np.arange(total + 1), [0, 200, total], [0.2, 1.0, 0.0]) * 0.2
    got = [recipes.lr_at(s, total, 10, fast, 0.2) for s in range(total + 1)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)


def test_autoaugment_comes_before_cutout_as_in_cubuk_et_al(monkeypatch):
    # Cubuk et al. 2019: the baseline crop + flip, then the AutoAugment policy, then cutout.
    # fast-resnet-aa cut out first, so AutoAugment's ops (here an invert standing in for
    # them) repainted the square: no image kept a zeroed cutout square.
    monkeypatch.setattr(recipes.augment, "auto_augment", lambda x: 255 - x)
    r = recipes.RECIPES["fast-resnet-aa"]
    images = torch.full((16, 32, 32, 3), 100, dtype=torch.uint8)
    x, _ = recipes.batch(images, torch.zeros(16, dtype=torch.int64),
                         registry.get_spec("resnet18_cifar"), r,
                         torch.Generator().manual_seed(0), 10)
    holes = (x == 0).all(1).sum((1, 2))  # channels-first, no normalisation: 0 stays 0
    assert (holes > 0).all() and holes.max() == r.cutout ** 2
    desc = recipes.describe_augmentation(r)
    assert desc.index("AutoAugment") < desc.index("cutout 12")


def test_eval_every_saves_on_schedule_and_at_the_end(toy_root, tmp_path):
    res = train.train(_cfg(toy_root, tmp_path, epochs=3, eval_every=2))
    rows = _log(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["test_accuracy"] is not None for r in rows] == [False, True, True]
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["epoch"] == 3
    assert res["test_accuracy"] == rows[-1]["test_accuracy"]


def test_time_limit_stops_after_a_saved_epoch_and_resumes(toy_root, tmp_path):
    # 0.001 min: the first epoch runs (nothing is known yet), then no second one fits.
    cut = train.train(_cfg(toy_root, tmp_path, epochs=3, eval_every=5, time_limit=0.001))
    assert cut["stopped"] == "time limit" and cut["epochs"] == 1
    ck = torch.load(tmp_path / "ck" / "m.pt", weights_only=True)
    assert ck["epochs"] == 1 and ck["epochs_planned"] == 3
    assert [r["epoch"] for r in _log(tmp_path / "run")] == [1]
    res = train.train(_cfg(toy_root, tmp_path, epochs=3, eval_every=5))
    assert res["resumed_from"] == 1 and res["epochs"] == 3 and res["stopped"] is None



def test_time_limit_leaves_room_for_the_save_of_the_next_epoch(toy_root, tmp_path,
                                                               monkeypatch):
    # A fake clock: an epoch takes 10 s and an evaluation + save 30 s (a small training
    # subset, the whole test split), against a 60 s limit. After epoch 1 and its save (40 s)
    # a second epoch and its save would end at 80 s, so the run stops at epoch 1.
    now = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    train_epoch, save = train._train_epoch, train._save

    def epoch_10s(run, epoch):
        row = train_epoch(run, epoch)
        now[0] += 10.0
        return {**row, "seconds": 10.0}

    def save_30s(*args):
        now[0] += 30.0
        return save(*args)

    monkeypatch.setattr(train, "_train_epoch", epoch_10s)
    monkeypatch.setattr(train, "_save", save_30s)
    res = train.train(_cfg(toy_root, tmp_path, epochs=3, time_limit=1.0))
    assert res["stopped"] == "time limit" and res["epochs"] == 1
    assert now[0] <= 60.0

def test_sgd_recipe_decays_every_weight_with_nesterov():
    model = models.build_model("resnet18_cifar")
    opt = recipes.make_optimizer(model, recipes.RECIPES["fast-resnet"], 0.2, torch.device("cpu"))
    (group,) = opt.param_groups
    assert isinstance(opt, torch.optim.SGD) and group["nesterov"] and group["momentum"] == 0.9
    assert group["weight_decay"] == 5e-4
    assert len(group["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kw, match", [
    ({"model": "vit_cifr"}, "vit_cifar"),
    ({"dataset": "cifar11"}, "cifar10"),
    ({"recipe": "fast"}, "paper"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"eval_every": 0}, "eval_every=0"),
    ({"time_limit": 0}, "time_limit=0"),
    ({"lr": math.inf}, "lr=inf"),
    ({"precision": "fp8"}, "precision"),
    ({"seed": None}, "seed=None is no seed"),
    ({"seed": -1}, "seed=-1 is no seed"),
])
def test_bad_settings_are_user_errors(toy_root, tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        train.train(_cfg(toy_root, tmp_path, **kw))



@pytest.mark.parametrize("kw, match", [
    ({"epochs": 2.5}, r"^epochs=2\.5 is not an integer; valid: an integer >= 1"),
    ({"batch_size": True}, r"^batch_size=True is not an integer; valid: an integer >= 1"),
])
def test_counts_that_are_not_integers_are_refused_before_any_work(kw, match):
    # epochs=2.5 passed the `< 1` check and failed in range() after the data had loaded, as a
    # TypeError; batch_size=True trained with batches of one image.
    with pytest.raises(UserError, match=match):
        train._resolve(train.TrainConfig(model="vit_cifar", **kw))


@pytest.mark.parametrize("dataset", ["cifar10-probe", "imagefolder:/tmp"])
def test_train_refuses_a_dataset_without_its_own_test_split(toy_root, tmp_path, dataset):
    # An image folder would be scored on its own training images as the "test" split.
    with pytest.raises(UserError, match=f"dataset='{dataset}' cannot be trained on; valid: "
                       "cifar10, cifar100, svhn"):
        train.train(_cfg(toy_root, tmp_path, dataset=dataset))
    assert not (tmp_path / "ck").exists()

def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "repsim", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)


@pytest.mark.parametrize("args", [
    ["train", "--model", "vit_cifar", "--epochs", "0"],
    ["train", "--model", "vit_cifar", "--batch-size", "-3"],
    ["train", "--model", "nope"],
    ["train", "--model", "vit_cifar", "--recipe", "fast"],
    ["train", "--model", "vit_cifar", "--time-limit", "-1"],
    ["train", "--model", "vit_cifar", "--eval-every", "0"],
    ["eval", "--model", "vit_cifar", "--dataset", "mnist"],
])
def test_cli_errors_are_one_line_exit_1(tmp_path, args):
    r = _cli(*args, REPSIM_DATA=str(tmp_path), REPSIM_OFFLINE="1")
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_eval_json(toy_root, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(models.build_model("resnet18_cifar").state_dict(), path)
    r = _cli("eval", "--model", "resnet18_cifar", "--weights", str(path), "--dataset", "cifar10",
             "--data-root", str(toy_root), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"model", "dataset", "split", "n", "accuracy"} <= set(out)
    assert out["n"] == 10 * N_TEST and out["split"] == "test"



def test_cli_train_fraction_that_selects_nothing_names_its_flag(toy_root, tmp_path):
    # 2 images a class: 10 % rounds to none.
    r = _cli("train", "--model", "vit_cifar", "--data-root", str(toy_root), "--train-fraction",
             "0.1", "--out", str(tmp_path / "m.pt"), "--run-dir", str(tmp_path / "run"), "--json",
             REPSIM_OFFLINE="1")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--train-fraction 0.1 selects no images" in r.stderr

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_training_lowers_the_loss_and_saves_plain_keys(toy_root, tmp_path, compile_):
    cfg = _cfg(toy_root, tmp_path, epochs=4, device="cuda", compile=compile_, eval_every=2)
    res, before, after = _train_and_losses(toy_root, cfg)
    assert res["precision"] == "bf16" and res["compiled"] is compile_
    sd = torch.load(cfg.out, weights_only=True)["state_dict"]
    assert not any(k.startswith("_orig_mod.") for k in sd)
    assert after < before - 0.5, (before, after)


def test_augmented_recipe_trains_and_records_its_augmentation(toy_root, tmp_path):
    res = train.train(_cfg(toy_root, tmp_path, epochs=1, recipe="fast-vit-aug"))
    assert res["epochs"] == 1 and math.isfinite(res["test_loss"])
    ck = torch.load(tmp_path / "ck" / "m.pt", weights_only=True)
    assert "RandAugment 2 ops" in ck["data"]["augmentation"]
    assert "MixUp 0.8 / CutMix 1.0" in ck["data"]["augmentation"]


def test_parallel_runs_all_land_in_one_manifest(tmp_path):
    # device_run.sh trains the tiny ViTs in parallel into one folder: no entry may be lost.
    import multiprocessing

    from repsim.checkpoints import update_manifest

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=lambda i=i: [update_manifest(tmp_path / f"m{i}.pt",
                                                             {"name": f"m{i}", "round": r})
                                             for r in range(20)]) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows = json.loads((tmp_path / "manifest.json").read_text())["checkpoints"]
    assert [r["name"] for r in rows] == [f"m{i}" for i in range(8)]
    assert all(r["round"] == 19 for r in rows)


@pytest.mark.parametrize("text", ["[]", "3", '{"checkpoints": {}}', '{"checkpoints": [1]}'])
def test_a_manifest_that_is_no_json_object_is_a_user_error(tmp_path, text):
    from repsim.checkpoints import update_manifest

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(UserError, match=r"manifest\.json is not a checkpoint manifest.*delete it"):
        update_manifest(tmp_path / "m.pt", {"name": "m"})


@pytest.fixture
def mlp(monkeypatch, tmp_path):
    """A registered 48-input MLP (fast to train on the 4x4 toy input) and a start file of it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    build = registry.register_model("train_mlp_test", input_size=4)(
        lambda n: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, n)))
    torch.save(build(10).state_dict(), tmp_path / "start.pt")
    return "train_mlp_test"


def test_a_corrupt_state_file_is_named_as_the_runs_state(toy_root, tmp_path, mlp):
    # A truncated state.pt: the advice is about the run's state (delete it, restart, another
    # run_dir), not about re-saving or downloading weights.
    (tmp_path / "run").mkdir()
    torch.save({"x": torch.zeros(1000)}, tmp_path / "run" / "state.pt")
    whole = (tmp_path / "run" / "state.pt").read_bytes()
    (tmp_path / "run" / "state.pt").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UserError, match=r"state\.pt, the saved state of this run, is unreadable "
                       r".*fix: restart=True .*or another run_dir=PATH") as err:
        train.train(_cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1))
    assert "download" not in str(err.value) and "re-save" not in str(err.value)


def test_resuming_from_a_start_file_whose_bytes_changed_is_refused(toy_root, tmp_path, mlp):
    # The run went on from its old start, and its checkpoint named the new file's sha256 as
    # the start it never had.
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights=str(tmp_path / "start.pt"), epochs=1)
    train.train(cfg)
    start = (tmp_path / "start.pt").read_bytes()
    sd = torch.load(tmp_path / "start.pt", weights_only=True)
    torch.save({k: v + 1 for k, v in sd.items()}, tmp_path / "start.pt")
    with pytest.raises(UserError, match=r"^\S*state\.pt started from other bytes of \S*start"
                                        r"\.pt \(sha256 \w{12}, now \w{12}\); valid: "):
        train.train(dataclasses.replace(cfg, epochs=2))
    (tmp_path / "start.pt").write_bytes(start)
    assert train.train(dataclasses.replace(cfg, epochs=2))["resumed_from"] == 1


def test_a_run_whose_out_is_its_start_file_is_refused_before_overwriting_it(toy_root, tmp_path,
                                                                            mlp):
    # repsim train --model vit_cifar --weights checkpoints/vit_cifar.pt (the paper recipe's
    # default out) overwrote its own start at the first save: the original was lost.
    start = tmp_path / "start.pt"
    before = start.read_bytes()
    with pytest.raises(UserError, match=r"^out=\S*start\.pt is the run's start file "
                                        r"\(weights=\S*\); .*fix: another out=PATH"):
        train.train(_cfg(toy_root, tmp_path, model=mlp, weights=str(start), out=str(start)))
    assert start.read_bytes() == before


def test_a_start_file_spelled_another_way_resumes_the_run(toy_root, tmp_path, mlp, monkeypatch):
    train.train(_cfg(toy_root, tmp_path, model=mlp, weights=str(tmp_path / "start.pt"), epochs=1))
    monkeypatch.chdir(tmp_path / "run")
    again = train.train(_cfg(toy_root, tmp_path, model=mlp, weights="../start.pt", epochs=1))
    assert again["resumed_from"] == 1


def test_a_state_saved_with_the_start_file_as_typed_still_resumes(toy_root, tmp_path, mlp,
                                                                 monkeypatch):
    # States saved before the path was resolved hold it as typed: those runs still resume.
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="start.pt", epochs=1)
    train.train(cfg)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    state["identity"]["weights"] = "start.pt"
    torch.save(state, tmp_path / "run" / "state.pt")
    assert train.train(cfg)["resumed_from"] == 1


def test_a_useless_weights_seed_is_refused_before_the_data_is_read(tmp_path, mlp, monkeypatch):
    monkeypatch.setenv("REPSIM_OFFLINE", "1")  # the missing data is not downloaded either
    cfg = _cfg(tmp_path / "no such data", tmp_path, model=mlp, weights=str(tmp_path / "start.pt"),
               weights_seed=3)
    with pytest.raises(UserError, match=r"^weights_seed=3 has no effect"):
        train.train(cfg)


@pytest.mark.parametrize("precision, bf16", [("fp32", False), ("bf16", True)])
def test_the_training_step_runs_in_the_precision_it_records(monkeypatch, precision, bf16):
    # precision="fp32" on a GPU recorded "fp32" in the checkpoint but trained under bf16
    # autocast. The autocast asked for is recorded (a CPU machine cannot run a CUDA one).
    asked = []

    class Recorder:
        def __init__(self, device_type, dtype=None, enabled=True, **kw):
            asked.append((device_type, dtype, enabled))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Recorder)
    model = torch.nn.Linear(3, 2)
    run = types.SimpleNamespace(dev=torch.device("cuda"), meta={"precision": precision},
                                opt=torch.optim.SGD(model.parameters(), lr=0.1),
                                recipe=recipes.RECIPES["paper"])
    train._loss_and_backward(run, model, torch.ones(4, 3), torch.tensor([0, 1, 0, 1]))
    assert [(d, enabled) for d, _, enabled in asked] == [("cuda", bf16)]
    assert all(dtype in (None, torch.bfloat16) for _, dtype, _ in asked)


def test_max_steps_at_the_end_of_an_epoch_keeps_that_epoch_and_takes_no_more_steps(
        toy_root, tmp_path, mlp):
    # 20 images, batch 10: 2 steps an epoch. Epoch 1 is whole at step 2: it is saved, and
    # epoch 2 takes no step.
    res = train.train(_cfg(toy_root, tmp_path, model=mlp, weights="random", max_steps=2))
    assert (res["epochs"], res["steps"], res["stopped"]) == (1, 2, "max_steps")
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["epoch"] == 1


def test_max_steps_at_the_end_of_an_epoch_saves_it_between_eval_every_saves(
        toy_root, tmp_path, mlp):
    # 2 steps an epoch; max_steps=4 ends epoch 2 exactly. With eval_every=3 epoch 2 was not
    # saved: the run reported 0 epochs and its work was lost.
    res = train.train(_cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=5,
                           eval_every=3, max_steps=4))
    assert (res["epochs"], res["steps"], res["stopped"]) == (2, 4, "max_steps")
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["epoch"] == 2


def test_resuming_in_another_precision_is_refused(toy_root, tmp_path, mlp):
    # A run saved in fp32 went on under bf16 autocast without a word: it no longer ended
    # where an uninterrupted run would, and its checkpoint said bf16 for every epoch.
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1, precision="fp32")
    train.train(cfg)
    with pytest.raises(UserError, match=r"^\S*state\.pt was trained in fp32 and cannot "
                                        r"continue in bf16; valid: precision=fp32 to resume"):
        train.train(dataclasses.replace(cfg, epochs=2, precision="bf16"))
    assert train.train(dataclasses.replace(cfg, epochs=2))["resumed_from"] == 1


def test_a_finished_run_given_a_new_out_writes_that_checkpoint(toy_root, tmp_path, mlp):
    # The summary named a checkpoint that did not exist (nothing was saved to a new out=).
    train.train(_cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1))
    new = tmp_path / "elsewhere" / "m2.pt"
    res = train.train(_cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1,
                           out=str(new)))
    ck = torch.load(new, weights_only=True)
    old = torch.load(tmp_path / "ck" / "m.pt", weights_only=True)
    assert ck["epochs"] == 1 and ck["test_accuracy"] == res["test_accuracy"]
    for k, v in old["state_dict"].items():
        assert torch.equal(v, ck["state_dict"][k]), k
    (row,) = json.loads((new.parent / "manifest.json").read_text())["checkpoints"]
    assert row["name"] == "m2" and row["sha256"] == sha256_file(new)
    assert [r["epoch"] for r in _log(tmp_path / "run")] == [1]


def _kill_manifest_updates(monkeypatch):
    """Kill a run between its checkpoint's rename and its manifest entry; returns the undo."""
    update = checkpoints.update_manifest

    def killed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "update_manifest", killed)
    return lambda: monkeypatch.setattr(checkpoints, "update_manifest", update)


def test_a_finished_run_killed_before_its_manifest_entry_writes_it_on_the_next_run(
        toy_root, tmp_path, mlp, monkeypatch):
    # Its checkpoint was there, so the rerun saved nothing: the manifest never listed it.
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1)
    train.train(cfg)
    new = tmp_path / "elsewhere" / "m2.pt"
    undo = _kill_manifest_updates(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.train(dataclasses.replace(cfg, out=str(new)))
    undo()
    assert new.is_file() and not (new.parent / "manifest.json").exists()
    train.train(dataclasses.replace(cfg, out=str(new)))
    (row,) = json.loads((new.parent / "manifest.json").read_text())["checkpoints"]
    assert row["name"] == "m2" and row["sha256"] == sha256_file(new) and row["epochs"] == 1


def test_eval_warns_of_a_manifest_entry_of_another_version_of_its_file(
        toy_root, tmp_path, mlp, monkeypatch):
    # Killed after epoch 2's checkpoint, before its entry: the manifest kept epoch 1's
    # accuracy and epochs beside epoch 2's weights, and nothing said so.
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1)
    train.train(cfg)
    undo = _kill_manifest_updates(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.train(dataclasses.replace(cfg, epochs=2))
    undo()
    ev = evaluation.EvalConfig(model=mlp, weights=cfg.out, dataset="cifar10",
                               data_root=str(toy_root), progress=False)
    with pytest.warns(UserWarning, match=r"manifest\.json lists another version of m\.pt "
                      r"\(sha256 \w{12}, the file's \w{12}\): its epochs and metrics are not "
                      r"this file's.*fix: rerun the training command"):
        evaluation.evaluate_model(ev)
    assert train.train(dataclasses.replace(cfg, epochs=2))["epochs"] == 2  # redone: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluation.evaluate_model(ev)


def test_a_second_process_on_the_same_run_is_refused(toy_root, tmp_path, mlp):
    # Two runs of one state (the same command twice, or a restart=True beside a running one)
    # overwrote each other's state, log rows and snapshots. The lock is held as a second
    # process would hold it: flock locks of two open files exclude each other.
    (tmp_path / "run").mkdir()
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1)
    with paths.lock(tmp_path / "run" / "state.pt"):
        with pytest.raises(UserError, match=r"run .* is being trained by another process"):
            train.train(dataclasses.replace(cfg, restart=True))
    assert train.train(cfg)["epochs"] == 1  # released: the run goes on


def test_counts_given_as_numpy_integers_are_plain_ints_after_resolving():
    # epochs=np.int64(3) (a sweep over np.arange) was refused as "not an integer", and a
    # numpy weights_seed crashed the first save, after an epoch of training (JSON manifest).
    counts = dict(epochs=3, batch_size=10, eval_every=2, seed=1, weights_seed=2, max_steps=5)
    cfg, _ = train._resolve(train.TrainConfig(
        model="vit_cifar", **{k: np.int64(v) for k, v in counts.items()}))
    assert {k: getattr(cfg, k) for k in counts} == counts
    assert all(type(getattr(cfg, k)) is int for k in counts)


@pytest.mark.parametrize("kw, match", [
    ({"weights_seed": 1.5}, r"^weights_seed=1\.5 is no seed"),
    ({"weights_seed": "3"}, r"^weights_seed='3' is no seed"),
    ({"weights_seed": -1}, r"^weights_seed=-1 is no seed"),
    ({"weights_seed": True}, r"^weights_seed=True is no seed"),
    ({"max_steps": 1.5}, r"^max_steps=1\.5 is not an integer"),
    ({"max_steps": "3"}, r"^max_steps='3' is not an integer"),
    ({"max_steps": -1}, r"^max_steps=-1 is negative"),
    ({"lr": "1e-3"}, r"^lr='1e-3' is not a number"),
    ({"train_fraction": "0.5"}, r"^train_fraction='0\.5' is not a number"),
    ({"time_limit": "5"}, r"^time_limit='5' is not a number"),
    # refused at the first save, after an epoch of training, as batch_size=...
    ({"eval_batch_size": 0}, r"^eval_batch_size=0 is not positive"),
    ({"eval_batch_size": 2.5}, r"^eval_batch_size=2\.5 is not an integer"),
])
def test_settings_of_the_wrong_type_are_refused_in_one_line(kw, match):
    # weights_seed=1.5 or "3" trained (torch.manual_seed truncates) and recorded the odd
    # value; max_steps=1.5 and the strings raised TypeErrors.
    with pytest.raises(UserError, match=match):
        train._resolve(train.TrainConfig(model="vit_cifar", **kw))


def test_a_run_dir_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "run").write_text("not a folder")  # was a FileExistsError traceback
    with pytest.raises(UserError, match=r"^run_dir=\S*run cannot hold the run's files .*"
                                        r"fix: another run_dir=PATH"):
        train.train(train.TrainConfig(model="vit_cifar", run_dir=str(tmp_path / "run")))


def _own_copy(toy_root, tmp_path):
    """A copy of the toy data this test may change."""
    import shutil

    return shutil.copytree(toy_root, tmp_path / "data")


def test_resuming_on_training_images_whose_pixels_changed_is_refused(toy_root, tmp_path, mlp):
    # The same data root with one image replaced: the run went on, silently, on other data.
    root = _own_copy(toy_root, tmp_path)
    cfg = _cfg(root, tmp_path, model=mlp, weights="random", epochs=1)
    train.train(cfg)
    img = root / "cifar10" / "train" / "class3" / "0001.png"
    before = img.read_bytes()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    with pytest.raises(UserError, match=r"^\S*state\.pt was trained on other training images "
                       r"\(20 images as before, other pixels or labels: sha256 \w{12}, now "
                       r"\w{12}\); valid: .*; fix: restart=True"):
        train.train(dataclasses.replace(cfg, epochs=2))
    img.write_bytes(before)
    assert train.train(dataclasses.replace(cfg, epochs=2))["resumed_from"] == 1


def test_resuming_on_a_training_set_with_an_image_added_is_refused(toy_root, tmp_path, mlp):
    root = _own_copy(toy_root, tmp_path)
    cfg = _cfg(root, tmp_path, model=mlp, weights="random", epochs=1)
    train.train(cfg)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(
        root / "cifar10" / "train" / "class3" / "0009.png")
    with pytest.raises(UserError, match=r"other training images \(20 images, now 21\)"):
        train.train(dataclasses.replace(cfg, epochs=2))


def test_a_change_in_the_test_images_alone_does_not_refuse_a_resume(toy_root, tmp_path, mlp):
    # Only what the run trains on is fingerprinted (the test split is scored afresh each save).
    root = _own_copy(toy_root, tmp_path)
    cfg = _cfg(root, tmp_path, model=mlp, weights="random", epochs=1)
    train.train(cfg)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(
        root / "cifar10" / "test" / "class3" / "0001.png")
    assert train.train(dataclasses.replace(cfg, epochs=2))["resumed_from"] == 1


def test_a_state_saved_before_the_training_set_was_fingerprinted_still_resumes(
        toy_root, tmp_path, mlp):
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1)
    train.train(cfg)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state.pop("train_data")["n"] == 20
    torch.save(state, tmp_path / "run" / "state.pt")
    assert train.train(dataclasses.replace(cfg, epochs=2))["resumed_from"] == 1


def test_the_checkpoint_records_the_training_set_fingerprint(toy_root, tmp_path, mlp):
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1)
    train.train(cfg)
    ps = data.load_probe_set("cifar10", "train", data_root=str(toy_root))
    h = hashlib.sha256(np.ascontiguousarray(ps.images).tobytes())
    h.update(ps.labels.astype("<i8").tobytes())
    ck = torch.load(cfg.out, weights_only=True)
    assert ck["data"]["train_sha256"] == h.hexdigest()


def test_rerunning_a_finished_run_with_fewer_epochs_says_it_trained_more(toy_root, tmp_path,
                                                                         mlp):
    # A constant schedule resumes across --epochs, so a run finished at 2 epochs met
    # epochs=1: the summary said 2 epochs done of 1 planned ("2/1 epochs").
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=2)
    train.train(cfg)
    ck_bytes = Path(cfg.out).read_bytes()
    manifest = (tmp_path / "ck" / "manifest.json").read_text()
    with pytest.warns(UserWarning, match=r"has trained 2 epochs, more than epochs=1; nothing to "
                      r"do; fix: restart=True to train 1 from scratch"):
        res = train.train(dataclasses.replace(cfg, epochs=1))
    assert (res["epochs"], res["epochs_planned"], res["finished_before"]) == (2, 2, True)
    assert res["steps"] == 2 * math.ceil(10 * N_TRAIN / BATCH)  # no step taken
    assert Path(cfg.out).read_bytes() == ck_bytes
    assert (tmp_path / "ck" / "manifest.json").read_text() == manifest


def test_a_second_run_writing_the_same_out_at_once_is_refused(toy_root, tmp_path, mlp):
    # Two runs of other settings (two run_dirs) given one out=: the second's fresh start
    # deleted the first's snapshots, and each overwrote the other's checkpoint and entry.
    cfg = _cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1)
    other = dataclasses.replace(cfg, seed=1, run_dir=str(tmp_path / "run2"))
    with paths.lock(cfg.out):  # as the first run holds it
        with pytest.raises(UserError, match=r"^out=\S*m\.pt is being written by another run; "
                           r"valid: one run per out; fix: .*another out=PATH"):
            train.train(other)
    assert not (tmp_path / "run2").exists()
    assert train.train(other)["epochs"] == 1  # released: the run goes on


def test_a_run_refused_before_any_work_leaves_no_folder_holding_its_locks(tmp_path, mlp,
                                                                         monkeypatch):
    # out=DIR/m.pt with run_dir=DIR: the run_dir folder held both lock files after the refusal.
    monkeypatch.setenv("REPSIM_OFFLINE", "1")
    with pytest.raises(UserError, match="no cifar10 train data"):
        train.train(train.TrainConfig(model=mlp, weights="random", progress=False,
                                      data_root=str(tmp_path / "none"),
                                      out=str(tmp_path / "d" / "m.pt"),
                                      run_dir=str(tmp_path / "d")))
    assert not (tmp_path / "d").exists()


def test_an_out_that_is_a_folder_is_refused_before_any_training(toy_root, tmp_path, mlp,
                                                                 monkeypatch):
    # out=checkpoints/ (a folder, as for --run-dir): the run trained a whole epoch, then
    # failed to write its checkpoint over the folder.
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr(train, "_train_epoch", lambda *a: pytest.fail("trained"))
    with pytest.raises(UserError, match=r"^out=\S*folder is a folder; valid: the checkpoint's "
                       r"file path, e.g. \S*folder/train_mlp_test\.pt"):
        train.train(_cfg(toy_root, tmp_path, model=mlp, weights="random", epochs=1,
                         out=str(tmp_path / "folder")))


def test_a_state_saved_on_mps_is_resumed_on_mps_not_refused_as_cpu(tmp_path, monkeypatch):
    # The rng held no CUDA state, so an MPS run's state read as "saved on cpu": every resume
    # with device=mps was refused ("valid: device=cpu"), and its dropout state was not kept.
    mps_state = torch.arange(8, dtype=torch.uint8)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: mps_state)
    rng = checkpoints.get_rng(torch.Generator(), torch.device("mps"))
    assert torch.equal(rng["mps"], mps_state)
    checkpoints.check_state({"rng": rng}, tmp_path / "state.pt", "mps", "fp32", "random", None)
    with pytest.raises(UserError, match=r"saved on mps and cannot continue on cpu; "
                       r"valid: device=mps to resume"):
        checkpoints.check_state({"rng": rng}, tmp_path / "state.pt", "cpu", "fp32", "random",
                                None)
