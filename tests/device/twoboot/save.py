"""Two-boot test, boot 1 ("save"): `quorumblk add --save` over the three
replica disks (the entry goes to the etc disk), ext4 on /dev/quorumblk/NAME
with files of random data and their checksums, then a clean stop (`del`):
every replica's metadata must say clean. Writes the report (tbcommon.REPORT)
that boot 2 (test_twoboot.py) asserts on first: "ok", or the error.
Run by tests/device/two-boots.sh inside the VM.
"""
import json
import os
import sys
import time
import traceback

from tbcommon import (CONF, ETC, ETC_DISK, MNT, NAME, THRESHOLD, by_serial, qb,
                      run, save_report, sha256_files, DISKS)


def main():
    t0 = time.monotonic()
    disks = by_serial()
    paths = [disks[d] for d in DISKS]
    report = {"ok": False, "paths": disks}
    try:
        run(["mkfs.ext4", "-q", "-F", disks[ETC_DISK]])
        os.makedirs(ETC, exist_ok=True)
        run(["mount", disks[ETC_DISK], ETC])
        p = qb("add", "--json", "--save", NAME, "--config-dir", CONF,
               "-t", THRESHOLD, *paths)
        assert p.returncode == 0, f"add --save exited {p.returncode}: {p.stderr}"
        info = json.loads(p.stdout)
        link = f"/dev/quorumblk/{NAME}"
        assert os.path.realpath(link) == info["path"], \
            f"{link} -> {os.path.realpath(link)}, not {info['path']}"
        entry = json.loads(qb("config", "show", "--json", "--config-dir", CONF,
                              NAME).stdout)
        run(["mkfs.ext4", "-q", link])
        os.makedirs(MNT, exist_ok=True)
        run(["mount", link, MNT])
        for i in range(6):
            with open(os.path.join(MNT, f"data{i}"), "wb") as f:
                f.write(os.urandom((i + 1) << 20))
        report["files"] = sha256_files(MNT)
        run(["umount", MNT])
        d = qb("del", info["id"])
        assert d.returncode == 0, f"del exited {d.returncode}: {d.stderr}"
        assert not os.path.lexists(link), f"del left {link}"
        members = {}
        for serial, path in zip(DISKS, paths):
            ex = json.loads(qb("examine", "--json", path).stdout)
            assert ex["set_uuid"] == entry["set_uuid"], ex
            assert ex["clean"], f"{path} is not clean after del: {ex}"
            members[serial] = ex["replica_uuid"]
        run(["umount", ETC])
        report.update(ok=True, set_uuid=entry["set_uuid"], members=members,
                      device=info["path"], seconds=round(time.monotonic() - t0, 1))
    except BaseException as e:
        report["error"] = f"{e}\n{traceback.format_exc()}"
        print(report["error"], file=sys.stderr)
    save_report(report)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
