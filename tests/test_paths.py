"""repsim.paths: where repsim keeps things and how it writes them."""

import subprocess
import sys

from repsim import paths


def test_a_temporary_file_of_a_writer_on_another_machine_is_left_alone(tmp_path):
    # In a cache folder shared by several machines (NFS on a cluster), another machine's pids
    # are not this one's: its live writer's temporary file looked orphaned (no such pid here)
    # and was deleted under it, failing that write. Here the other machine's writer is
    # killed, so that its pid runs nothing on this one either.
    code = ("import socket; socket.gethostname = lambda: 'other-machine'; import sys, time; "
            "from repsim import paths; paths.atomic_write(sys.argv[1], lambda t: "
            "(open(t, 'w').write('half'), print('ready', flush=True), time.sleep(60)))")
    target = tmp_path / "r.json"
    p = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait()
    (theirs,) = tmp_path.glob(".r.*")
    paths.write_json(target, {"a": 1})
    assert theirs.exists() and target.read_text() == '{\n "a": 1\n}\n'
