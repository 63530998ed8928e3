"""Activation stores and `repsim extract`: hooks, round-trip, resume, IDs, errors, torchrun."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from repsim import models
from repsim.errors import UserError
from repsim.extraction import ExtractConfig, extract
from repsim.registry import get_spec
from repsim.store import Store, StoreWriter, partial_path


def cfg(tmp_path, cifar_root, **kw):
    base = dict(model="vit_cifar", weights="random", dataset="cifar10", data_root=str(cifar_root),
                n=None, batch_size=6, out=str(tmp_path / "s.h5"), progress=False, device="cpu")
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture
def tiny(monkeypatch):
    """A registered two-layer MLP ("tiny_x", layers "1" and "2"): extractions in milliseconds,
    for tests of the store's bookkeeping rather than of a model's activations."""
    from torch import nn

    from repsim import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model("tiny_x", input_size=4)(lambda num_classes: nn.Sequential(
        nn.Flatten(), nn.Linear(48, 5), nn.Linear(5, num_classes)))
    return "tiny_x"


# ------------------------------------------------------------------ store


def test_store_round_trip_keeps_model_layer_order(tmp_path):
    names = [f"blocks.{i}" for i in range(12)]  # HDF5 would sort blocks.10 before blocks.2
    ids, labels = np.arange(10) * 3, np.arange(10) % 2
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, ids, labels, batch_size=4)
    data = {k: np.random.default_rng(i).standard_normal((10, 3)).astype(np.float32)
            for i, k in enumerate(names)}
    w.create_layers({k: 3 for k in names}, "float32", 4, None)
    for j, (a, b) in enumerate(w.bounds):
        w.write(j, {k: v[a:b] for k, v in data.items()})
    w.finish()
    with Store(tmp_path / "s.h5") as s:
        assert s.layers == names
        np.testing.assert_array_equal(s.ids, ids)
        np.testing.assert_array_equal(s.labels, labels)
        for k in names:
            np.testing.assert_array_equal(s[k][:], data[k])


def test_a_finished_store_is_on_disk_before_it_gets_its_final_name(tmp_path, monkeypatch):
    # After a power loss, a store under its final name must hold every batch written.
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", os.path.basename(b)))
                        or replace(a, b))
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, np.arange(2), np.zeros(2), 2)
    w.create_layers({"x": 1}, "float32", 2, None)
    w.write(0, {"x": np.ones((2, 1), np.float32)})
    events.clear()  # the journal's own writes
    w.finish()
    assert events == ["fsync", ("rename", "s.h5")]


def test_a_batch_is_on_the_disk_before_the_journal_vouches_for_it(tmp_path, monkeypatch):
    # The journal entry was flushed to the page cache right after the data, never synced: a
    # power loss could keep the entry and lose the rows, and the resumed store then looked
    # complete with zeros in them.
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, np.arange(4), np.zeros(4), 2)
    w.create_layers({"x": 1}, "float32", 2, None)
    journal_at_sync = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: journal_at_sync.append(
        w._f["batches_done"][:].tolist()) or fsync(fd))
    w.write(1, {"x": np.ones((2, 1), np.float32)})
    assert journal_at_sync[:1] == [[False, False]]  # the rows synced before the entry exists
    w.close()


def test_incomplete_store_is_refused_with_resume_hint(tmp_path):
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, np.arange(4), np.zeros(4), 2)
    w.close()
    with pytest.raises(UserError, match="incomplete.*resume"):
        Store(tmp_path / "s.h5")


def test_corrupt_store_is_refused(tmp_path):
    (tmp_path / "s.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(UserError, match="is not a repsim store"):
        Store(tmp_path / "s.h5")


def test_a_users_own_file_as_out_is_not_called_deletable(tmp_path, cifar_root):
    readme = tmp_path / "README.md"
    readme.write_text("# my notes\n")
    with pytest.raises(UserError, match="README.md is not a repsim store") as e:
        extract(cfg(tmp_path, cifar_root, dataset="cifar10", out=str(readme)))
    assert "delete" not in str(e.value) and "overwrite" not in str(e.value)
    assert readme.read_text() == "# my notes\n"


@pytest.mark.parametrize("content", [b"# my notes\n", None])
def test_overwrite_replaces_stores_only_never_a_users_own_file(tmp_path, cifar_root, content):
    # --overwrite deleted whatever --out named (a typo'd notes file, the user's own HDF5 data)
    # and wrote a store in its place.
    own = tmp_path / "mine.h5"
    if content is None:
        with h5py.File(own, "w") as f:
            f["x"] = np.arange(3)
        content = own.read_bytes()
    else:
        own.write_bytes(content)
    with pytest.raises(UserError, match="is not a repsim store, so overwrite=True does not"):
        extract(cfg(tmp_path, cifar_root, out=str(own), overwrite=True))
    assert own.read_bytes() == content


# ------------------------------------------------------------------ extraction


def test_vit_store_equals_timm_forward_intermediates(tmp_path, cifar_root):
    res = extract(cfg(tmp_path, cifar_root))
    model, _ = models.load_model("vit_cifar", "random", seed=0)
    from repsim.data import load_probe_set

    probe = load_probe_set("cifar10", "test", data_root=cifar_root)
    x = models.preprocess(get_spec("vit_cifar"), torch.from_numpy(probe.images))
    with torch.inference_mode():
        inter = model.forward_intermediates(x, intermediates_only=True, norm=False,
                                            output_fmt="NLC", return_prefix_tokens=True)
    with Store(res["path"]) as s:
        assert s.layers == ["embed"] + [f"blocks.{i}" for i in range(6)]
        for i in range(6):
            patches, prefix = inter[i]
            want = torch.cat([prefix, patches], 1).flatten(1).numpy()
            np.testing.assert_allclose(s[f"blocks.{i}"][:], want, rtol=1e-5, atol=1e-5)


def test_resnet_stage_outputs_equal_manual_forward(tmp_path, cifar_root):
    res = extract(cfg(tmp_path, cifar_root, model="resnet18_cifar", reduce="mean"))
    m, _ = models.load_model("resnet18_cifar", "random", seed=0)
    from repsim.data import load_probe_set

    probe = load_probe_set("cifar10", "test", data_root=cifar_root)
    x = models.preprocess(get_spec("resnet18_cifar"), torch.from_numpy(probe.images))
    with torch.inference_mode():
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        want = {"stem": h}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(m, name)(h)
            want[name] = h
    with Store(res["path"]) as s:
        assert s.layers == list(want)
        for k, v in want.items():
            np.testing.assert_allclose(s[k][:], v.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-5)


def test_store_records_provenance(tmp_path, cifar_root):
    res = extract(cfg(tmp_path, cifar_root, reduce="cls", n=7, seed=3))
    with Store(res["path"]) as s:
        meta = s.meta
        assert meta["model"] == "vit_cifar" and meta["reduce"] == "cls"
        assert meta["weights"]["weights"] == "random"
        assert meta["data"]["n"] == 7 and meta["data"]["seed"] == 3
        assert meta["preprocessing"]["input_size"] == 32
        assert meta["layers"] == s.layers and meta["dtype"] == "float32"
        assert s["blocks.0"].shape == (7, 512)


def test_sample_ids_are_deterministic(tmp_path, cifar_root):
    a = extract(cfg(tmp_path, cifar_root, n=8, seed=1, reduce="mean", out=str(tmp_path / "a.h5")))
    b = extract(cfg(tmp_path, cifar_root, n=8, seed=1, reduce="mean", out=str(tmp_path / "b.h5")))
    c = extract(cfg(tmp_path, cifar_root, n=8, seed=2, reduce="mean", out=str(tmp_path / "c.h5")))
    with Store(a["path"]) as sa, Store(b["path"]) as sb, Store(c["path"]) as sc:
        np.testing.assert_array_equal(sa.ids, sb.ids)
        np.testing.assert_array_equal(sa["blocks.3"][:], sb["blocks.3"][:])
        assert not np.array_equal(sa.ids, sc.ids)
        assert np.all(np.diff(sa.ids) > 0)


def test_weights_seed_changes_the_weights_not_the_images(tmp_path, cifar_root):
    runs = [extract(cfg(tmp_path, cifar_root, n=8, seed=1, reduce="mean", weights_seed=w,
                        out=None)) for w in (0, 1)]
    assert runs[0]["path"] != runs[1]["path"]  # two stores, neither replaces the other
    with Store(runs[0]["path"]) as a, Store(runs[1]["path"]) as b:
        np.testing.assert_array_equal(a.ids, b.ids)
        assert (a.meta["weights"]["seed"], b.meta["weights"]["seed"]) == (0, 1)
        assert not np.allclose(a["blocks.3"][:], b["blocks.3"][:])


def test_complete_store_with_same_provenance_is_reused(tmp_path, cifar_root):
    first = extract(cfg(tmp_path, cifar_root, reduce="mean"))
    again = extract(cfg(tmp_path, cifar_root, reduce="mean"))
    assert not first["reused"] and again["reused"]


def test_different_provenance_needs_overwrite(tmp_path, cifar_root, capsys):
    from repsim import cli

    extract(cfg(tmp_path, cifar_root, reduce="mean"))
    with pytest.raises(UserError, match="overwrite=True"):
        extract(cfg(tmp_path, cifar_root, reduce="cls"))
    assert cli.main(["extract", "--model", "vit_cifar", "--weights", "random", "--dataset",
                     "cifar10", "--data-root", str(cifar_root), "--reduce", "cls", "--out",
                     str(tmp_path / "s.h5")]) == 1
    assert "pass --overwrite" in capsys.readouterr().err  # the CLI says it as a flag
    res = extract(cfg(tmp_path, cifar_root, reduce="cls", overwrite=True))
    with Store(res["path"]) as s:
        assert s.meta["reduce"] == "cls"


def test_edited_image_folder_gets_a_new_store_not_the_stale_one(tmp_path):
    # Sample IDs are positions, so replacing an image under the same name kept the key and
    # the old activations were reused.
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(4):
        Image.new("RGB", (32, 32), (60 * k, 100, 7)).save(folder / f"{k}.png")
    run = ExtractConfig(model="resnet18_cifar", weights="random", dataset=f"imagefolder:{folder}",
                        layers="stem", reduce="mean", progress=False, device="cpu")
    first = extract(run)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "0.png")
    second = extract(run)
    assert not second["reused"] and second["path"] != first["path"]
    with Store(first["path"]) as a, Store(second["path"]) as b:
        assert not np.array_equal(a["stem"][0], b["stem"][0])
        np.testing.assert_array_equal(a["stem"][1:], b["stem"][1:])
    assert extract(run)["reused"]  # unchanged images still find their store


def test_float16_storage(tmp_path, cifar_root):
    res = extract(cfg(tmp_path, cifar_root, reduce="mean", dtype="float16"))
    with Store(res["path"]) as s:
        assert s["blocks.0"].dtype == np.float16


def test_cls_reduction_on_resnet_is_refused(tmp_path, cifar_root):
    with pytest.raises(UserError, match="reduce='cls'"):
        extract(cfg(tmp_path, cifar_root, model="resnet18_cifar", reduce="cls"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model,reduce", [("vit_cifar", "flatten"), ("vit_cifar", "mean"),
                                          ("resnet18_cifar", "flatten")])
def test_cuda_extraction_gives_the_cpu_activations(tmp_path, cifar_root, model, reduce):
    # extract() runs float32 on CUDA (no autocast), but cuDNN computes float32 convolutions in
    # TF32 by default (10-bit mantissa: ~1e-3 relative per conv, compounding over ResNet-18's
    # convs; TF32 matmuls too, should a caller enable them). So each layer is compared to 1 %
    # of its largest value: rows out of order, a lost batch or a stale buffer are off by far
    # more. 20 images in batches of 6: the writer thread has batches in flight.
    res = {dev: extract(cfg(tmp_path, cifar_root, model=model, reduce=reduce, device=dev,
                            out=str(tmp_path / f"{dev}.h5"))) for dev in ("cpu", "cuda")}
    with Store(res["cpu"]["path"]) as cpu, Store(res["cuda"]["path"]) as gpu:
        assert gpu.layers == cpu.layers
        np.testing.assert_array_equal(gpu.ids, cpu.ids)
        for k in cpu.layers:
            want = cpu[k][:]
            np.testing.assert_allclose(gpu[k][:], want, rtol=0, atol=1e-2 * np.abs(want).max(),
                                       err_msg=k)


def test_unknown_layer_lists_close_matches(tmp_path, cifar_root):
    with pytest.raises(UserError, match="blocks.1"):
        extract(cfg(tmp_path, cifar_root, layers="blocks.1x"))


def test_hooks_are_removed_after_extraction(tmp_path, cifar_root):
    extract(cfg(tmp_path, cifar_root, reduce="mean"))
    # extract loads its own model; check the capture mechanism directly on a fresh one.
    from repsim.hooks import capture

    m = models.build_model("vit_cifar")
    with capture(m, ["blocks.0"], "mean") as cap:
        assert len(m.blocks[0]._forward_hooks) == 1
        m(torch.zeros(2, 3, 32, 32))
    assert cap.outputs["blocks.0"].shape == (2, 512)
    assert len(m.blocks[0]._forward_hooks) == 0


# ------------------------------------------------------------------ resume and scale-out


def _cli(args, env=None, **kw):
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "repsim", *args], env=e, capture_output=True,
                          text=True, **kw)


def _args(root, out, *extra):
    return ["extract", "--model", "vit_cifar", "--weights", "random", "--dataset", "cifar10",
            "--data-root", str(root), "--batch-size", "4", "--reduce", "mean", "--device", "cpu",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cifar_root):
    """The store of one uninterrupted single-process `repsim extract` with :func:`_args`: the
    reference of the resume and torchrun tests, made once (a CLI start costs seconds)."""
    d = tmp_path_factory.mktemp("uninterrupted")
    out = d / "ref.h5"
    # Module scope runs before each test's private cache is set: give it its own.
    r = _cli(_args(cifar_root, out), env={"REPSIM_CACHE": str(d / "cache"),
                                          "REPSIM_CHECKPOINTS": str(d / "checkpoints")})
    assert r.returncode == 0, r.stderr
    return out


def _assert_rerun_resumes_to_an_uninterrupted_store(cifar_root, out, ref):
    """Rerun the interrupted extraction into ``out``: it resumes, and equals ``ref``, a fresh
    run's store."""
    r = _cli(_args(cifar_root, out, "--json"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed"] is True
    with Store(out) as a, Store(ref) as b:
        assert a.layers == b.layers
        for k in a.layers:
            np.testing.assert_array_equal(a[k][:], b[k][:])


def test_resume_after_kill_gives_identical_store(tmp_path, cifar_root, uninterrupted):
    out = tmp_path / "k.h5"
    # Fault injection: the child SIGKILLs itself right after journalling its 2nd batch.
    r = _cli(_args(cifar_root, out), env={"REPSIM_FAULT_AFTER_BATCHES": "2"})
    assert r.returncode == -signal.SIGKILL
    assert not out.exists() and partial_path(out).exists()
    with h5py.File(partial_path(out), "r") as f:
        assert f["batches_done"][:].sum() == 2
    _assert_rerun_resumes_to_an_uninterrupted_store(cifar_root, out, uninterrupted)


def test_full_disk_is_one_line_and_a_rerun_resumes(tmp_path, cifar_root, file_size_limit,
                                                   uninterrupted):
    out = tmp_path / "full.h5"
    # Rows of 7 layers x 512 floats (14 KiB); each batch first makes room for itself, a chunk
    # per layer and 1 MiB of metadata: this limit lets the first batch of 4 rows in, not the 2nd.
    r = _cli(_args(cifar_root, out, "--json"), preexec_fn=file_size_limit((1 << 20) + 150_000),
             timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert f"cannot write {out}: File too large (needs about " in line and "MiB more" in line
    assert "--out PATH" in line and not out.exists() and partial_path(out).exists()
    _assert_rerun_resumes_to_an_uninterrupted_store(cifar_root, out, uninterrupted)


def test_torchrun_two_gloo_ranks_equal_single_process(tmp_path, cifar_root, uninterrupted):
    single, dist = uninterrupted, tmp_path / "two.h5"
    e = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29533", "-m", "--", "repsim",  # the README's form
                        *_args(cifar_root, dist)],
                       env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with Store(single) as a, Store(dist) as b:
        np.testing.assert_array_equal(a.ids, b.ids)
        for k in a.layers:
            np.testing.assert_array_equal(a[k][:], b[k][:])
    assert not list(tmp_path.glob("two.h5.rank*"))


def test_two_identical_cka_runs_at_once_share_one_store(tmp_path):
    # Both start together: the first extracts the store under its lock, the second waits for
    # it and reuses it (before the lock, the second deleted the first's .partial and one run
    # renamed the other's half-written file into place).
    args = ["cka", "--a", "vit_cifar", "--b", "vit_cifar", "--weights-a", "random",
            "--weights-b", "random", "--n", "64", "--reduce", "mean", "--device", "cpu",
            "--json"]
    e = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, "-m", "repsim", *args], env=e, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [err[-500:] for _, err in outs]
    a, b = (json.loads(out) for out, _ in outs)
    assert a["matrix"] == b["matrix"] and a["inputs"] == b["inputs"]
    assert sum("extracted vit_cifar" in err for _, err in outs) == 1  # made once
    stores = os.listdir(os.path.join(os.environ["REPSIM_CACHE"], "stores"))
    assert len([f for f in stores if f.endswith(".h5")]) == 1 and "partial" not in str(stores)


def test_reader_says_a_store_is_being_written_while_another_holds_its_lock(tmp_path):
    out = tmp_path / "s.h5"
    StoreWriter(out, {"model": "m"}, np.arange(4), np.zeros(4), batch_size=2).close()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from repsim.paths import lock\n"
                               f"with lock({str(out)!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match="being written by another process"):
            Store(out)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(UserError, match="incomplete"):  # the writer died: resume it
        Store(out)


# ------------------------------------------------------------------ CLI errors


def test_cli_unknown_model_is_one_line_exit_1(tmp_path, cifar_root):
    r = _cli(["extract", "--model", "vit_cfiar", "--data-root", str(cifar_root)])
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "vit_cifar" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_data_names_root_and_fixes(tmp_path):
    r = _cli(["extract", "--model", "vit_cifar", "--weights", "random", "--dataset", "cifar10",
              "--data-root", str(tmp_path / "nowhere")], env={"REPSIM_OFFLINE": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert str(tmp_path / "nowhere") in r.stderr


def test_resuming_with_another_batch_size_says_that_is_what_differs(tmp_path):
    meta = {"model": "m", "batch_size": 2}
    StoreWriter(tmp_path / "s.h5", meta, np.arange(4), np.zeros(4), batch_size=2).close()
    with pytest.raises(UserError, match=r"different settings \(batch_size\); pass overwrite"):
        StoreWriter(tmp_path / "s.h5", {**meta, "batch_size": 3}, np.arange(4), np.zeros(4), 3)


def test_a_timm_models_default_tag_is_in_its_store_key(tmp_path):
    # timm:resnet18 means timm's default pretrained tag, which a timm release may change: the
    # key holds the resolved name (from timm's local config registry, no download).
    import timm

    from repsim.extraction import _default_out, _store_key
    from repsim.paths import digest

    default = timm.models.get_pretrained_cfg("resnet18").tag
    other = next(t for t in timm.list_pretrained("resnet18.*") if t != f"resnet18.{default}")

    def where(model):
        c = ExtractConfig(model=model, progress=False)
        key = digest(_store_key(c, get_spec(model), {"images_sha256": "x"}))
        return key, _default_out(c, key)

    assert where("timm:resnet18") == where(f"timm:resnet18.{default}")
    assert where("timm:resnet18")[0] != where(f"timm:{other}")[0]


def test_out_with_a_tilde_is_the_home_folder_not_a_folder_named_tilde(tmp_path, cifar_root,
                                                                      monkeypatch):
    # Like weights=, data_root= and train's out=, a store's out= expands '~': here it finds
    # the store of other settings at $HOME/s.h5 (and stops before running the model).
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    w = StoreWriter(tmp_path / "home" / "s.h5", {"key": "other"}, np.arange(2), np.zeros(2), 2)
    w.create_layers({"x": 1}, "float32", 2, None)
    w.write(0, {"x": np.zeros((2, 1), np.float32)})
    w.finish()
    with pytest.raises(UserError, match=f"{tmp_path / 'home' / 's.h5'} already holds"):
        extract(cfg(tmp_path, cifar_root, out="~/s.h5"))
    assert not (tmp_path / "~").exists()


def test_a_folder_named_like_a_store_is_refused_in_one_line(tmp_path):
    # h5py's errno messages span two lines (they embed a ctime); the CLI prints one.
    (tmp_path / "s.h5").mkdir()
    with pytest.raises(UserError, match="is not a repsim store") as e:
        Store(tmp_path / "s.h5")
    assert "\n" not in str(e.value) and "Is a directory" in str(e.value)


def test_a_kill_while_creating_the_layers_still_resumes(tmp_path):
    # A SIGKILL inside create_layers leaves some layer datasets on disk but no layer_order
    # (reproduced with a real kill); the rerun must create them again, not fail on
    # "name already exists" forever.
    StoreWriter(tmp_path / "s.h5", {"model": "m"}, np.arange(4), np.zeros(4), 2).close()
    with h5py.File(partial_path(tmp_path / "s.h5"), "r+") as f:  # the kill's leftover
        f["layers"].create_dataset("a", shape=(4, 3), dtype="float32")
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, np.arange(4), np.zeros(4), 2)
    assert not w.layers_created
    w.create_layers({"a": 3, "b": 2}, "float32", 2, None)
    for j, (a, b) in enumerate(w.bounds):
        w.write(j, {"a": np.ones((b - a, 3), np.float32), "b": np.ones((b - a, 2), np.float32)})
    w.finish()
    with Store(tmp_path / "s.h5") as s:
        assert s.layers == ["a", "b"] and s["a"][:].sum() == 12


def test_a_weights_file_spelled_another_way_still_resumes(tmp_path):
    # The same key (it holds the file's sha256) is the same store, as for a complete one:
    # ckpt/v.pt after a kill, /abs/ckpt/v.pt on the rerun must resume, not ask to discard.
    def meta(path):
        return {"key": "k1", "model": "vit", "batch_size": 2,
                "weights": {"weights": path, "weights_sha256": "s"}}

    StoreWriter(tmp_path / "s.h5", meta("ckpt/v.pt"), np.arange(4), np.zeros(4), 2).close()
    w = StoreWriter(tmp_path / "s.h5", meta("/abs/ckpt/v.pt"), np.arange(4), np.zeros(4), 2)
    w.close()
    with pytest.raises(UserError, match=r"different settings \(key\)"):  # another key: refused
        StoreWriter(tmp_path / "s.h5", {**meta("ckpt/v.pt"), "key": "k2"}, np.arange(4),
                    np.zeros(4), 2)


@pytest.mark.parametrize("world", [1, 3])
def test_a_rerun_removes_the_shards_of_another_world_size_only(tmp_path, cifar_root, tiny,
                                                                 monkeypatch, world):
    # A torchrun job of 2 ranks killed mid-run leaves s.h5.rank{0,1}of2.partial; rerun with
    # another world size, they were never read nor deleted (each as big as its share).
    from repsim import extraction

    stale = [tmp_path / f"s.h5.rank{r}of2.partial" for r in range(2)]
    kept = [tmp_path / n for n in ("s.h5.rank0of2.partial.bak", "t.h5.rank0of2.partial",
                                   "s.h5.rank0of2", "s.h5.rankXof2.partial", "s.h5.notes")]
    for p in stale + kept:
        p.write_bytes(b"x")
    own = [extraction._shard(tmp_path / "s.h5", r, world) for r in range(world)]
    # Ranks meet at barriers and rank 0 merges; here only rank 0's start is the subject.
    monkeypatch.setattr(extraction, "_barrier", lambda world: None)
    monkeypatch.setattr(extraction, "_merge", lambda out, *a: out.write_bytes(b"merged"))
    monkeypatch.setattr(extraction, "_dist", lambda: (0, world))
    extract(cfg(tmp_path, cifar_root, model=tiny, n=4, layers="1", batch_size=4))
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert world == 1 or partial_path(own[0]).exists()  # this run's own shard: kept


def _two_layer_store(path):
    w = StoreWriter(path, {"model": "m"}, np.arange(2), np.zeros(2), 2)
    w.create_layers({"x.0": 1, "x.1": 2}, "float32", 2, None)
    w.write(0, {"x.0": np.zeros((2, 1), np.float32), "x.1": np.ones((2, 2), np.float32)})
    return w.finish()


def test_store_features_of_no_layers_is_refused_not_every_layer(tmp_path):
    # features([]) returned all layers: an empty selection read as "no selection".
    with Store(_two_layer_store(tmp_path / "s.h5")) as s:
        with pytest.raises(UserError, match=r"layers=\[\] names no layer; valid: .*x\.0, x\.1"):
            s.features([])


def test_store_features_of_one_name_as_a_string_is_that_layer(tmp_path):
    # features("x.1") iterated the string's characters: "layer 'x' is not in s.h5".
    with Store(_two_layer_store(tmp_path / "s.h5")) as s:
        assert list(s.features("x.1")) == ["x.1"]


def test_reusing_a_complete_store_removes_its_leftover_shards(tmp_path, cifar_root, tiny):
    # A kill after rank 0's merge renamed the store into place, before it deleted the shards:
    # every later run reused the store and the shards stayed.
    run = cfg(tmp_path, cifar_root, model=tiny, n=4, layers="1", batch_size=4)
    extract(run)
    stale = [tmp_path / f"s.h5.rank{r}of2.partial" for r in range(2)]
    for p in stale:
        p.write_bytes(b"x")
    assert extract(run)["reused"]
    assert not any(p.exists() for p in stale)


@pytest.mark.parametrize("batch_size", [2.5, True, "8"])
def test_a_batch_size_that_is_not_a_positive_integer_is_one_user_error(tmp_path, cifar_root,
                                                                        tiny, batch_size):
    # 2.5 raised range()'s TypeError after loading the model; True ran as batches of 1.
    with pytest.raises(UserError, match=f"batch_size={batch_size!r} is not valid"):
        extract(cfg(tmp_path, cifar_root, model=tiny, n=4, layers="1", batch_size=batch_size))


@pytest.mark.parametrize("chunk_rows", [-3, 0, 2.5])
def test_chunk_rows_that_is_not_a_positive_integer_is_one_user_error(tmp_path, cifar_root, tiny,
                                                                      chunk_rows):
    # -3 became chunks of 1 row and 0 the default, silently.
    with pytest.raises(UserError, match=f"chunk_rows={chunk_rows!r} is not valid"):
        extract(cfg(tmp_path, cifar_root, model=tiny, n=4, layers="1", chunk_rows=chunk_rows))


def test_atomic_write_never_loosens_the_umask_other_threads_share(tmp_path, monkeypatch):
    # It set the umask to 0 and back to read it: a file another thread (the store writer, a
    # user's) created meanwhile was world-writable.
    from repsim import paths

    umask, set_to = os.umask(0o022), []
    os.umask(umask)
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda m: set_to.append(m) or real(m))
    paths.write_text(tmp_path / "x.txt", "hi")
    assert all(m & 0o077 == 0o077 for m in set_to), set_to
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    # A writer killed with -9 mid-write (a training state: gigabytes) left its temporary file
    # beside the target for good. A writer still alive keeps its own.
    code = ("import sys, time; from repsim import paths; paths.atomic_write(sys.argv[1], "
            "lambda t: (open(t, 'w').write('half'), print('ready', flush=True), time.sleep(60)))")
    target = tmp_path / "state.pt"

    def writer():
        p = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "ready"
        return p

    dead, alive = writer(), writer()
    try:
        dead.kill()
        dead.wait()
        assert len(list(tmp_path.glob(".state.*"))) == 2
        from repsim import paths
        paths.write_text(target, "whole")
        left = list(tmp_path.glob(".state.*"))
        assert len(left) == 1 and str(alive.pid) in left[0].name
        assert target.read_text() == "whole"
    finally:
        alive.kill()
        alive.wait()


def test_a_store_path_with_a_tilde_is_read_from_the_home_folder(tmp_path, monkeypatch):
    # Store("~/s.h5") said "no store at ~/s.h5; extract one first", though extract(out=) and
    # every other path argument expand '~'.
    monkeypatch.setenv("HOME", str(tmp_path))
    _two_layer_store(tmp_path / "s.h5")
    with Store("~/s.h5") as s:
        assert s.layers == ["x.0", "x.1"]


def test_a_reused_stores_summary_has_every_key_of_a_written_ones(tmp_path, cifar_root, tiny):
    # The reuse summary lacked "resumed": res["resumed"] was a KeyError after a reuse.
    run = cfg(tmp_path, cifar_root, model=tiny, n=4, layers="1", batch_size=4)
    first, again = extract(run), extract(run)
    assert set(again) == set(first) and again["resumed"] is False and again["reused"] is True


def test_a_partial_store_missing_its_structure_starts_over(tmp_path):
    # A kill while the file was being laid out (before the "layers" group) left a partial
    # that passed the resume checks; opening its layers then raised KeyError on every rerun.
    path = partial_path(tmp_path / "s.h5")
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "repsim-activations/1", "complete": False,
                        "provenance": json.dumps({"model": "m"})})
        f["ids"], f["labels"] = np.arange(4), np.zeros(4, np.int64)
        f["batches_done"] = np.zeros(2, bool)
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, np.arange(4), np.zeros(4), 2)
    assert w.pending() == [0, 1] and not w.resumed
    w.create_layers({"x": 1}, "float32", 2, None)
    w.close()


def test_a_stores_versions_name_the_libraries_that_built_its_model(tmp_path, cifar_root, tiny):
    # Only repsim's and torch's were recorded, yet timm and torchvision build the models (and
    # their random initialisation) and h5py and numpy write the rows.
    from importlib.metadata import version

    res = extract(cfg(tmp_path, cifar_root, model=tiny, n=4, layers="1", batch_size=4))
    with Store(res["path"]) as s:
        got = s.meta["versions"]
    assert {k: got.get(k) for k in ("timm", "torchvision", "h5py", "numpy")} == {
        k: version(k) for k in ("timm", "torchvision", "h5py", "numpy")}


def test_rank_0_merges_under_the_stores_lock(tmp_path, cifar_root, tiny, monkeypatch):
    # Under torchrun no rank took the lock a single-process run of the same store writes
    # under: rank 0's merge could resume that run's FILE.h5.partial while it was being written
    # (two writers on one HDF5 file).
    from repsim import extraction
    from repsim.paths import locked

    out, seen = tmp_path / "s.h5", []

    def merge(out, *args):
        seen.append(locked(out))
        out.write_bytes(b"merged")

    monkeypatch.setattr(extraction, "_barrier", lambda world: None)
    monkeypatch.setattr(extraction, "_merge", merge)
    monkeypatch.setattr(extraction, "_dist", lambda: (0, 2))
    extract(cfg(tmp_path, cifar_root, model=tiny, n=4, layers="1", batch_size=4))
    assert seen == [True] and not locked(out)


def test_a_store_is_a_feature_set_itself(tmp_path):
    # cka_matrix(store, store) said "layer 'a[0]' has shape ()": the Store's layer names were
    # taken for matrices.
    from repsim.features import feature_set

    with Store(_two_layer_store(tmp_path / "s.h5")) as s:
        names, mats, n = feature_set(s, "a")
        assert names == ["x.0", "x.1"] and n == 2 and [m.shape for m in mats] == [(2, 1), (2, 2)]


class _Scale(torch.nn.Module):
    def forward(self, x):
        return x * 1e6


def test_float16_storage_of_values_beyond_its_range_is_refused_not_stored_as_inf(
        tmp_path, cifar_root, monkeypatch):
    # Activations above 65504 became inf in a float16 store, silently; CKA refused the store
    # only later ("non-finite values"), after the whole extraction.
    from torch import nn

    from repsim import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model("tiny_big", input_size=4)(lambda num_classes: nn.Sequential(
        nn.Flatten(), nn.Linear(48, 5), _Scale(), nn.Linear(5, num_classes)))
    with pytest.raises(UserError, match=r"layer '2' has values beyond float16's range .*"
                                        r"dtype='float32'"):
        extract(cfg(tmp_path, cifar_root, model="tiny_big", n=4, layers="2", dtype="float16"))


@pytest.mark.parametrize("a,b", [(None, "default"), (None, ["default"]), ("1,2", ["2", "1"]),
                                 (" 1 , 2", ["1", "2", "1"])])
def test_spellings_of_one_layer_request_share_one_content_address(a, b):
    # The request was hashed as given, so layers=None and 'default', or '1,2' and ['2', '1']
    # (the same layers, in model order either way) made and stored the same store twice.
    from repsim.extraction import _store_key
    from repsim.paths import digest

    def key(layers):
        c = ExtractConfig(model="vit_cifar", weights="random", layers=layers, progress=False)
        return digest(_store_key(c, get_spec("vit_cifar"), {"images_sha256": "x"}))

    assert key(a) == key(b)
    assert key("1") != key("1,2")


def test_a_store_an_older_extractor_filled_is_not_reused(tmp_path, cifar_root, tiny,
                                                        monkeypatch):
    # The key held the inputs only: after a fix to what stores hold (a layer output that a
    # later in-place op rewrote, 5e4de78), the wrong stores of the same inputs were reused.
    from repsim import extraction

    first = extract(cfg(tmp_path, cifar_root, model=tiny, out=None))
    monkeypatch.setattr(extraction, "CONTENT_VERSION", extraction.CONTENT_VERSION + 1)
    again = extract(cfg(tmp_path, cifar_root, model=tiny, out=None))
    assert not again["reused"] and again["path"] != first["path"]


def test_n_none_and_n_of_every_image_are_one_store(tmp_path, cifar_root, tiny):
    # The same images and key, but the file name said n=None as 'nall' and n=20 as 'n20':
    # two paths, so the second run extracted again and kept a second copy.
    first = extract(cfg(tmp_path, cifar_root, model=tiny, out=None, n=None))
    again = extract(cfg(tmp_path, cifar_root, model=tiny, out=None, n=20))
    assert again["reused"] and again["path"] == first["path"]
    assert "-n20-" in os.path.basename(first["path"])


def test_overwrite_replaces_a_store_of_another_format_version(tmp_path, cifar_root, tiny):
    # A store repsim wrote in an older format is refused by readers, and overwrite=True called
    # it "not a repsim store" and refused to replace it: no way out but deleting it by hand.
    c = cfg(tmp_path, cifar_root, model=tiny)
    extract(c)
    with h5py.File(c.out, "r+") as f:
        f.attrs["format"] = "repsim-activations/0"
    with pytest.raises(UserError, match="format"):
        extract(c)
    c.overwrite = True
    assert not extract(c)["reused"]
    with Store(c.out) as s:
        assert s.n == 20


def test_a_damaged_store_at_its_content_address_is_made_again(tmp_path, cifar_root, tiny):
    # A truncated cache file (an interrupted copy of the cache) stopped every later run of
    # the same extraction with "not a repsim store ... check the path", a path the user never
    # gave: repsim's own cache entry is made again, with a warning saying so.
    c = cfg(tmp_path, cifar_root, model=tiny, out=None)
    path = extract(c)["path"]
    with Store(path) as s:
        want = s["1"][:]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.warns(RuntimeWarning, match="made again"):
        res = extract(c)
    assert res["path"] == path and not res["reused"]
    with Store(path) as s:
        np.testing.assert_array_equal(s["1"][:], want)


def test_numpy_integers_as_counts_and_seeds_are_those_integers(tmp_path, cifar_root, tiny):
    # seed=np.int64(1) (a loop over np.arange) passed validation, then the store's provenance
    # failed to serialise: TypeError "Object of type int64 is not JSON serializable".
    plain = extract(cfg(tmp_path, cifar_root, model=tiny, out=None, n=10, seed=1,
                        weights_seed=2, batch_size=4))
    numpy = extract(cfg(tmp_path, cifar_root, model=tiny, out=None, n=np.int64(10),
                        seed=np.int64(1), weights_seed=np.int64(2), batch_size=np.int64(4)))
    assert numpy["reused"] and numpy["path"] == plain["path"]


@pytest.mark.parametrize("get", [lambda s: s[0], lambda s: s.features(0),
                                 lambda s: s.features(1), lambda s: s.features([0])])
def test_a_layer_given_as_a_number_is_one_user_error_naming_the_string(tmp_path, get):
    # An nn.Sequential's layers are named "0", "1", ...: store[0] raised TypeError ('int'
    # object is not iterable), features(0) said "names no layer", features(1) a TypeError.
    ids = np.arange(4)
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, ids, ids % 2, batch_size=4)
    w.create_layers({"0": 2, "1": 3}, "float32", 4, None)
    w.write(0, {"0": np.zeros((4, 2), np.float32), "1": np.ones((4, 3), np.float32)})
    w.finish()
    with Store(tmp_path / "s.h5") as s, pytest.raises(UserError, match=r"names are strings"):
        get(s)


def test_a_truncated_store_is_called_truncated_not_another_kind_of_file(tmp_path):
    # An interrupted copy of a store was "not a repsim store ... fix: check the path", and the
    # path was right: it says the file is cut short and how to get a whole one.
    path = _two_layer_store(tmp_path / "s.h5")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UserError, match=r"s\.h5 is cut short .*copy it again or extract it again"):
        Store(path)


def test_a_store_is_found_by_its_key_however_its_name_was_spelled(tmp_path, cifar_root, tiny):
    # The file name's readable part follows the spelling (dataset 'CIFAR10' or 'cifar10'),
    # the key does not: the second spelling extracted the same store again under a new name.
    first = extract(cfg(tmp_path, cifar_root, model=tiny, out=None, dataset="CIFAR10"))
    again = extract(cfg(tmp_path, cifar_root, model=tiny, out=None, dataset="cifar10"))
    assert again["reused"] and again["path"] == first["path"]


def test_resuming_after_a_forward_edit_that_changes_a_width_is_one_user_error(
        tmp_path, cifar_root, monkeypatch):
    # forward() code is not in the key (the architecture is): a run stopped after one batch,
    # then resumed with a forward() that slices a layer's output, failed deep in h5py with
    # "TypeError: Can't broadcast (6, 3) -> (6, 6)".
    from torch import nn

    from repsim import extraction, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def register(cut):
        class Net(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.f, self.lin, self.out = nn.Flatten(), nn.Linear(48, 6), nn.Identity()

            def forward(self, x):
                return self.out(self.lin(self.f(x))[:, :cut])

        registry._REGISTRY.pop("edit_x", None)
        registry.register_model("edit_x", input_size=4)(Net)

    def stop(*a):
        raise KeyboardInterrupt

    register(6)
    keep = extraction._maybe_fault
    monkeypatch.setattr(extraction, "_maybe_fault", stop)
    c = cfg(tmp_path, cifar_root, model="edit_x", layers="out")
    with pytest.raises(KeyboardInterrupt):
        extract(c)
    assert partial_path(c.out).exists()
    monkeypatch.setattr(extraction, "_maybe_fault", keep)
    register(3)
    with pytest.raises(UserError, match=r"'out' 6 columns wide, and this run's is 3 .*overwrite="):
        extract(c)


def test_find_store_finds_the_store_extract_would_reuse_without_the_model(tmp_path, cifar_root,
                                                                          tiny, monkeypatch):
    # repsim cka --layers-a X had no way to ask whether a store holding X was there without
    # extract() making the default store (8 GB for vit_imagenet) when it was not.
    from repsim.extraction import find_store

    c = cfg(tmp_path, cifar_root, model=tiny, out=None)
    assert find_store(c) is None
    assert not os.path.exists(os.path.join(os.environ["REPSIM_CACHE"], "stores"))
    made = extract(c)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    found = find_store(c)
    assert found == {**extract(c), "seconds": found["seconds"]} and found["reused"]
    assert found["path"] == made["path"] and found["layers"] == ["0", "1", "2"]


def test_find_store_skips_stores_it_cannot_reuse(tmp_path, cifar_root, tiny):
    from repsim.extraction import find_store

    c = cfg(tmp_path, cifar_root, model=tiny, layers="1")
    extract(c)
    assert find_store(c)["path"] == c.out
    assert find_store(replace(c, layers="2")) is None  # another store at out=: not this one
    assert find_store(replace(c, overwrite=True)) is None  # extract would make it again
    with open(c.out, "r+b") as f:
        f.truncate(os.path.getsize(c.out) // 2)
    assert find_store(c) is None


def test_the_same_images_by_another_spelling_of_their_folder_are_one_store(tmp_path, cifar_root,
                                                                          tiny, monkeypatch):
    # The key held the probe set's source, the data root as spelled: REPSIM_DATA=../data from
    # another folder (or a symlink, or a copy of the tree) extracted the same pixels again.
    first = extract(cfg(tmp_path, cifar_root, model=tiny, out=None))
    monkeypatch.chdir(cifar_root)
    again = extract(cfg(tmp_path, cifar_root, model=tiny, out=None,
                        data_root=os.path.join("..", cifar_root.name)))
    assert again["reused"] and again["path"] == first["path"]


def test_a_seed_with_every_image_is_one_store(tmp_path, cifar_root, tiny):
    # The seed draws no subset when n is the whole split: the same images, the same store.
    first = extract(cfg(tmp_path, cifar_root, model=tiny, out=None, n=None, seed=0))
    again = extract(cfg(tmp_path, cifar_root, model=tiny, out=None, n=None, seed=7))
    assert again["reused"] and again["path"] == first["path"]


def test_a_models_family_is_in_its_default_stores_key(monkeypatch):
    """A registered model's family decides its default layers (children for "other",
    layer1..layer4 for "resnet"), but re-registering it with another family kept the store
    key, so the store of the old default layers was reused for the new default."""
    from torch import nn

    from repsim import registry
    from repsim.extraction import _store_key
    from repsim.paths import digest

    builtin = dict(registry._REGISTRY)

    def key(family):
        monkeypatch.setattr(registry, "_REGISTRY", dict(builtin))
        registry.register_model("fam_x", family=family, input_size=4)(
            lambda num_classes: nn.Linear(48, num_classes))
        c = ExtractConfig(model="fam_x", weights="random", progress=False)
        return digest(_store_key(c, get_spec("fam_x"), {"images_sha256": "x"}))

    assert key("other") != key("resnet")


def test_a_store_another_process_holds_open_for_writing_is_not_called_damaged(
        tmp_path, cifar_root, tiny):
    # HDF5 locks a file open for writing (h5py.File(path, "a") in a notebook): the store was
    # called "not a repsim store (Resource temporarily unavailable) ... check the path", and
    # extract() took it for a damaged cache entry and deleted it to make it again.
    fcntl = pytest.importorskip("fcntl")
    c = cfg(tmp_path, cifar_root, model=tiny, out=None)
    path = extract(c)["path"]
    inode = os.stat(path).st_ino
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as HDF5's writer holds it
        with pytest.raises(UserError, match="open for writing in another process"):
            Store(path)
        with pytest.raises(UserError, match="open for writing in another process"):
            extract(c)
    assert os.stat(path).st_ino == inode


def test_an_unfinished_store_resumes_with_its_images_folder_spelled_another_way(
        tmp_path, cifar_root, tiny, monkeypatch):
    # The key leaves out the data's source (the root as spelled), so a complete store is
    # reused under ../data, but resuming an unfinished one compared the sources and refused:
    # "an unfinished store with different settings (data)".
    from repsim import extraction

    def fail():
        raise RuntimeError("killed")

    keep = extraction._maybe_fault
    monkeypatch.setattr(extraction, "_maybe_fault", fail)
    c = cfg(tmp_path, cifar_root, model=tiny, batch_size=8)
    with pytest.raises(RuntimeError, match="killed"):
        extract(c)
    monkeypatch.setattr(extraction, "_maybe_fault", keep)
    monkeypatch.chdir(cifar_root)
    res = extract(replace(c, data_root=os.path.join("..", cifar_root.name)))
    assert res["resumed"] and not res["reused"]
    whole = extract(replace(c, out=str(tmp_path / "whole.h5")))
    with Store(res["path"]) as a, Store(whole["path"]) as b:
        np.testing.assert_array_equal(a["1"][:], b["1"][:])


def test_a_closed_stores_layer_says_the_store_is_closed(tmp_path):
    # store[name] after the `with` raised h5py's KeyError "Unable to synchronously open object
    # (invalid identifier type to function)".
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, np.arange(2), np.zeros(2), 2)
    w.create_layers({"a": 3}, "float32", 2, None)
    w.write(0, {"a": np.ones((2, 3), np.float32)})
    w.finish()
    with Store(tmp_path / "s.h5") as s:
        pass
    with pytest.raises(UserError, match=r"s\.h5 is closed.*inside the `with"):
        s["a"]


def test_overwrite_of_a_store_another_process_holds_open_says_so(tmp_path, cifar_root, tiny):
    # overwrite=True on a store HDF5 holds locked for writing said "not a repsim store".
    fcntl = pytest.importorskip("fcntl")
    c = cfg(tmp_path, cifar_root, model=tiny, n=4)
    extract(c)
    with open(c.out, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as HDF5's writer holds it
        with pytest.raises(UserError, match="open for writing in another process"):
            extract(replace(c, overwrite=True))
    with Store(c.out) as s:
        assert s.n == 4



@pytest.mark.parametrize("weights", ["", "  "])
def test_empty_weights_is_refused_whether_or_not_the_default_store_is_cached(
        tmp_path, cifar_root, tiny, weights):
    # weights="" (an unset shell variable in --weights "$W") keyed the store as the model's
    # default weights: the cached default store was reused, and without it load_model refused.
    from torch import nn

    from repsim import registry

    registry.register_model("tiny_w", input_size=4, weights="tiny_w.pt")(
        lambda num_classes: nn.Sequential(nn.Flatten(), nn.Linear(48, num_classes)))
    file = registry.default_weights_file(registry.get_spec("tiny_w"))
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(models.build_model("tiny_w", 10, 0).state_dict(), file)
    c = cfg(tmp_path, cifar_root, model="tiny_w", n=4, weights=weights, out=None)
    msg = rf"weights={weights!r} names no weights file; valid: a file or 'random'"
    with pytest.raises(UserError, match=msg):
        extract(c)
    extract(replace(c, weights=None))  # the default store, cached now
    with pytest.raises(UserError, match=msg):
        extract(c)


def test_layers_given_as_a_generator_are_those_layers(tmp_path, cifar_root, tiny):
    # A generator was consumed by the store key, then models.layer_names saw none left.
    c = cfg(tmp_path, cifar_root, model=tiny, n=4)
    res = extract(replace(c, layers=(name for name in ["1", "2"])))
    assert res["layers"] == ["1", "2"]
    assert extract(replace(c, layers=["1", "2"]))["reused"]


@pytest.mark.parametrize("weights", [1, ["s0.pt", "s1.pt"], True])
def test_weights_of_another_type_is_one_user_error(tmp_path, cifar_root, tiny, weights):
    # The store key took weights for a path: Path(1) raised TypeError with a traceback.
    with pytest.raises(UserError, match=r"weights=.* is not usable; valid: a file path, 'random'"):
        extract(cfg(tmp_path, cifar_root, model=tiny, n=4, weights=weights))


@pytest.mark.parametrize("flag", ["overwrite", "progress"])
def test_a_string_for_a_flag_is_one_user_error_not_true(tmp_path, cifar_root, tiny, flag):
    # overwrite="False" (from a config file) read as true and replaced the store.
    c = cfg(tmp_path, cifar_root, model=tiny, n=4)
    extract(c)
    inode = os.stat(c.out).st_ino
    with pytest.raises(UserError, match=rf"{flag}='False' is not a bool; valid: True or False"):
        extract(replace(c, layers="1", **{flag: "False"}))
    assert os.stat(c.out).st_ino == inode


@pytest.mark.parametrize("out", ["", " ", 1])
def test_an_empty_or_non_path_out_is_refused_not_the_content_address(tmp_path, cifar_root,
                                                                    tiny, out):
    # --out "$OUT" with OUT unset wrote the store to $REPSIM_CACHE/stores instead (and out=1
    # raised TypeError with a traceback).
    with pytest.raises(UserError, match=rf"out={out!r} names no file"):
        extract(cfg(tmp_path, cifar_root, model=tiny, n=4, out=out))
    assert not os.path.exists(os.path.join(os.environ["REPSIM_CACHE"], "stores"))


@pytest.mark.parametrize("seed", ["1", 1.5, None, -1])
def test_a_bad_weights_seed_is_named_weights_seed_not_seed(tmp_path, cifar_root, tiny, seed):
    # load_model's check said "seed='1' is not usable": the subset seed=, which was fine.
    with pytest.raises(UserError, match=rf"^weights_seed={seed!r} is not usable; valid: a whole"):
        extract(cfg(tmp_path, cifar_root, model=tiny, n=4, weights_seed=seed))
