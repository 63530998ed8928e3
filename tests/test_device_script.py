"""The rehearsal of the GPU window (issue 13): scripts/device_run.sh --smoke on this CPU.

The script unpacks a packed CIFAR-10 tree, trains both models (keeping snapshots) and the
data-scale ViTs, evaluates, draws the dynamics figure, and packages everything into at
most 8 files of at most 15 MiB. Here it runs on a tiny generated tree, so the script cannot
rot between GPU windows.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "device_run.sh"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny packed CIFAR-10-like tree: 50 train and 3 test JPEGs per class."""
    root = tmp_path_factory.mktemp("device")
    rng = np.random.default_rng(0)
    tree = root / "tree" / "cifar10"
    for split, k in (("train", 50), ("test", 3)):
        for c in range(10):
            d = tree / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(k):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg")
    packed = root / "cifar10.tar.xz"
    with tarfile.open(packed, "w:xz") as tf:
        tf.add(tree, arcname="cifar10")
    return packed


@pytest.fixture(scope="module")
def smoke(packed):
    root = packed.parent
    out, work = root / "out", root / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DEVICE_WORK": str(work),
           "REPSIM_CIFAR_TAR": str(packed), "DEVICE_BENCH": "0"}
    run = subprocess.run(["bash", str(SCRIPT), "--smoke"], env=env, capture_output=True,
                         text=True, timeout=1200)  # stage 3 adds seven short runs
    assert run.returncode == 0, run.stdout + run.stderr
    collect_out = root / "collect"
    collect = subprocess.run(["bash", str(SCRIPT), "--collect"], capture_output=True, text=True,
                             env={**env, "OUT": str(collect_out)}, timeout=120)
    assert collect.returncode == 0, collect.stdout + collect.stderr
    return out, collect_out, root


def _unpack(folder: Path, name: str, dest: Path) -> Path:
    sums = dict(ln.split()[::-1] for ln in (folder / "SHA256SUMS").read_text().splitlines())
    parts = sorted(folder.glob(f"{name}.tar.part-*"))
    assert parts and {p.name for p in parts} <= set(sums)
    blob = b""
    for p in parts:
        data = p.read_bytes()
        assert hashlib.sha256(data).hexdigest() == sums[p.name], p.name
        blob += data
    (dest / f"{name}.tar").write_bytes(blob)
    with tarfile.open(dest / f"{name}.tar") as tf:
        tf.extractall(dest / name, filter="data")
    return dest / name


@pytest.mark.slow
def test_smoke_run_trains_evaluates_and_summarises(smoke):
    out, _, _ = smoke
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "--smoke" and summary["gpu"] is None
    for name in ("vit_cifar", "resnet18_cifar"):
        assert summary["train"][name]["epochs"] == 1
        assert summary["eval"][name]["n"] == 30  # the whole test split
    assert {"frac0.02", "frac0.04", "frac0.1"} <= set(summary["train"])


def test_stages_and_recipe_none_pick_what_runs(packed, tmp_path):
    # STAGES=1 skips the CUDA tests and stages 2 and 3; a recipe of none (a window given to one
    # model alone) skips that model, and the dynamics figure, which needs both, is skipped
    # rather than failed. One run of the script checks both switches.
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "DEVICE_WORK": str(tmp_path / "work"), "REPSIM_CIFAR_TAR": str(packed),
           "STAGES": "1", "VIT_RECIPE": "none", "RESNET_RECIPE": "none"}
    run = subprocess.run(["bash", str(SCRIPT), "--smoke"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "stage 2 skipped" in run.stdout and "stage 3 skipped" in run.stdout
    assert "vit_cifar: not trained (recipe none)" in run.stdout
    assert "resnet18_cifar: not trained (recipe none)" in run.stdout
    assert "dynamics figure skipped: a model was not trained" in run.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train"] == {} and summary["eval"] == {} and summary["cuda_tests"] is None
    # torch's version and the GPU's name come from the script's one start of torch
    assert summary["torch"] == torch.__version__ and summary["gpu"] is None




def test_a_run_clears_what_an_earlier_run_left_in_out(packed, tmp_path):
    # OUT (default .device/out) is reused by a second rehearsal: the first run's summary and
    # its higher-numbered results parts stayed, so an interrupted run looked complete and
    # `cat results.tar.part-*` joined a stale part onto the new archive.
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"stale": true}')
    (out / "results.tar.part-007").write_bytes(b"stale")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out),
           "DEVICE_WORK": str(tmp_path / "work"), "REPSIM_CIFAR_TAR": str(tmp_path / "none"),
           "STAGES": "1"}
    run = subprocess.run(["bash", str(SCRIPT), "--smoke"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1 and "cannot unpack" in run.stdout  # stops before any work
    assert sorted(p.name for p in out.iterdir()) == ["device.log"]


def test_a_second_run_on_the_same_work_folder_is_refused(tmp_path):
    # Two runs of one DEVICE_WORK: the second deleted the first's unpacked data, checkpoints
    # and runs from under it. The first holds WORK.lock (a flock) while it runs.
    import fcntl

    work = tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "DEVICE_WORK": str(work), "REPSIM_CIFAR_TAR": str(tmp_path / "none")}
    (work / "data").mkdir(parents=True)
    with open(f"{work}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the first run holds it
        run = subprocess.run(["bash", str(SCRIPT), "--smoke"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert run.returncode == 1 and f"another run is using {work}" in run.stdout
    assert (work / "data").is_dir()  # left alone

def test_snapshot_epochs_are_cut_to_a_shorter_run():
    # The GPU run's snapshot list reaches epoch 100; fast-resnet plans 80 epochs and
    # VIT_EPOCHS may be below 100, and repsim train refuses a snapshot past the run's end.
    text = SCRIPT.read_text()
    funcs = "\n".join(text[text.index(f"{name}() {{"):].split("\n}\n", 1)[0] + "\n}"
                      for name in ("upto", "recipe_epochs"))
    run = subprocess.run(
        ["bash", "-c", funcs + '\nupto 0,1,2,5,10,20,50,100 "$(recipe_epochs fast-resnet)"; '
         "upto 0,1,2,5,10,20,50,100 70"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0,1,2,5,10,20,50", "0,1,2,5,10,20,50"]

@pytest.mark.slow
def test_smoke_run_packages_within_the_return_limits(smoke, tmp_path):
    out, _, _ = smoke
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size <= 15 * 2**20 for f in files)
    results = _unpack(out, "results", tmp_path)
    manifest = json.loads((results / "manifest.json").read_text())
    assert {r["name"] for r in manifest["checkpoints"]} == {"vit_cifar", "resnet18_cifar"}
    assert (results / "vit_cifar.pt").is_file() and (results / "runs" / "vit_cifar").is_dir()


@pytest.mark.slow
def test_smoke_run_draws_the_dynamics_figure_from_snapshots_that_stay_behind(smoke, tmp_path):
    # Issue 17: snapshots are too large to travel; the figure built from them does.
    out, _, _ = smoke
    results = _unpack(out, "results", tmp_path)
    record = json.loads((results / "figures" / "dynamics.json").read_text())
    assert [m["epochs"] for m in record["data"]["models"]] == [[0, 1], [0, 1]]
    assert (results / "figures" / "dynamics.png").is_file()
    index = json.loads((results / "vit_cifar_snapshots" / "index.json").read_text())
    assert [s["epoch"] for s in index["snapshots"]] == [0, 1]
    assert not list(results.glob("*_snapshots/*.pt"))


@pytest.mark.slow
def test_collect_returns_the_data_scale_checkpoints(smoke, tmp_path):
    _, collect, _ = smoke
    scale = _unpack(collect, "scale", tmp_path)
    names = sorted(p.name for p in scale.glob("*.pt"))
    assert names == ["vit_cifar_frac0.02.pt", "vit_cifar_frac0.04.pt", "vit_cifar_frac0.1.pt"]
    fractions = {r["train_fraction"] for r in
                 json.loads((scale / "manifest.json").read_text())["checkpoints"]}
    assert fractions == {0.02, 0.04, 0.1}


TINY_RUNS = ["vit_cifar_tiny", "vit_cifar_tiny_lowrankk", "vit_cifar_tiny_lowrankq",
             "vit_cifar_tiny_mcls4", "vit_cifar_tiny_reg3", "vit_cifar_tiny_seed1",
             "vit_cifar_tiny_sptlsa"]


@pytest.mark.slow
def test_stage_3_trains_every_tiny_vit_and_collect_returns_them(smoke, tmp_path):
    # Issue 18: vit_cifar_tiny (two seeds) and its five variants with the tinyvit recipe; the
    # summary and manifest travel in the first reply, the checkpoints with --collect tinyvit.
    out, _, root = smoke
    summary = json.loads((out / "summary.json").read_text())
    for name in TINY_RUNS:
        assert summary["train"][name]["epochs"] == 1, name
    results = _unpack(out, "results", tmp_path)
    rows = json.loads((results / "manifest_tinyvit.json").read_text())["checkpoints"]
    assert sorted(r["name"] for r in rows) == TINY_RUNS
    assert {r["recipe"] for r in rows} == {"tinyvit"}
    env = {**os.environ, "OUT": str(root / "collect_tiny"), "DEVICE_WORK": str(root / "work")}
    run = subprocess.run(["bash", str(SCRIPT), "--collect", "tinyvit"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    tiny = _unpack(root / "collect_tiny", "tinyvit", tmp_path)
    assert sorted(p.stem for p in tiny.glob("*.pt")) == TINY_RUNS


THIRD = REPO / "benchmarks" / "out" / "device_2026-11-28_third"


def _script_funcs(*names: str) -> str:
    text = SCRIPT.read_text()
    return "\n".join(text[text.index(f"{name}() {{"):].split("\n}\n", 1)[0] + "\n}"
                     for name in names)


def _measured(log: str, summary: str) -> tuple[float, float, float]:
    """A run of the third GPU window: its first epoch (compiling), its later epochs' mean and
    the seconds spent outside epochs (loading, evaluations, snapshots), in seconds."""
    rows = [json.loads(ln) for ln in (THIRD / log).read_text().splitlines()]
    total = json.loads((THIRD / summary).read_text())["seconds"]
    spent = [r["seconds"] for r in rows]
    return spent[0], sum(spent[1:]) / (len(spent) - 1), total - sum(spent)


def test_stage_1_default_epochs_finish_their_schedule_inside_the_window():
    # A schedule cut by the time limit ends at a high learning rate. At the third window's
    # measured speed (compiling 40 s, 3.26 s an epoch alone, 42 s of loading and evaluations)
    # 140 ViT epochs needed ~535 s of the 484 s stage 1 gets (560 s budget, 16 s set-up, 60 s
    # kept), and the ResNet's 100 epochs ~260 s of the 164 s of a DEVICE_BUDGET_S=240 call.
    funcs = _script_funcs("recipe_epochs", "stage1_epochs")
    run = subprocess.run(
        ["bash", "-c", funcs + "\nstage1_epochs vit fast-vit-aa 484; "
         "stage1_epochs resnet fast-resnet-aa 394; stage1_epochs resnet fast-resnet-aa 164"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    vit, res_shared, res_alone = map(int, run.stdout.split())
    first, _, rest = _measured("log_vit_cifar_lr1e-3.jsonl", "train_vit_cifar_lr1e-3.json")
    _, alone, _ = _measured("log_vit_cifar_lr3e-4.jsonl", "train_vit_cifar_lr3e-4.json")
    assert first + (vit - 1) * alone + rest <= 484 - 1.1 * alone  # the time limit's margin
    assert vit >= 100
    first, epoch, rest = _measured("log_resnet18_cifar.jsonl", "train_resnet18_cifar.json")
    assert res_shared == 100  # the recipe's epochs fit beside the ViT (they took 258 s)
    assert first + (res_alone - 1) * epoch + rest <= 164 - 1.1 * epoch


@pytest.mark.slow
def test_a_training_run_that_overstays_is_stopped_and_the_rest_packaged(packed, tmp_path):
    # --time-limit is checked between epochs only: a run that hangs (a stuck compile, an epoch
    # far slower than the last) must not keep the script past its guard, or nothing comes back.
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\n"
                    '[ "$1 $2 $3" = "-m repsim train" ] && exec sleep 1000\n'
                    '[ "$1 $2" = "-m pip" ] && exit 0\n'
                    f'exec {sys.executable} "$@"\n')
    stub.chmod(0o755)
    budget = 75  # stage 1 gets about 10 s; the run is killed 1 s (GRACE_S) past its limit
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out"),
           "DEVICE_WORK": str(tmp_path / "work"), "REPSIM_CIFAR_TAR": str(packed),
           "STAGES": "1", "RESNET_RECIPE": "none", "DEVICE_BUDGET_S": str(budget),
           "GRACE_S": "1"}
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=3 * budget)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "vit_cifar: exit 124" in run.stdout
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["train"]["vit_cifar"] is None
    assert (tmp_path / "out" / "SHA256SUMS").read_text().strip()


@pytest.mark.slow  # about 20 s: one start of torch, then the interrupt
def test_ctrl_c_stops_the_runs_it_started_in_the_background(packed, tmp_path):
    # Ctrl-C ended the script alone: a non-interactive shell starts background jobs ignoring
    # SIGINT, and timeout gives each run its own process group, so both trainings (and the
    # CUDA tests) went on, writing into a work folder the next run deletes.
    pids = tmp_path / "pids"
    stub = tmp_path / "python"
    stub.write_text("#!/bin/bash\n"
                    f'[ "$1 $2 $3" = "-m repsim train" ] && echo $$ >> {pids} && exec sleep 1000\n'
                    f'exec {sys.executable} "$@"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out"),
           "DEVICE_WORK": str(tmp_path / "work"), "REPSIM_CIFAR_TAR": str(packed),
           "STAGES": "1"}
    run = subprocess.Popen(["bash", str(SCRIPT), "--smoke"], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True,  # as a terminal's shell starts it:
                           # a background job (CI under nohup ... &) inherits SIGINT
                           # ignored, which bash can then neither trap nor reset
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(600):  # both runs started: seconds (one start of torch before them)
        if pids.is_file() and len(pids.read_text().split()) == 2:
            break
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGINT)  # as a terminal does: its whole foreground group
    out = run.communicate(timeout=60)[0]
    assert run.returncode == 130 and "interrupted" in out, out
    for pid in map(int, pids.read_text().split()):
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text():
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"training {pid} still runs after Ctrl-C")

