"""What every benchmark records beside its figures: the machine and the date (UTC).

benchmarks/README.md quotes each figure with its machine and date, so each script prints
this line and stores the dict in its JSON; a figure without them cannot be compared later.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info() -> dict:
    """Machine (CPU, cores, torch threads and version, GPU if any) and the UTC date-time."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch
    except ImportError:  # bench scripts without torch still get the machine and date
        return info
    info.update(torch=torch.__version__, threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    return info


def describe(info: dict) -> str:
    """One line for the top of a benchmark's output."""
    torch = f", torch {info['torch']} ({info['threads']} threads)" if "torch" in info else ""
    gpu = f", {info['gpu']}" if info.get("gpu") else ", no GPU"
    return f"# {info['date']}: {info['cpu']}, {info['cores']} cores{torch}{gpu}"
