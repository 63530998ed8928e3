"""repsim.store: the writer's resume of an unfinished store, and its readers."""

import numpy as np
import pytest

from repsim.errors import UserError
from repsim.store import StoreWriter, partial_path


def test_resuming_a_partial_store_another_process_holds_open_keeps_it(tmp_path):
    # The writer's reopen deleted FILE.h5.partial on any OSError, HDF5's lock of a writer
    # elsewhere too: the other run's batches were lost under it.
    fcntl = pytest.importorskip("fcntl")
    ids = np.arange(4)
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, ids, ids % 2, 2)
    w.create_layers({"x": 1}, "float32", 2, None)
    w.write(0, {"x": np.ones((2, 1), np.float32)})
    w.close()
    part = partial_path(tmp_path / "s.h5")
    with open(part, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as HDF5's writer holds it
        with pytest.raises(UserError, match="open for writing in another process"):
            StoreWriter(tmp_path / "s.h5", {"model": "m"}, ids, ids % 2, 2)
    assert part.exists()
    w = StoreWriter(tmp_path / "s.h5", {"model": "m"}, ids, ids % 2, 2)
    assert w.resumed and w.pending() == [1]
    w.close()
