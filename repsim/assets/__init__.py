"""Data shipped inside the package: the bundled CIFAR-10 probe set ``cifar10-probe``.

``cifar10_test_probe.npz``: 1,000 CIFAR-10 test images (100 per class) with their canonical
sample IDs (index in the full test split sorted by class, then file name), so stores from it
line up with stores from the full set; ``meta`` records the source and the selection. Rebuilt
by ``python -m repsim.assets.build_probe --source DIR``.
"""

from pathlib import Path

PROBE_NAME = "cifar10-probe"
DEFAULT_DATASET = PROBE_NAME  # every command but `repsim train`: offline, no data root
PROBE_FILE = Path(__file__).resolve().parent / "cifar10_test_probe.npz"
