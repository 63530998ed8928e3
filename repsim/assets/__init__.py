"""Data shipped inside the package: the bundled CIFAR-10 probe set ``cifar10-probe``.

``cifar10_test_probe.npz`` holds 1,000 CIFAR-10 test images (100 per class) so the main job
runs on a fresh machine with no dataset download and no data root (it is every
command's default dataset, :data:`DEFAULT_DATASET`). Each image keeps its
canonical sample ID (its index in the sorted image-folder order of the full 10,000-image test
split: sorted class, then sorted file name), so stores extracted from it line up with stores
extracted from the full set. The pixels are those of the JPEG re-encoding of the test batch
that our machines hold, decoded exactly as :func:`repsim.data.load_probe_set` decodes the
tree; ``meta`` in the file records the source, the selection rule and the IDs' digest.
It is rebuilt by ``python -m repsim.assets.build_probe --source DIR`` and read by
:func:`repsim.data.load_probe_set` (``dataset="cifar10-probe"``).
"""

from pathlib import Path

PROBE_NAME = "cifar10-probe"
DEFAULT_DATASET = PROBE_NAME  # every command but `repsim train`: offline, no data root
PROBE_FILE = Path(__file__).resolve().parent / "cifar10_test_probe.npz"
