"""assembly.check_answers: a replica that does not answer (here a FIFO with
no writer: its open blocks, as a file on an unreachable hard NFS mount
blocks) refuses add and recover within the timeout, naming it; replicas
that answer, or fail at once, pass to the checks that follow."""
import os
import time

import pytest

from quorumblk import assembly
from quorumblk.errors import RefusedError


def test_a_replica_that_does_not_answer_is_refused_within_the_timeout(tmp_path):
    good = tmp_path / "good.img"
    good.write_bytes(b"\0" * 8192)
    silent = tmp_path / "silent.img"
    os.mkfifo(silent)
    t0 = time.monotonic()
    try:
        with pytest.raises(RefusedError) as e:
            assembly.check_answers([str(good), str(silent)], 0.5)
        took = time.monotonic() - t0
    finally:
        # a writer lets the blocked probe go
        os.close(os.open(silent, os.O_RDWR))
    assert 0.5 <= took < 5, took
    assert str(e.value) == (f"{silent} does not answer: a read of its first "
                            "block took more than 0.5 s (is its server "
                            "unreachable?)")
    assert e.value.exit_code == 10


def test_replicas_that_answer_or_fail_at_once_pass(tmp_path):
    good = tmp_path / "good.img"
    good.write_bytes(b"\0" * 8192)
    t0 = time.monotonic()
    assembly.check_answers([str(good), str(tmp_path / "missing.img")], 30)
    assert time.monotonic() - t0 < 5
