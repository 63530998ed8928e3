"""The benchmark scripts' own logic (not timings): what they record and check."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

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
