"""repsim.seeds: the lists of weights files that make a comparison over seeds."""

import os
from pathlib import Path

import pytest

from repsim.compare import CKAConfig
from repsim.errors import UserError
from repsim.seeds import run_cka_seeds


def test_a_weights_file_listed_twice_is_refused_not_its_own_seed_ceiling():
    # a.pt twice made the pair (a.pt, a.pt) a "seed pair": a seed ceiling of exactly 1 from a
    # file compared with itself, and a mean and seed_sd that counted one seed twice.
    cfg = CKAConfig(a="vit_cifar", b="resnet18_cifar", weights_a="a.pt,b.pt,./a.pt")
    with pytest.raises(UserError, match=r"weights_a='a.pt,b.pt,./a.pt' lists a.pt twice"):
        run_cka_seeds(cfg)


def test_a_seed_list_without_files_is_a_user_error_not_an_index_error():
    cfg = CKAConfig(a="vit_cifar", b="resnet18_cifar", weights_a=" , ", weights_b="a.pt,b.pt")
    with pytest.raises(UserError, match=r"weights_a=' , ' names no weights file"):
        run_cka_seeds(cfg)


def fake_run_cka(calls):
    """A stand-in for run_cka that checks the seeds of weights as run_cka does, records each
    configuration and returns a 1 x 1 result."""
    from repsim.weights import check_weights_seeds

    def run(cfg):
        check_weights_seeds(vars(cfg))
        calls.append(cfg)
        name = f"{cfg.a}-{cfg.weights_a}__{cfg.b}-{cfg.weights_b}"
        result = {"matrix": [[0.5]], "se": None, "layers_a": ["x"], "layers_b": ["x"],
                  "kernel": cfg.kernel, "estimator": cfg.estimator, "n": 8,
                  "batch_size": 1024 if cfg.estimator == "minibatch" else None,
                  "threshold": cfg.threshold if cfg.kernel == "rbf" else None, "batch_seed": 0,
                  "samples": {}, "model_a": "m", "model_b": "m", "cache_key": name}
        return {"result": result, "files": [f"/nowhere/{name}.json"], "reused": True,
                "stores": {"a": "reused", "b": "reused"}}
    return run


def test_each_comparison_seeds_random_weights_with_its_own_sides_seed(monkeypatch, tmp_path):
    # B: a random baseline with weights_seed_b=1 and a file. Every run kept weights_seed_b=1:
    # beside t1.pt (and in A's seed ceiling, beside two files) it was refused ('has no
    # effect'), and B's seed ceiling seeded its 'random' with A's weights_seed_a.
    from repsim import seeds

    calls = []
    monkeypatch.setattr(seeds, "run_cka", fake_run_cka(calls))
    cfg = CKAConfig(a="resnet18_cifar", b="vit_cifar", weights_a="s0.pt,s1.pt",
                    weights_b="random,t1.pt", weights_seed_a=0, weights_seed_b=1, plots=False,
                    out=str(tmp_path))
    run_cka_seeds(cfg)
    got = [(c.a == c.b, c.weights_a, c.weights_b, c.weights_seed_a, c.weights_seed_b)
           for c in calls]
    assert got == [(False, "s0.pt", "random", 0, 1), (False, "s0.pt", "t1.pt", 0, 0),
                   (False, "s1.pt", "random", 0, 1), (False, "s1.pt", "t1.pt", 0, 0),
                   (True, "s0.pt", "s1.pt", 0, 0), (True, "random", "t1.pt", 1, 0)]


def test_a_weights_seed_with_no_random_weights_in_the_list_is_refused(monkeypatch, tmp_path):
    from repsim import seeds

    monkeypatch.setattr(seeds, "run_cka", fake_run_cka([]))
    cfg = CKAConfig(a="resnet18_cifar", b="vit_cifar", weights_a="s0.pt,s1.pt",
                    weights_seed_a=2, plots=False, out=str(tmp_path))
    with pytest.raises(UserError, match=r"weights_seed_a=2 has no effect"):
        run_cka_seeds(cfg)


def test_the_seeds_aggregate_records_the_rbf_threshold_and_batch_seed(monkeypatch, tmp_path):
    # The aggregate named kernel, estimator and batch size but not the RBF bandwidth's
    # threshold nor the batches' seed: aggregates at thresholds 0.5 and 2 read alike.
    from repsim import seeds

    monkeypatch.setattr(seeds, "run_cka", fake_run_cka([]))
    cfg = CKAConfig(a="resnet18_cifar", b="vit_cifar", weights_a="s0.pt,s1.pt", kernel="rbf",
                    threshold=0.5, plots=False, out=str(tmp_path))
    res = run_cka_seeds(cfg)["result"]
    assert (res["threshold"], res["batch_seed"]) == (0.5, 0)


def test_the_seeds_aggregate_is_not_rewritten_when_nothing_changed(monkeypatch, tmp_path):
    # Every comparison reused, the aggregate said reused: true, yet its file was written
    # again each run (README: a rerun with nothing changed rewrites nothing).
    from repsim import seeds

    monkeypatch.setattr(seeds, "run_cka", fake_run_cka([]))
    cfg = CKAConfig(a="resnet18_cifar", b="vit_cifar", weights_a="s0.pt,s1.pt", plots=False,
                    out=str(tmp_path))
    first = run_cka_seeds(cfg)
    (path,) = map(Path, first["files"])
    os.utime(path, ns=(1, 1))  # any write would move this
    again = run_cka_seeds(cfg)
    assert again["files"] == first["files"] and again["result"] == first["result"]
    assert again["reused"] and path.stat().st_mtime_ns == 1


def test_force_rewrites_the_seeds_aggregate(monkeypatch, tmp_path):
    from repsim import seeds

    monkeypatch.setattr(seeds, "run_cka", fake_run_cka([]))
    cfg = CKAConfig(a="resnet18_cifar", b="vit_cifar", weights_a="s0.pt,s1.pt", plots=False,
                    out=str(tmp_path), force=True)
    (path,) = map(Path, run_cka_seeds(cfg)["files"])
    os.utime(path, ns=(1, 1))
    run_cka_seeds(cfg)
    assert path.stat().st_mtime_ns != 1  # force: recompute and rewrite what is cached


def test_a_computed_seed_ceiling_is_not_reported_as_reused(monkeypatch, tmp_path):
    # The comparisons were cached but the seed ceiling's pair was computed (minutes, maybe an
    # extraction): the aggregate still said reused: true ('reused (cached)' at the CLI).
    from repsim import seeds

    cached = fake_run_cka([])

    def run(cfg):
        return {**cached(cfg), "reused": cfg.a != cfg.b}  # a ceiling pair: A against A

    monkeypatch.setattr(seeds, "run_cka", run)
    cfg = CKAConfig(a="resnet18_cifar", b="vit_cifar", weights_a="s0.pt,s1.pt", plots=False,
                    out=str(tmp_path))
    assert run_cka_seeds(cfg)["reused"] is False


def test_one_weights_file_with_a_comma_in_its_path_is_one_file_not_seeds(tmp_path):
    # Hydra-style run folders ('lr=0.1,wd=0.05/best.pt') were split into two "seeds", neither
    # of which exists.
    from repsim.seeds import has_seeds, seed_list

    path = tmp_path / "lr=0.1,wd=0.05" / "best.pt"
    path.parent.mkdir()
    path.write_bytes(b"")
    assert seed_list(str(path)) == [str(path)]
    assert not has_seeds(CKAConfig(a="vit_cifar", b="vit_cifar", weights_a=str(path)))


def test_seeds_given_as_a_python_list_of_paths_are_seeds(monkeypatch, tmp_path):
    # weights_a=["s0.pt", "s1.pt"] (a list, as Python spells several files) raised a TypeError
    # in os.path.expanduser; a Path for the other side gave "PosixPath is not JSON
    # serializable" when the aggregate was written.
    from repsim import seeds

    calls = []
    monkeypatch.setattr(seeds, "run_cka", fake_run_cka(calls))
    cfg = CKAConfig(a="resnet18_cifar", b="vit_cifar", weights_a=["s0.pt", Path("s1.pt")],
                    weights_b=Path("t0.pt"), plots=False, out=str(tmp_path))
    assert seeds.has_seeds(cfg)
    res = run_cka_seeds(cfg)["result"]
    assert (res["seeds_a"], res["seeds_b"]) == (["s0.pt", "s1.pt"], ["t0.pt"])
    assert [(c.weights_a, c.weights_b) for c in calls] == [("s0.pt", "t0.pt"), ("s1.pt", "t0.pt"),
                                                           ("s0.pt", "s1.pt")]


def test_a_list_of_one_weights_file_is_seeds_too():
    from repsim import seeds

    assert seeds.has_seeds(CKAConfig(a="vit_cifar", b="vit_cifar", weights_b=["t0.pt"]))


def test_a_seed_list_of_what_is_no_path_is_a_user_error():
    cfg = CKAConfig(a="vit_cifar", b="resnet18_cifar", weights_a=["a.pt", 3])
    with pytest.raises(UserError, match=r"weights_a=\['a.pt', 3\]: 3 is no weights file"):
        run_cka_seeds(cfg)


@pytest.mark.parametrize("weights", [3, 2.5, b"s0.pt,s1.pt"])
def test_weights_that_are_no_path_are_a_user_error_naming_the_side(weights):
    # weights_a=3 raised a raw TypeError from os.path.expanduser, in has_seeds (the CLI's and
    # a notebook's first step) and in run_cka_seeds alike.
    from repsim import seeds

    cfg = CKAConfig(a="vit_cifar", b="resnet18_cifar", weights_a=weights)
    for call in (seeds.has_seeds, run_cka_seeds):
        with pytest.raises(UserError, match=rf"^weights_a={weights!r} is no weights file; "
                                            r"valid: .*'random'"):
            call(cfg)
