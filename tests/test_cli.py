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
