"""Bad input gets a clear exception (errno, and a message naming the file,
the size or the errno) and nothing is written (DESIGN.md, issue 2 item 3)."""
import errno
import os

import pytest

from conftest import BS, IMAGE_SIZE, images, make_images
from quorumblk import errors
from quorumblk import (DegradedError, InvalidArgumentError, NoQuorumError,
                       Quorum, QuorumError)


def check(exc, err, *words):
    """The exception is one of ours, an OSError with errno err, and its
    message holds every word."""
    assert isinstance(exc, QuorumError)
    assert isinstance(exc, OSError)
    assert exc.errno == err, (exc.errno, str(exc))
    text = str(exc)
    for w in words:
        assert str(w) in text, f"{w!r} not in {text!r}"


def test_exception_family():
    for cls in (NoQuorumError, DegradedError, InvalidArgumentError):
        assert issubclass(cls, QuorumError)
    assert issubclass(QuorumError, OSError)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_command_error_has_its_exit_status_in_the_one_table():
    """The command's errors come from one family (every module's own
    errors are subclasses), and each one's exit status is a row of
    errors.EXIT_STATUS, which --help prints whole."""
    import quorumblk.cli  # noqa: F401  (imports every module with errors)
    table = dict(errors.EXIT_STATUS)
    subs = list(_subclasses(errors.CommandError))
    assert len(subs) >= 14
    for cls in [errors.CommandError] + subs:
        assert cls.exit_code in table, (cls, cls.exit_code)
    assert sorted(table) == list(range(16))
    text = errors.exit_status_text()
    for code, what in errors.EXIT_STATUS:
        assert f"{code:2} {what}" in text


@pytest.mark.parametrize("threshold", [0, 4, 100, -1])
def test_threshold_out_of_range(imgs, threshold):
    before = images(imgs)
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum(imgs, threshold)
    check(ei.value, errno.EINVAL, "threshold")
    assert images(imgs) == before


def test_threshold_not_an_integer(imgs):
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum(imgs, 1.5)
    check(ei.value, errno.EINVAL, "threshold")


def test_threshold_at_most_half_warns(imgs, open_quorum):
    with pytest.warns(UserWarning, match="majority"):
        open_quorum(imgs, 1)
    paths4 = make_images(os.path.dirname(imgs[0]), n=4, names=[
        "a.img", "b.img", "c.img", "d.img"])
    with pytest.warns(UserWarning):
        open_quorum(paths4, 2)


def test_majority_threshold_does_not_warn(imgs, open_quorum):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_quorum(imgs, 2)


def test_no_replicas():
    with pytest.raises(QuorumError) as ei:
        Quorum([], 1)
    assert ei.value.errno == errno.EINVAL


def test_too_many_replicas(tmp_path):
    from quorumblk._core import lib
    paths = make_images(tmp_path, n=lib.QB_MAX_REPLICAS + 1, size=8192)
    with pytest.raises(QuorumError) as ei:
        Quorum(paths, lib.QB_MAX_REPLICAS)
    check(ei.value, errno.EINVAL, str(lib.QB_MAX_REPLICAS))


def test_same_replica_twice(imgs):
    before = images(imgs)
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum([imgs[0], imgs[1], imgs[0]], 2)
    check(ei.value, errno.EINVAL, imgs[0], "same")
    assert images(imgs) == before


def test_same_replica_through_a_symlink(imgs, tmp_path):
    link = str(tmp_path / "link.img")
    os.symlink(imgs[1], link)
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum([imgs[0], imgs[1], link], 2)
    check(ei.value, errno.EINVAL, imgs[1], link)


def test_same_replica_through_a_hard_link(imgs, tmp_path):
    hard = str(tmp_path / "hard.img")
    os.link(imgs[2], hard)
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum([imgs[0], hard, imgs[2]], 2)
    check(ei.value, errno.EINVAL, hard, imgs[2])


def test_same_replica_through_another_path_spelling(imgs):
    d, name = os.path.split(imgs[0])
    other = os.path.join(d, ".", name)
    with pytest.raises(InvalidArgumentError):
        Quorum([imgs[0], imgs[1], other], 2)


def test_sizes_differ_names_each_size(tmp_path):
    paths = make_images(tmp_path)
    with open(paths[2], "ab") as f:
        f.write(bytes(BS))
    before = images(paths)
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum(paths, 2)
    check(ei.value, errno.EINVAL, paths[0], paths[1], paths[2],
          IMAGE_SIZE, IMAGE_SIZE + BS)
    assert images(paths) == before


def test_missing_replica(imgs, tmp_path):
    missing = str(tmp_path / "nope.img")
    before = images(imgs)
    with pytest.raises(QuorumError) as ei:
        Quorum([imgs[0], missing, imgs[2]], 2)
    check(ei.value, errno.ENOENT, missing, "ENOENT")
    assert images(imgs) == before
    assert not os.path.exists(missing), "a missing replica must not be created"


def test_directory_as_replica(imgs, tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(QuorumError) as ei:
        Quorum([imgs[0], imgs[1], str(d)], 2)
    assert ei.value.errno in (errno.EISDIR, errno.EINVAL)
    assert str(d) in str(ei.value)


def test_unwritable_replica(imgs):
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not refuse root, "
                    "and this machine's venv python is not runnable by an "
                    "unprivileged user (/root is 0700), so EACCES cannot be "
                    "produced here")
    os.chmod(imgs[1], 0o400)
    with pytest.raises(QuorumError) as ei:
        Quorum(imgs, 2)
    check(ei.value, errno.EACCES, imgs[1])


def test_replica_too_small_or_odd_sized(tmp_path):
    paths = make_images(tmp_path, size=1000)
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum(paths, 2)
    check(ei.value, errno.EINVAL, paths[0], 1000)


def test_empty_replica(tmp_path):
    paths = make_images(tmp_path, size=0)
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum(paths, 2)
    check(ei.value, errno.EINVAL, paths[0])


@pytest.mark.parametrize("opts,word", [
    ({"vote_block": 3000}, "vote block"),
    ({"vote_block": 256}, "vote block"),
    ({"vote_block": 2 << 20}, "vote block"),
    ({"max_io": 1000}, "max_io"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": -1}, "timeout"),
    ({"read_policy": "quick"}, "read policy"),
    ({"hash": "crc"}, "hash"),
])
def test_bad_options(imgs, opts, word):
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum(imgs, 2, **opts)
    check(ei.value, errno.EINVAL, word)


# ---- bad I/O ----

@pytest.fixture
def q(imgs, open_quorum):
    return open_quorum(imgs, 2)


@pytest.mark.parametrize("offset,length", [
    (IMAGE_SIZE, BS),               # at the end
    (IMAGE_SIZE - BS, 2 * BS),      # across the end
    (IMAGE_SIZE + (1 << 30), BS),   # far beyond
    ((1 << 64) - BS, BS),           # where offset + length wraps
])
def test_io_out_of_range(imgs, q, offset, length):
    before = images(imgs)
    for call in (lambda: q.read(offset, length),
                 lambda: q.write(offset, bytes(length)),
                 lambda: q.discard(offset, length),
                 lambda: q.write_zeroes(offset, length)):
        with pytest.raises(InvalidArgumentError) as ei:
            call()
        check(ei.value, errno.EINVAL, offset, IMAGE_SIZE)
    assert images(imgs) == before
    assert q.status()["counters"]["reads"] == 0


def test_negative_offset_or_length(imgs, q):
    with pytest.raises(InvalidArgumentError):
        q.read(-BS, BS)
    with pytest.raises(InvalidArgumentError):
        q.read(0, -BS)
    with pytest.raises(InvalidArgumentError):
        q.discard(-BS, BS)


def test_zero_length(imgs, q):
    before = images(imgs)
    for call in (lambda: q.read(0, 0), lambda: q.write(0, b""),
                 lambda: q.discard(0, 0)):
        try:
            r = call()
        except InvalidArgumentError as e:
            check(e, errno.EINVAL)
        else:
            assert r in (None, b"")
    assert images(imgs) == before


@pytest.mark.parametrize("offset,length", [(100, BS), (0, 100), (512, 700),
                                           (BS + 1, BS - 1)])
def test_misaligned_io(imgs, q, offset, length):
    before = images(imgs)
    for call in (lambda: q.read(offset, length),
                 lambda: q.write(offset, b"\x77" * length),
                 lambda: q.discard(offset, length),
                 lambda: q.write_zeroes(offset, length)):
        with pytest.raises(InvalidArgumentError) as ei:
            call()
        check(ei.value, errno.EINVAL, "align")
    assert images(imgs) == before


def test_length_above_max_io(imgs, open_quorum):
    q = open_quorum(imgs, 2, max_io=64 * 1024)
    before = images(imgs)
    with pytest.raises(InvalidArgumentError) as ei:
        q.read(0, 128 * 1024)
    check(ei.value, errno.EINVAL, "max_io", 64 * 1024)
    with pytest.raises(InvalidArgumentError) as ei:
        q.write(0, b"\x55" * (128 * 1024))
    check(ei.value, errno.EINVAL, "max_io")
    assert images(imgs) == before
    # exactly max_io is fine
    assert len(q.read(0, 64 * 1024)) == 64 * 1024


def test_io_after_close(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    q.read(0, BS)
    q.close()
    before = images(imgs)
    for call in (lambda: q.read(0, BS), lambda: q.write(0, bytes(BS)),
                 lambda: q.flush(), lambda: q.discard(0, BS),
                 lambda: q.write_zeroes(0, BS), lambda: q.status(),
                 lambda: q.events(), lambda: q.inject(0, "eio")):
        with pytest.raises(QuorumError) as ei:
            call()
        assert ei.value.errno == errno.EBADF
        assert "closed" in str(ei.value)
    assert images(imgs) == before
    q.close()       # a second close is harmless


def test_io_after_close_from_another_thread(imgs, open_quorum):
    """A thread whose context was made before close must not use it after
    (the context was destroyed with the quorum)."""
    import threading
    q = open_quorum(imgs, 2)
    go, done = threading.Event(), threading.Event()
    out = {}

    def worker():
        q.read(0, BS)
        done.set()
        go.wait(10)
        try:
            q.read(0, BS)
            out["r"] = "read succeeded after close"
        except QuorumError as e:
            out["r"] = e
    t = threading.Thread(target=worker)
    t.start()
    done.wait(10)
    q.close()
    go.set()
    t.join(10)
    assert isinstance(out["r"], QuorumError), out["r"]
    assert out["r"].errno == errno.EBADF


def test_context_manager_closes(imgs):
    with Quorum(imgs, 2) as q:
        q.read(0, BS)
    with pytest.raises(QuorumError):
        q.read(0, BS)


def test_messages_carry_the_errno_name(imgs, tmp_path):
    with pytest.raises(QuorumError) as ei:
        Quorum([imgs[0], imgs[1], str(tmp_path / "gone.img")], 2)
    assert "ENOENT" in str(ei.value)
    assert "No such file" in str(ei.value)


@pytest.mark.parametrize("call", [
    "read(0, 1 << 40)",             # would allocate a TiB before checking
    "read(0, (1 << 32) + BS)",      # does not fit the C length
    "read(1 << 64, BS)",            # does not fit the C offset
    "discard(0, 1 << 33)",
    "write_zeroes(1 << 70, BS)",
])
def test_huge_offsets_and_lengths_are_invalid_arguments(imgs, q, call):
    """Out of range is out of range, however far: InvalidArgumentError
    (EINVAL) with a message naming the device size, not an OverflowError or
    MemoryError from the binding."""
    before = images(imgs)
    with pytest.raises(InvalidArgumentError) as ei:
        eval("q." + call, {"q": q, "BS": BS})
    check(ei.value, errno.EINVAL)
    assert images(imgs) == before
