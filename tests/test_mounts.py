"""quorumblk.mounts: mountinfo lines parsed, the mount of a file found, and
the warning for a replica on NFS opened buffered; none for O_DIRECT (hard
or soft) or a local file system."""
import os

from quorumblk import mounts

ROOT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro"
HARD = ("98 22 0:53 / /mnt/nfs\\040a rw,relatime shared:60 - nfs4 "
        "10.0.0.2:/export rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,"
        "hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.1,"
        "local_lock=none,addr=10.0.0.2")
SOFT = HARD.replace("98 22 0:53", "99 22 0:54").replace("nfs\\040a", "nfs-b") \
    .replace(",hard,", ",soft,")
SOFTERR = HARD.replace("98 22 0:53", "100 22 0:55").replace("nfs\\040a", "nfs-c") \
    .replace(",hard,", ",softerr,")


def test_parse_reads_the_fields_and_unescapes_the_mount_point():
    root, hard = mounts.parse("\n".join([ROOT, HARD, "not a mountinfo line"]))
    assert (root.dev, root.mount_point, root.fstype, root.source) == \
        ((8, 1), "/", "ext4", "/dev/sda1")
    assert hard.dev == (0, 53) and hard.mount_point == "/mnt/nfs a"
    assert hard.fstype == "nfs4" and hard.source == "10.0.0.2:/export"
    assert hard.has("hard") and hard.has("timeo") and hard.has("relatime")
    assert not hard.has("soft") and not hard.has("time")


def test_optional_fields_before_the_separator_are_skipped():
    line = ("31 22 0:27 / /sys/fs/cgroup rw,nosuid shared:9 master:2 - "
            "cgroup2 cgroup2 rw,nsdelegate")
    (m,) = mounts.parse(line)
    assert m.fstype == "cgroup2" and m.source == "cgroup2"
    assert m.has("nsdelegate") and m.has("nosuid")


def _mount(line):
    (m,) = mounts.parse(line)
    return m


def test_a_replica_opened_buffered_on_nfs_is_named_in_a_warning():
    for line, point in ((HARD, "/mnt/nfs a"), (SOFT, "/mnt/nfs-b")):
        (w,) = mounts.unsafe(point + "/r.img", _mount(line), buffered=True)
        assert w == (f"{point}/r.img is on 10.0.0.2:/export (nfs4 on {point}) and "
                     "opened buffered: the NFS client's page cache answers its "
                     "reads, so rot in the server's copy goes unseen; leave the "
                     "replicas O_DIRECT (no --buffered)"), w


def test_o_direct_on_nfs_hard_or_soft_and_a_local_file_system_draw_no_warning():
    # soft and softerr too: measured in the VM (tests/device/test_nfs.py),
    # the client's give-up fails the replica and nothing lands later
    for line in (HARD, SOFT, SOFTERR):
        assert mounts.unsafe("/mnt/x/r.img", _mount(line)) == []
    assert mounts.unsafe("/r.img", _mount(ROOT)) == []
    assert mounts.unsafe("/r.img", _mount(ROOT), buffered=True) == []
    assert mounts.unsafe("/r.img", None, buffered=True) == []


def test_mount_of_picks_the_deepest_mount_point_of_the_files_device(tmp_path):
    f = tmp_path / "r.img"
    f.write_bytes(b"")
    st = os.stat(f)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    real = os.path.realpath(tmp_path).replace(" ", "\\040")
    parent = os.path.dirname(real)
    lines = [
        f"1 0 {dev} / / rw - ext4 /dev/x rw",
        f"2 1 {dev} / {parent} rw - nfs4 s:/a rw,soft",
        f"3 1 {dev} / {real} rw - nfs4 s:/b rw,hard",
        f"4 1 {dev} / {real}/elsewhere rw - nfs4 s:/c rw,soft",
        f"5 1 9999:1 / {real} rw - nfs4 s:/d rw,soft",
    ]
    m = mounts.mount_of(str(f), mounts.parse("\n".join(lines)))
    assert m.source == "s:/b"
    assert mounts.mount_of(str(f), mounts.parse(lines[4])) is None


def test_warnings_reads_a_mountinfo_file_and_skips_what_does_not_exist(tmp_path):
    f = tmp_path / "r.img"
    f.write_bytes(b"")
    st = os.stat(f)
    info = tmp_path / "mountinfo"
    info.write_text(f"7 1 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / / rw - "
                    "nfs4 srv:/x rw,vers=4.2,hard\n")
    (w,) = mounts.warnings([str(f), str(tmp_path / "missing.img")], buffered=True,
                           mountinfo=str(info))
    assert w.startswith(f"{f} is on srv:/x (nfs4 on /) and opened buffered")
    assert mounts.warnings([str(f)], mountinfo=str(info)) == []
    assert mounts.warnings([str(tmp_path / "missing.img")], buffered=True,
                           mountinfo=str(info)) == []


def test_a_file_on_nfs_names_its_server_in_status_and_events(tmp_path):
    """status and every event of a replica on NFS say which server holds
    it (the mount's source), looked up once while the replica opens; a
    local replica has no server."""
    from quorumblk import events, replica
    from quorumblk.core import Quorum

    paths = []
    for i in range(3):
        p = tmp_path / f"r{i}.img"
        p.write_bytes(bytes(1 << 20))
        paths.append(str(p))
    st = os.stat(paths[2])
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    info = tmp_path / "mountinfo"
    info.write_text(f"98 22 {dev} / {tmp_path} rw - nfs4 10.0.0.2:/export rw,hard\n")
    assert replica.server(paths[2], mountinfo=str(info)) == "10.0.0.2:/export"
    assert replica.server(paths[2]) is None      # premise: really a local file
    q = Quorum(paths, 2)
    try:
        q.servers[2] = replica.server(paths[2], mountinfo=str(info))
        with open(paths[2], "r+b") as f:        # rot on "the server"
            f.write(b"\xff" * 512)
        assert q.read(0, 4096) == bytes(4096)
        reps = q.status()["replicas"]
        assert reps[2]["server"] == "10.0.0.2:/export"
        assert "server" not in reps[0]
        (bad,) = [e for e in q.events() if e["type"] == "bad-block"]
        assert bad["replica"] == 2 and bad["server"] == "10.0.0.2:/export"
        assert f"({paths[2]} on 10.0.0.2:/export)" in events.message(0, bad)
    finally:
        q.close()
