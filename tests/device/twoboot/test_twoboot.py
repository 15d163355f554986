"""Two-boot test, boot 2 ("check"): the device comes back from its
configuration alone. Boot 1 (save.py) made it with `add --save`, wrote files
and stopped it cleanly; this boot has the same disks, attached in the
reverse order (other /dev/vdX names), and the entry on the etc disk.
`assemble --scan` must find the members by their metadata, serve the device
as /dev/quorumblk/NAME with the data intact; then with one member missing
assemble must refuse (exit 10, naming it) unless --degraded, and start
degraded with it, with a member-missing event.

Runs only in the second boot of scripts/test-device (two-boots.sh TEST check).
Elsewhere it is skipped with the reason (tests/device/conftest.py;
QB_TWOBOOT_SKIP where the host's own kernel has ublk).
"""
import json
import os
import subprocess

import pytest

from tbcommon import (CONF, DISKS, ETC, ETC_DISK, MNT, NAME, REPORT, by_serial, qb,
                      run, sha256_files)

pytestmark = [
    pytest.mark.timeout(400),
    pytest.mark.skipif(bool(os.environ.get("QB_TWOBOOT_SKIP")),
                       reason=os.environ.get("QB_TWOBOOT_SKIP", "")),
]
LINK = f"/dev/quorumblk/{NAME}"


def saved():
    if not os.path.exists(REPORT):
        pytest.fail(f"boot 1 left no {REPORT}: see tests/device/logs/vm-twoboot-save.log")
    with open(REPORT) as f:
        r = json.load(f)
    assert r.get("ok"), f"boot 1 (save) failed:\n{r.get('error')}"
    return r


@pytest.fixture(scope="module")
def etc():
    """The etc disk mounted, as /etc is at boot."""
    disks = by_serial()
    os.makedirs(ETC, exist_ok=True)
    run(["mount", disks[ETC_DISK], ETC])
    yield disks
    subprocess.run(["umount", ETC], capture_output=True, timeout=60)


def serve_and_check(dev, report):
    """The device's files are the ones boot 1 wrote."""
    os.makedirs(MNT, exist_ok=True)
    run(["mount", "-o", "ro", LINK, MNT])
    try:
        assert sha256_files(MNT) == report["files"]
    finally:
        run(["umount", MNT])


def stop(dev):
    d = qb("del", dev["id"])
    assert d.returncode == 0, d.stderr
    assert not os.path.lexists(LINK), f"del left {LINK}"


def test_assemble_scan_from_the_configuration_alone(etc):
    r = saved()
    moved = [s for s in DISKS if etc[s] != r["paths"][s]]
    print(f"\nboot 1: {r['paths']}\nboot 2: {etc}")
    assert moved, "premise: the replica disks came back under other names"
    assert not os.path.lexists(LINK)
    p = qb("assemble", "--scan", "--json", "--config-dir", CONF)
    assert p.returncode == 0, p.stderr
    dev = json.loads(p.stdout)
    try:
        assert dev["name"] == NAME
        assert os.path.realpath(LINK) == dev["path"]
        st = json.loads(qb("status", "--json", dev["id"]).stdout)
        assert st["in_service"] == 3
        assert sorted(x["path"] for x in st["replicas"]) == sorted(etc[s] for s in DISKS)
        assert st["resync"]["reason"] == "none", "boot 1 stopped cleanly"
        serve_and_check(dev, r)
        again = qb("assemble", "--scan", "--config-dir", CONF)
        assert again.returncode == 0 and again.stdout == "", again.stderr
    finally:
        subprocess.run(["umount", MNT], capture_output=True, timeout=60)
        stop(dev)


def test_a_missing_member_starts_only_degraded_with_an_event(etc):
    r = saved()
    gone = DISKS[1]
    node = etc[gone]
    uuid = r["members"][gone]
    ex = json.loads(qb("examine", "--json", node).stdout)
    assert ex["replica_uuid"] == uuid, "premise: the disk is that member"
    os.unlink(node)         # the disk is gone as far as quorumblk can see
    others = [etc[s] for s in DISKS if s != gone]
    before = [json.loads(qb("examine", "--json", p).stdout) for p in others]
    p = qb("assemble", "--config-dir", CONF, NAME)
    assert p.returncode == 10, p.stderr
    assert f"1 of 3 members missing: member {uuid}" in p.stderr, p.stderr
    after = [json.loads(qb("examine", "--json", p).stdout) for p in others]
    assert after == before, "a refused assemble changed a replica's metadata"
    assert not os.path.lexists(LINK)
    p = qb("assemble", "--degraded", "--json", "--config-dir", CONF, NAME)
    assert p.returncode == 0, p.stderr
    dev = json.loads(p.stdout)
    try:
        assert "starting degraded" in p.stderr
        st = json.loads(qb("status", "--json", dev["id"]).stdout)
        assert st["in_service"] == 2 and len(st["replicas"]) == 2
        evs = [e for e in st["events"] if e["type"] == "member-missing"]
        assert [e["member"] for e in evs] == [uuid], st["events"]
        serve_and_check(dev, r)
    finally:
        subprocess.run(["umount", MNT], capture_output=True, timeout=60)
        stop(dev)
    states = {m["uuid"]: m["state"] for m in
              json.loads(qb("examine", "--json", others[0]).stdout)["members"]}
    assert states[uuid] == "failed", states
