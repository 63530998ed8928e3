import argparse
import json
import os
import subprocess
import sys

import pytest

from repsim import __version__

# Page faults of allocating 56 MiB right after freeing 64 MiB (torch tensors: numpy asks
# for huge pages), with and without the CLI's allocator setting: a fresh mmap faults in
# all 14,336 of its pages, reused heap none.
_REALLOC_FAULTS = """
import resource, sys
import torch
from repsim.cli import reuse_freed_memory
made = reuse_freed_memory() if sys.argv[1] == "tuned" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = torch.ones(8 << 20, dtype=torch.float64)
del a
f0 = faults()
b = torch.ones(7 << 20, dtype=torch.float64)  # smaller: fits despite alignment
print(made, faults() - f0)
"""


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=env or {k: v for k, v in os.environ.items()
                                      if not k.startswith("MALLOC_")})


def test_version_and_help_need_no_heavy_imports():
    v = _run("-m", "repsim", "--version")
    assert v.returncode == 0 and v.stdout.strip() == f"repsim {__version__}"
    code = ("import sys; from repsim.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'h5py' in sys.modules)")
    h = _run("-c", code)
    assert "extract" in h.stdout and "cka" in h.stdout and "figures" in h.stdout
    assert h.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_memory_is_reused_without_page_faults():
    plain = _run("-c", _REALLOC_FAULTS, "plain").stdout.split()
    if int(plain[1]) < 8000:  # e.g. huge pages for every mapping: nothing to compare
        pytest.skip(f"fresh 64 MiB faulted only {plain[1]} pages here")
    made, faults = _run("-c", _REALLOC_FAULTS, "tuned").stdout.split()
    assert made == "True"
    assert int(faults) < 1000, f"{faults} page faults re-allocating freed memory"


def test_user_malloc_environment_is_left_alone():
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    made, _ = _run("-c", _REALLOC_FAULTS, "tuned", env=env).stdout.split()
    assert made == "False"


def test_library_messages_become_flags_at_the_cli():
    from repsim.errors import as_flags

    assert (as_flags("batch_size=0 is not valid; use reduce='mean' (a==b)")
            == "--batch-size 0 is not valid; use --reduce 'mean' (a==b)")
    assert as_flags("fix: restart=True to start over") == "fix: --restart to start over"


def test_a_bare_parameter_becomes_a_flag_without_a_double_space():
    # weights.load_into says "pass the model= the file was trained as, or other weights=".
    from repsim.errors import as_flags

    assert (as_flags("fix: pass the model= the file was trained as, or other weights=")
            == "fix: pass the --model the file was trained as, or other --weights")



def test_as_flags_leaves_a_name_inside_a_path_alone():
    from repsim.errors import as_flags

    for path in ("/data/lr=0.1/m.pt", r"C:\runs\lr=0.1\m.pt"):
        msg = f"weights file {path} does not exist; valid: weights=PATH"
        assert as_flags(msg) == f"weights file {path} does not exist; valid: --weights PATH"

def _subparsers():
    from repsim.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_help_shows_its_default():
    for name, p in _subparsers().items():
        text = "".join(p.format_help().split())  # as printed, without line wrapping
        for a in p._actions:
            if not a.option_strings or a.nargs == 0 or a.required:
                continue  # switches, --help, required options: no default to show
            h = " ".join(p._get_formatter()._expand_help(a).split())
            assert "default" in h and "".join(h.split()) in text, (name, a.option_strings, h)
            if a.default is not None:
                assert f"default: {a.default}" in h or "default" in (a.help or ""), (name, h)
    assert "(default: 128)" in " ".join(_subparsers()["extract"].format_help().split())


def test_model_help_names_every_registered_model_without_importing_torch():
    # It listed four names: the six vit_cifar_tiny* models were nowhere in --help.
    from repsim.registry import list_models

    for name in ("extract", "eval"):
        text = " ".join(_subparsers()[name].format_help().split())
        assert [m for m in list_models() if m not in text] == [], name
    train = " ".join(_subparsers()["train"].format_help().split())
    assert "vit_cifar_tiny_sptlsa (from scratch)" in train
    code = ("import sys; from repsim.cli import main\n"
            "try:\n    main(['extract', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    assert _run("-c", code).stdout.strip().splitlines()[-1] == "False"


def test_probe_commands_default_to_the_bundled_probe_set():
    for name, p in _subparsers().items():
        if name not in ("train", "figures"):  # training needs a train split; figures: specs
            assert p.get_default("dataset") == "cifar10-probe", name
    assert "cifar10-probe" in _subparsers()["eval"].format_help()


@pytest.mark.parametrize("argv, bad", [(["cka", "--a", "x", "--b", "y", "--bogus"], "--bogus"),
                                       (["eval", "--model", "vit_cifar", "--nn", "3"], "--nn")])
def test_unknown_option_points_at_the_subcommand_help(argv, bad, capsys):
    from repsim.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1
    assert f"see 'repsim {argv[0]} --help'" in err and bad in err


@pytest.mark.parametrize("command", ["extract", "train", "eval", "attention", "featuremaps",
                                     "cka", "figures"])
def test_a_mistyped_flag_is_reported_as_unknown_with_close_matches_not_as_missing(
        command, capsys):
    from repsim.cli import main

    with pytest.raises(SystemExit) as e:  # extract: --model is required, cka: --a and --b
        main([command, "--modle", "x", "--sed", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"repsim {command}: error: unrecognized arguments: --modle x --sed 1")
    assert "required" not in err and "--sed: did you mean --seed?" in err
    if command not in ("cka", "figures"):  # the commands with a --model
        assert "--modle: did you mean --model?" in err


def test_a_missing_required_flag_is_still_reported_as_missing(capsys):
    from repsim.cli import main

    with pytest.raises(SystemExit) as e:
        main(["cka", "--a", "x"])
    assert e.value.code == 1 and capsys.readouterr().err == (
        "repsim cka: error: the following arguments are required: --b; see 'repsim cka "
        "--help'\n")


def _eval(capsys, *args: str) -> dict:
    from repsim.cli import main

    assert main(["eval", "--model", "resnet18_cifar", "--weights", "random", "--device", "cpu",
                 "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_on_a_subset_and_random_weights_seeded_apart_from_the_images(capsys):
    a = _eval(capsys, "--n", "20", "--weights-seed", "1")
    assert a["n"] == 20 and a["dataset"] == "cifar10-probe" and a["weights_seed"] == 1
    same = _eval(capsys, "--n", "20", "--weights-seed", "1")
    other_weights = _eval(capsys, "--n", "20", "--weights-seed", "2")
    other_images = _eval(capsys, "--n", "20", "--weights-seed", "1", "--seed", "1")
    assert same["loss"] == a["loss"] and same["ids_sha256"] == a["ids_sha256"]
    assert other_weights["ids_sha256"] == a["ids_sha256"] and other_weights["loss"] != a["loss"]
    assert other_images["ids_sha256"] != a["ids_sha256"]


def test_cka_seed_help_states_the_effective_default():
    text = " ".join(_subparsers()["cka"].format_help().split())
    assert "seed of the minibatch estimator's random batches (default: 0)" in text
    assert "seed of the permutations (default: 0)" in text


def _checkpoint_trained_on(path, dataset: str):
    import torch

    from repsim.models import build_model

    torch.save({"state_dict": build_model("resnet18_cifar").state_dict(),
                "data": {"dataset": dataset}}, path)
    return str(path)


def test_eval_warns_in_one_line_when_the_checkpoint_was_trained_on_another_dataset(
        tmp_path, capsys):
    from repsim.cli import main

    weights = _checkpoint_trained_on(tmp_path / "svhn.pt", "svhn")
    assert main(["eval", "--model", "resnet18_cifar", "--weights", weights, "--n", "10",
                 "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["checkpoint_dataset"] == "svhn"
    assert err.strip() == ("repsim eval: warning: the weights were trained on svhn but are "
                           "evaluated on cifar10 (cifar10-probe): the accuracy measures "
                           "transfer, not the model's own task")


def test_eval_of_a_checkpoint_on_its_own_dataset_does_not_warn(tmp_path, capsys):
    from repsim.cli import main

    weights = _checkpoint_trained_on(tmp_path / "c10.pt", "cifar10")
    assert main(["eval", "--model", "resnet18_cifar", "--weights", weights, "--n", "10",
                 "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["checkpoint_dataset"] == "cifar10" and err == ""


@pytest.mark.parametrize("argv", [
    ["extract", "--model", "vit_cifar", "--weights-seed", "3"],
    ["eval", "--model", "vit_cifar", "--weights", "checkpoints/vit_cifar.pt", "--weights-seed",
     "3"],
    ["attention", "--model", "vit_cifar", "--weights-seed", "3"],
    ["cka", "--a", "vit_cifar", "--b", "vit_cifar", "--weights-a", "random",
     "--weights-seed-b", "3"]])
def test_a_weights_seed_that_seeds_no_random_weights_is_refused_in_flags(argv, capsys):
    from repsim.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    flag = argv[-2]
    assert err.startswith(f"repsim {argv[0]}: error: {flag} 3 has no effect: it seeds random "
                          "weights only") and len(err.strip().splitlines()) == 1
    assert f"pass {flag.replace('-seed', '')} 'random'" in err


def _cka_config(monkeypatch, *args: str):
    """The CKAConfig ``repsim cka --a a.h5 --b b.h5 ARGS`` hands the library (not run)."""
    import repsim.compare
    from repsim.cli import main

    got = []

    def fake_run_cka(cfg):
        got.append(cfg)
        raise KeyboardInterrupt  # stop here: main reports it without running anything

    monkeypatch.setattr(repsim.compare, "run_cka", fake_run_cka)
    assert main(["cka", "--a", "a.h5", "--b", "b.h5", *args]) == 130
    return got[0]


@pytest.mark.parametrize("size, want", [("2GiB", 2 << 30), ("512MiB", 512 << 20),
                                        ("1.5kib", 1536), ("4096", 4096), ("64 B", 64)])
def test_cka_memory_budget_takes_sizes_and_reaches_the_config(monkeypatch, size, want):
    assert _cka_config(monkeypatch, "--memory-budget", size).memory_budget == want
    assert _cka_config(monkeypatch).memory_budget is None  # the engine's default
    help_ = " ".join(_subparsers()["cka"].format_help().split())
    assert "--memory-budget SIZE" in help_ and "e.g. 2GiB" in help_


@pytest.mark.parametrize("bad", ["lots", "0", "-1", "2GB", "0.1B", "1e9"])
def test_a_bad_memory_budget_is_refused_in_one_line(bad, capsys):
    from repsim.cli import main

    with pytest.raises(SystemExit) as e:
        main(["cka", "--a", "a.h5", "--b", "b.h5", "--memory-budget", bad])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1
    assert f"argument --memory-budget: {bad!r} is not a size" in err and "GiB" in err


@pytest.mark.parametrize("bad", ["-1", "0", "nan"])
def test_a_threshold_that_is_no_positive_number_is_refused_with_any_kernel(bad, capsys):
    from repsim.cli import main

    with pytest.raises(SystemExit) as e:  # --kernel linear ignores it, but it is still wrong
        main(["cka", "--a", "a.h5", "--b", "b.h5", "--threshold", bad])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1
    assert f"argument --threshold: must be > 0, got {float(bad)}" in err


def test_the_train_summary_names_the_snapshot_folder_when_it_kept_snapshots(
        monkeypatch, tmp_path, capsys):
    import repsim.train
    from repsim.cli import main

    ckpt = tmp_path / "vit_cifar.pt"
    summary = {"epochs": 2, "epochs_planned": 2, "test_accuracy": 50.0, "seconds": 1.0,
               "checkpoint": str(ckpt), "log": str(tmp_path / "log.jsonl"), "curve": "c.png"}
    for snaps, shown in (([0, 2], True), ([], False)):
        monkeypatch.setattr(repsim.train, "train", lambda cfg, s=snaps: {**summary, "snapshots": s})
        assert main(["train", "--model", "vit_cifar", "--snapshots", "0,2"]) == 0
        out = capsys.readouterr().out
        assert (f"snapshots {tmp_path / 'vit_cifar_snapshots'}" in out) == shown, out


def test_cka_json_says_how_each_store_was_had_and_how_long_it_took(monkeypatch, capsys):
    import repsim.compare
    from repsim.cli import main

    result = {"model_a": "a", "model_b": "b", "kernel": "linear", "estimator": "minibatch",
              "n": 24, "layers_a": ["x"], "layers_b": ["y"], "matrix": [[0.5]], "se": None}
    summary = {"result": result, "files": ["o/a__b.json"], "reused": False,
               "stores": {"a": "given", "b": "extracted"}, "seconds": 0.25}
    monkeypatch.setattr(repsim.compare, "run_cka", lambda cfg: summary)
    assert main(["cka", "--a", "a.h5", "--b", "b.h5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        **result, "files": ["o/a__b.json"], "reused": False,
        "stores": {"a": "given", "b": "extracted"}, "seconds": 0.25}


def test_running_out_of_gpu_memory_is_one_line_naming_the_flags_that_shrink_it(monkeypatch,
                                                                              capsys):
    import torch

    import repsim.compare
    from repsim.cli import main

    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(repsim.compare, "run_cka", oom)
    assert main(["cka", "--a", "a.h5", "--b", "b.h5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("repsim cka: error: out of device memory (CUDA out of memory.")
    assert "fix: fewer images per batch (--batch-size; cka: --memory-budget)" in err


def test_json_failure_is_still_one_json_object_on_stdout(tmp_path, capsys):
    # --json promised one machine-readable object, but a failure printed nothing on stdout:
    # a script's json.loads(stdout) failed on '' instead of reading the error.
    from repsim.cli import main

    missing = tmp_path / "missing.h5"
    assert main(["cka", "--a", str(missing), "--b", str(missing), "--json"]) == 1
    out, err = capsys.readouterr()
    why = f"no store at {missing}; extract one first"
    assert json.loads(out) == {"error": why}
    assert err == f"repsim cka: error: {why}\n"


def test_json_output_is_strict_json_with_non_finite_numbers_as_null(monkeypatch, capsys):
    # A diverged checkpoint's loss is NaN: --json printed "loss": NaN, which is no JSON
    # (JavaScript's JSON.parse, Go and serde refuse it); results write NaN as null already.
    import repsim.evaluation
    from repsim.cli import main

    res = {"model": "m", "weights": "w", "dataset": "d", "split": "test", "accuracy": 10.0,
           "loss": float("nan"), "n": 8, "seconds": 1.0, "curve": [1.0, float("inf")]}
    monkeypatch.setattr(repsim.evaluation, "evaluate_model", lambda cfg: res)
    assert main(["eval", "--model", "resnet18_cifar", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=pytest.fail) == {**res, "loss": None,
                                                           "curve": [1.0, None]}


@pytest.mark.parametrize("argv, why", [
    (["cka", "--a", "x", "--json"], "the following arguments are required: --b"),
    (["cka", "--a", "x", "--b", "y", "--json", "--bogus"], "unrecognized arguments: --bogus"),
    (["cka", "--a", "x", "--b", "y", "--n", "0", "--json"], "argument --n: must be >= 1, got 0")])
def test_a_usage_error_under_json_is_one_json_object_on_stdout_too(argv, why, capsys):
    # Every other failure printed {"error": ...} under --json; usage errors printed nothing
    # on stdout, so a script's json.loads(stdout) failed on '' instead of reading the error.
    from repsim.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 1
    assert json.loads(out) == {"error": f"{why}; see 'repsim cka --help'"}
    assert err == f"repsim cka: error: {why}; see 'repsim cka --help'\n"


_CLOSED_STDOUT = """
import os, sys
import repsim.compare
from repsim.cli import main
repsim.compare.run_cka = lambda cfg: {"result": {"matrix": [[0.5] * int(sys.argv[1])]},
                                      "files": [], "reused": True, "stores": {}, "seconds": 0}
r, w = os.pipe()
os.close(r)  # the reader is gone, as after `repsim cka ... --json | head -c 10`
os.dup2(w, 1)
raise SystemExit(main(["cka", "--a", "a.h5", "--b", "b.h5", "--json"]))
"""


@pytest.mark.parametrize("width", [1, 4000])  # flushed at exit, or written at once
def test_a_reader_that_stops_reading_stdout_ends_the_command_quietly(width):
    # `repsim cka ... --json | head -c 10` ended in two BrokenPipeError tracebacks (the
    # second from printing {"error": ...} to the same closed pipe).
    done = _run("-c", _CLOSED_STDOUT, str(width))
    assert (done.returncode, done.stderr) == (141, "")


def test_the_train_summary_says_whether_it_resumed_or_found_the_run_finished(
        monkeypatch, tmp_path, capsys):
    # A rerun of a finished run printed "trained 2/2 epochs ..." as if it had trained them.
    import repsim.train
    from repsim.cli import main

    summary = {"epochs": 2, "epochs_planned": 2, "test_accuracy": 50.0, "seconds": 1.0,
               "checkpoint": str(tmp_path / "m.pt"), "log": "log.jsonl", "curve": "c.png",
               "snapshots": [], "stopped": None}
    for resumed, finished, start in ((None, False, "trained 2/2 epochs, test"),
                                     (1, False, "trained 2/2 epochs (resumed from epoch 1), "),
                                     (2, True, "already finished: 2/2 epochs (nothing trained; "
                                               "--restart to train again), test")):
        monkeypatch.setattr(repsim.train, "train", lambda cfg, r=resumed, f=finished: {
            **summary, "resumed_from": r, "finished_before": f})
        assert main(["train", "--model", "vit_cifar"]) == 0
        assert capsys.readouterr().out.startswith(start)


_SIGTERM_MIDWAY = """
import os, signal, sys, time
from repsim import cli
help_, options, _ = cli.COMMANDS["figures"]
def run(args):
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's time limit, `kill PID`
        time.sleep(5)
    finally:
        print("cleaned up", file=sys.stderr)
    return 0
cli.COMMANDS["figures"] = (help_, options, run)
sys.exit(cli.main(["figures", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("json_", [[], ["--json"]])
def test_sigterm_unwinds_and_says_so_in_one_line(json_):
    # SIGTERM killed the process at once: no line said why it stopped, and no cleanup ran.
    r = _run("-c", _SIGTERM_MIDWAY, *json_)
    assert r.returncode == 143  # 128 + SIGTERM, as a shell reports it
    assert r.stderr == "cleaned up\nrepsim figures: terminated\n"
    assert r.stdout == ('{"error": "terminated"}\n' if json_ else "")


_SECOND_SIGNAL_AT_EXIT = """
import atexit, os, signal, sys, time
# As started from a terminal: a job started in the background (CI under nohup ... &) begins
# with SIGINT ignored, which Python then leaves ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from repsim import cli
first, second = (getattr(signal, s) for s in sys.argv[1:])
help_, options, _ = cli.COMMANDS["figures"]
def late():  # a second Ctrl-C, or a kill, while the interpreter's exit handlers run
    os.kill(os.getpid(), second)
    time.sleep(0.2)
    print("exit handlers done", file=sys.stderr)
atexit.register(late)
def run(args):
    os.kill(os.getpid(), first)
    time.sleep(5)
cli.COMMANDS["figures"] = (help_, options, run)
sys.argv = ["repsim", "figures"]
sys.exit(cli.main())
"""


@pytest.mark.parametrize("first, second, code, why", [
    ("SIGINT", "SIGINT", 130, "interrupted"), ("SIGINT", "SIGTERM", 130, "interrupted"),
    ("SIGTERM", "SIGINT", 143, "terminated"), ("SIGTERM", "SIGTERM", 143, "terminated")])
def test_a_second_signal_while_exiting_is_ignored(first, second, code, why):
    # The second Ctrl-C printed a traceback from the exit handlers; a second SIGTERM killed
    # the process (status -15) before they ran.
    r = _run("-c", _SECOND_SIGNAL_AT_EXIT, first, second)
    assert (r.returncode, r.stderr) == (code, f"repsim figures: {why}\nexit handlers done\n")


def test_main_in_another_thread_reports_an_interrupt_without_a_traceback():
    # Only the main thread may set signal handlers: ignoring further signals must not fail.
    import threading

    from repsim.cliargs import exit_quietly

    failed = []
    t = threading.Thread(target=lambda: failed.append(exit_quietly()))
    t.start()
    t.join()
    assert failed == [None]
