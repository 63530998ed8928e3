import os
import signal
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Two cores: with two pytest-xdist workers, one thread each (the subprocesses tests start
# keep torch's default).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


# The files that take minutes, longest first (seconds on 2 busy cores, 2026-11-29: 750, 450,
# 430, 380, 260, 200, 130). pytest-xdist's `--dist loadfile` hands whole files to the workers
# in collection order: the longest started first overlap everything else, instead of one
# started last running alone at the end.
LONGEST_FILES = ("test_device_script.py", "test_train.py", "test_extract.py", "test_readme.py",
                 "test_figures.py", "test_compare.py", "test_models.py")


def pytest_configure(config):
    # xdist otherwise sorts files by their number of tests, which sends the longest file (ten
    # slow tests) near the end of the run.
    if getattr(config.option, "loadscopereorder", None) is not None:
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file,
    # and among the other files, the order stays


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def layers(rng):
    """Three correlated 'layers' over the same 60 samples, with different widths."""
    base = rng.standard_normal((60, 16))
    return [
        base @ rng.standard_normal((16, 10)) + 0.5 * rng.standard_normal((60, 10)),
        np.tanh(base @ rng.standard_normal((16, 24))) + 3.0,  # large mean: centring matters
        rng.standard_normal((60, 7)),
    ]


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A tiny CIFAR-10-shaped image-folder tree: 10 classes x 2 images per split, 32x32 PNG."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    gen = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CIFAR_CLASSES:
            d = root / "cifar10" / split / c
            d.mkdir(parents=True)
            for k in range(2):
                img = gen.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{k:04d}.png")
    return root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own REPSIM_CACHE and an empty REPSIM_CHECKPOINTS: nothing is
    written into the repository, and the committed checkpoints never change an outcome."""
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REPSIM_CHECKPOINTS", str(tmp_path / "checkpoints"))
    for switch in ("REPSIM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(switch, raising=False)  # tests that want one set it


@pytest.fixture
def file_size_limit():
    """``limit(n)``: a subprocess ``preexec_fn`` after which no file can grow past ``n`` bytes.
    Writes then fail with EFBIG, as on a full disk (a small tmpfs would need root)."""
    resource = pytest.importorskip("resource")  # POSIX only

    def limit(n: int):
        def apply():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

        return apply

    return limit
