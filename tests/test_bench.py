"""The benchmark scripts' own logic (not timings): what they record and check."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import benchinfo  # noqa: E402


def test_run_info_records_machine_and_date():
    info = benchinfo.run_info()
    when = datetime.datetime.fromisoformat(info["date"])
    assert when.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 60
    assert info["cpu"] and info["cores"] >= 1 and info["torch"]
    line = benchinfo.describe(info)
    assert info["date"] in line and info["cpu"] in line and f"{info['cores']} cores" in line


def test_bench_cka_refuses_to_time_a_wrong_matrix():
    import bench_cka

    ours = np.array([[0.5, 0.25], [0.125, np.nan]])
    bench_cka.check_agrees(ours, ours + 1e-13, "loop", tol=1e-10)  # NaN cells: not timed
    with pytest.raises(SystemExit, match="loop"):
        bench_cka.check_agrees(ours, ours + 1e-3, "loop", tol=1e-10)


def test_bench_cka_loop_is_an_independent_right_answer():
    import bench_cka

    rng = np.random.default_rng(0)
    fa = [rng.standard_normal((12, 3)).astype(np.float32) for _ in range(2)]
    fb = [fa[0] @ rng.standard_normal((3, 3)).astype(np.float32), fa[1][::-1].copy()]
    from repsim.cka import cka_matrix

    for est in ("biased", "debiased"):
        loop = bench_cka.loop_cka(fa, fb, est, 6, [(0, 0), (1, 1)])
        m = cka_matrix(fa, fb, estimator=est)
        assert loop[(0, 0)] == pytest.approx(m[0, 0], abs=1e-12)
        assert loop[(1, 1)] == pytest.approx(m[1, 1], abs=1e-12)


def test_bench_correspondence_caches_bf16_nets_apart(tmp_path):
    import bench_correspondence as bc

    fp32 = bc.net_path(tmp_path, width=16, seed=0, epochs=1, bf16=False)
    bf16 = bc.net_path(tmp_path, width=16, seed=0, epochs=1, bf16=True)
    assert fp32 != bf16  # a net trained in bf16 is another net
    assert fp32 == tmp_path / "plaincnn_w16_seed0_e1.pt"  # nets cached before still found
    assert bc.net_path(tmp_path, width=16, seed=1, epochs=1, bf16=False) != fp32


def test_bench_stats_refuses_to_time_a_wrong_calibration():
    import bench_stats

    m = np.array([[0.9, 0.1]])
    bench_stats.check_same("calibrate", m + 1e-14, m)
    with pytest.raises(SystemExit, match="calibrate"):
        bench_stats.check_same("calibrate", m + 1e-4, m)


def test_bench_gpu_reference_cells_are_repsims_debiased_cka():
    import bench_gpu
    import torch

    from repsim.cka import cka_matrix

    rng = np.random.default_rng(1)
    fa = [torch.tensor(rng.standard_normal((15, 4)), dtype=torch.float32) for _ in range(2)]
    fb = [fa[1] @ torch.tensor(rng.standard_normal((4, 3)), dtype=torch.float32),
          torch.tensor(rng.standard_normal((15, 5)), dtype=torch.float32)]
    want = cka_matrix(fa, fb, estimator="debiased")
    got = bench_gpu.reference_cells(fa, fb, [(0, 1), (1, 0)])
    assert set(got) == {(0, 1), (1, 0)}
    for (i, j), v in got.items():
        assert v == pytest.approx(want[i, j], abs=1e-12)
    with pytest.raises(RuntimeError, match="float64"):
        bench_gpu.check_reference(want + 1e-3, got)
    assert bench_gpu.check_reference(want, got) < 1e-12


def test_bench_train_times_repsims_steps_without_its_first_steps_costs():
    import bench_train

    # 1 s of one-off cost in each fresh run, then 1 s a step of 100 images: 100 images/s,
    # as the plain loop is timed after its warm-up steps.
    short = {"steps": 2, "train_images_per_second": 200 / 3}
    long = {"steps": 12, "train_images_per_second": 1200 / 13}
    assert bench_train.step_rate(short, long, batch_size=100) == pytest.approx(100, rel=1e-12)


def test_bench_e2e_refuses_routes_that_disagree():
    import bench_e2e

    m = np.array([[1.0, 0.3]])
    bench_e2e.check_same_route(m, m.copy())
    with pytest.raises(SystemExit, match="one command"):
        bench_e2e.check_same_route(m, m + 1e-9)


def test_an_interrupted_synthetic_image_tree_is_not_reused(tmp_path, monkeypatch):
    import bench_extract
    from PIL import Image

    monkeypatch.setattr(bench_extract.tempfile, "gettempdir", lambda: str(tmp_path))
    real, saved = Image.Image.save, []

    def dies_after_three(self, *args, **kwargs):
        if len(saved) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the tree is being written
        saved.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        bench_extract.synthetic_root(20)
    monkeypatch.setattr(Image.Image, "save", real)
    root = bench_extract.synthetic_root(20)
    files = sorted((root / "cifar10" / "test").glob("*/*.png"))
    assert len(files) == 20  # 2 per class, not the 3 written before the interrupt


def test_an_interrupted_feature_cache_is_not_reused(tmp_path, monkeypatch):
    import bench_cka

    monkeypatch.setattr(bench_cka, "CACHE", tmp_path)
    real = np.save

    def cut_short(file, arr, *args, **kwargs):
        with open(file, "wb") as f:
            f.write(b"\x93NUMPY")  # the start of the file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_cka.np, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        bench_cka.features(8, 4)
    monkeypatch.setattr(bench_cka.np, "save", real)
    got = np.load(bench_cka.features(8, 4))
    assert got.shape == (bench_cka.LA + bench_cka.LB, 8, 4) and got.dtype == np.float32
