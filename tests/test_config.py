"""Devices that come back (issue 9 item 2), on the host with only the kernel
faked (tests/fake_ublk_cli.py): the configuration (read, write, refusals),
examine (read-only), add --save, assemble and its refusals, the stable name,
the systemd unit."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_images
from test_cli import alive, devices, nodes, qb, reps, rundir, wait_dead  # noqa: F401
from test_cli_safe import files, set_uuid
from quorumblk import config, meta

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def conf(tmp_path, rundir):
    return tmp_path / "conf"


@pytest.fixture
def names(tmp_path, rundir):
    return tmp_path / "dev-names"


def entry(**kw):
    e = {"name": "vol0", "set_uuid": "0b6a3f6e-4a0e-4d7c-9c53-3f1c1e0e2a11",
         "threshold": 2, "replicas": ["/srv/a.img", "/srv/b.img", "/srv/c.img"]}
    e.update(kw)
    return e


def write_raw(conf, name, text, mode=0o644):
    conf.mkdir(exist_ok=True)
    p = conf / f"{name}.toml"
    p.write_text(text)
    os.chmod(p, mode)
    return p


# -- the configuration --

def test_an_entry_reads_back_as_written_with_awkward_strings(conf):
    odd = '/srv/we"ird\\name\tx\x7f.img'
    e = entry(replicas=["/srv/a.img", odd], devices=["/dev/disk/by-id/qb-*"],
              timeout=2.5, repair=False, id=3)
    path = config.write(e, str(conf))
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    got = config.read("vol0", str(conf))
    assert got["replicas"] == ["/srv/a.img", odd]
    assert got["devices"] == ["/dev/disk/by-id/qb-*"]
    assert (got["timeout"], got["repair"], got["id"], got["threshold"]) == (2.5, False, 3, 2)
    assert got["read_policy"] == "all" and got["allow_degraded"] is False   # defaults
    with pytest.raises(config.CommandError, match="exists"):
        config.write(e, str(conf))      # never replaced


@pytest.mark.parametrize("text, why", [
    ("name = 'vol0\n", "bad TOML"),
    ("name = 'vol0'\nset_uuid = 'x'\nthreshold = 1\nreplicas = ['/a']\n", "not a UUID"),
    ("name = 'vol1'\nset_uuid = '0b6a3f6e-4a0e-4d7c-9c53-3f1c1e0e2a11'\n"
     "threshold = 1\nreplicas = ['/a']\n", "not 'vol0'"),
    ("name = 'vol0'\nset_uuid = '0b6a3f6e-4a0e-4d7c-9c53-3f1c1e0e2a11'\n"
     "threshold = 3\nreplicas = ['/a']\n", "threshold 3 out of range"),
    ("name = 'vol0'\nset_uuid = '0b6a3f6e-4a0e-4d7c-9c53-3f1c1e0e2a11'\n"
     "threshold = 1\nreplicas = ['a.img']\n", "absolute"),
    ("name = 'vol0'\nset_uuid = '0b6a3f6e-4a0e-4d7c-9c53-3f1c1e0e2a11'\n"
     "threshold = 1\nreplicas = ['/a']\ncolour = 'red'\n", "unknown key 'colour'"),
    ("name = 'vol0'\nthreshold = 1\nreplicas = ['/a']\n", "set_uuid is missing"),
    ("name = 'vol0'\nset_uuid = '0b6a3f6e-4a0e-4d7c-9c53-3f1c1e0e2a11'\n"
     "threshold = true\nreplicas = ['/a']\n", "threshold must be a int"),
    ("name = 'vol0'\nset_uuid = '0b6a3f6e-4a0e-4d7c-9c53-3f1c1e0e2a11'\n"
     "threshold = 1\nreplicas = ['/a']\ndepth = 0\n", "depth = 0: 1 to 4096"),
    ("name = 'vol0'\nset_uuid = '0b6a3f6e-4a0e-4d7c-9c53-3f1c1e0e2a11'\n"
     "threshold = 1\nreplicas = ['/a']\nvote_block = 3000\n", "vote_block = 3000: a power"),
    ("name = 'vol0'\nset_uuid = '0b6a3f6e-4a0e-4d7c-9c53-3f1c1e0e2a11'\n"
     "threshold = 1\nreplicas = ['/a']\nread_policy = 'any'\n", "read_policy = 'any'"),
])
def test_a_bad_entry_is_refused_naming_the_file(conf, text, why):
    p = write_raw(conf, "vol0", text)
    r = qb("config", "show", "vol0")
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"quorumblk: {p}: ") and why in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_an_entry_writable_by_others_is_refused(conf):
    p = config.write(entry(), str(conf))
    assert qb("config", "show", "vol0").returncode == 0, "premise: a good entry"
    os.chmod(p, 0o666)
    r = qb("config", "show", "vol0")
    assert r.returncode == 1 and "writable by others (mode 0666)" in r.stderr, r.stderr


@pytest.mark.parametrize("name", [".hidden", "a/b", "x" * 65, "", "vol 0", "ü"])
def test_bad_names_are_refused(conf, reps, nodes, name):
    r = qb("assemble", name)
    assert r.returncode == 2 and "bad device name" in r.stderr, r.stderr
    r = qb("add", "--save", name, "-t", "2", *reps, fake=True)
    assert r.returncode == 2 and "bad device name" in r.stderr, r.stderr
    assert all(set_uuid(p) is None for p in reps)


def test_an_unknown_name_is_exit_7(conf, nodes):
    r = qb("assemble", "nosuch")
    assert r.returncode == 7 and "no configured device nosuch" in r.stderr, r.stderr


def test_a_config_dir_someone_else_may_write_is_refused(tmp_path, monkeypatch, rundir):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setenv("QUORUMBLK_CONFIG_DIR", str(d))
    r = qb("config", "list")
    assert r.returncode == 1 and "writable by others" in r.stderr, r.stderr


# -- examine --

def test_examine_reads_the_metadata_and_writes_nothing(tmp_path, reps):
    plan = meta.create([str(p) for p in reps], 2)
    before = files(reps)
    r = qb("examine", "--json", reps[1])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == 1
    assert info["set_uuid"] == plan.set_uuid
    assert info["replica_uuid"] == meta.uuid_text(plan.metas[1].replica_uuid)
    assert info["slot"] == 1 and info["threshold"] == 2 and info["clean"] is True
    assert [m["state"] for m in info["members"]] == ["in-service"] * 3
    assert [m["this"] for m in info["members"]] == [False, True, False]
    assert info["data_size"] == 1 << 20
    t = qb("examine", reps[1])
    assert t.returncode == 0 and plan.set_uuid in t.stdout and "clean" in t.stdout
    assert "<- this one" in t.stdout
    assert files(reps) == before, "examine changed a replica"


def test_examine_says_when_there_is_no_metadata(reps):
    before = files(reps)
    r = qb("examine", reps[0])
    assert r.returncode == 1 and "no quorumblk metadata" in r.stderr, r.stderr
    r = qb("examine", "--json", reps[0])
    assert json.loads(r.stdout.splitlines()[0])["metadata"] is False
    assert files(reps) == before


# -- add --save, assemble, the stable name --

def _del(dev):
    r = qb("del", dev, fake=True)
    assert r.returncode == 0, r.stderr


def _events(rundir, dev_id):
    with open(rundir / f"{dev_id}.events") as f:
        return [json.loads(line) for line in f]


def test_add_save_then_assemble_by_the_entry_alone(conf, names, reps, nodes, rundir):
    r = qb("add", "--json", "--save", "vol0", "-t", "2", "--depth", "64", *reps,
           fake=True)
    assert r.returncode == 0, r.stderr
    dev = json.loads(r.stdout)
    e = config.read("vol0", str(conf))
    assert e["set_uuid"] == set_uuid(reps[0]) and e["depth"] == 64
    assert e["replicas"] == [str(p) for p in reps]
    link = names / "vol0"
    assert os.path.realpath(link) == dev["path"]
    _del(dev["id"])
    assert not os.path.lexists(link), "del left the stable name"
    a = qb("assemble", "--json", "vol0", fake=True)
    assert a.returncode == 0, a.stderr
    got = json.loads(a.stdout)
    assert got["format"] == 1
    assert got["name"] == "vol0" and os.path.realpath(link) == got["path"]
    st = json.loads(qb("status", "--json", got["id"], fake=True).stdout)
    assert [r["path"] for r in st["replicas"]] == [str(p) for p in reps]
    assert st["threshold"] == 2
    again = qb("assemble", "vol0", fake=True)
    assert again.returncode == 10 and "runs already" in again.stderr, again.stderr
    scan = qb("assemble", "--scan", fake=True)
    assert scan.returncode == 0 and scan.stdout == "", scan.stderr
    _del(got["id"])


def test_add_save_refuses_an_existing_entry_before_it_starts_anything(conf, reps, nodes):
    config.write(entry(), str(conf))
    r = qb("add", "--save", "vol0", "-t", "2", *reps, fake=True)
    assert r.returncode == 2 and "exists" in r.stderr, r.stderr
    assert all(set_uuid(p) is None for p in reps) and os.listdir(nodes) == []


def test_a_stale_stable_name_is_replaced_not_followed(conf, names, reps, nodes, tmp_path):
    names.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, names / "vol0")
    r = qb("add", "--json", "--save", "vol0", "-t", "2", *reps, fake=True)
    assert r.returncode == 0, r.stderr
    dev = json.loads(r.stdout)
    assert os.path.realpath(names / "vol0") == dev["path"]
    assert victim.read_text() == "keep"
    _del(dev["id"])


@pytest.fixture
def saved(conf, reps, nodes):
    """vol0 saved over reps and stopped again."""
    r = qb("add", "--json", "--save", "vol0", "-t", "2", *reps, fake=True)
    assert r.returncode == 0, r.stderr
    _del(json.loads(r.stdout)["id"])
    return reps


def test_assemble_takes_over_a_device_whose_daemon_died(conf, names, reps, nodes):
    """What the unit's restart does after a crash: assemble serves the
    quiesced device again (the same device, a new daemon), it does not
    refuse its replicas as in use."""
    r = qb("add", "--json", "--save", "vol0", "-t", "2", *reps, fake=True)
    assert r.returncode == 0, r.stderr
    dev = json.loads(r.stdout)
    os.kill(dev["pid"], signal.SIGKILL)
    assert wait_dead(dev["pid"])
    a = qb("assemble", "--json", "vol0", fake=True)
    assert a.returncode == 0, a.stderr
    assert f"device {dev['id']} waits for its daemon, which died: recovering it " \
        "instead" in a.stderr
    got = json.loads(a.stdout)
    assert got["id"] == dev["id"] and got["path"] == dev["path"]
    assert got["pid"] != dev["pid"] and alive(got["pid"])
    assert os.path.realpath(names / "vol0") == dev["path"]
    st = json.loads(qb("status", "--json", dev["id"], fake=True).stdout)
    assert st["state"] == "live" and st["options"]["name"] == "vol0"
    _del(dev["id"])


def test_assemble_refuses_a_member_of_another_set_naming_it(saved, tmp_path):
    (tmp_path / "other").mkdir()
    other = make_images(tmp_path / "other", 3, size=1 << 20, seed=7)
    meta.create([str(p) for p in other], 2)
    shutil.copyfile(other[1], saved[1])
    before = files(saved)
    r = qb("assemble", "vol0", fake=True)
    assert r.returncode == 10, r.stderr
    assert f"1 of 3 members missing: member " in r.stderr
    assert f"{saved[1]} belongs to another replica set ({set_uuid(other[0])})" in r.stderr
    assert files(saved) == before


def test_members_that_moved_are_found_by_their_metadata(saved, tmp_path):
    """A configured path that now holds another replica of the set, or
    nothing of quorumblk's, is named and left out; the members are found
    where they are now (the configured folders are scanned)."""
    os.rename(saved[0], str(saved[0]) + ".moved")
    os.rename(saved[1], saved[0])
    with open(saved[1], "wb") as f:
        f.write(bytes(1 << 20))
    r = qb("assemble", "--json", "vol0", fake=True)
    assert r.returncode == 0, r.stderr
    assert f"{saved[1]} has no quorumblk metadata" in r.stderr
    dev = json.loads(r.stdout)
    st = json.loads(qb("status", "--json", dev["id"], fake=True).stdout)
    assert [x["path"] for x in st["replicas"]] == [str(saved[0]) + ".moved", saved[0],
                                                   saved[2]]
    assert st["in_service"] == 3
    _del(dev["id"])


def away(path, tmp_path):
    """Take a replica away (out of every place assemble looks)."""
    d = tmp_path / "away"
    d.mkdir(exist_ok=True)
    os.rename(path, d / os.path.basename(path))


def test_assemble_refuses_missing_members_unless_degraded(saved, rundir, tmp_path):
    keep = set_uuid(saved[0])
    missing = config.examine(str(saved[2]))["replica_uuid"]
    away(saved[2], tmp_path)
    before = files(saved[:2])
    r = qb("assemble", "vol0", fake=True)
    assert r.returncode == 10, r.stderr
    assert f"1 of 3 members missing: member {missing} ({saved[2]})" in r.stderr
    assert files(saved[:2]) == before, "a refused assemble wrote to a replica"
    r = qb("assemble", "--json", "--degraded", "vol0", fake=True)
    assert r.returncode == 0, r.stderr
    dev = json.loads(r.stdout.splitlines()[-1])
    assert "starting degraded" in r.stderr
    evs = [e for e in _events(rundir, dev["id"]) if e["type"] == "member-missing"]
    assert [e["member"] for e in evs] == [missing]
    st = json.loads(qb("status", "--json", dev["id"], fake=True).stdout)
    assert any(e["type"] == "member-missing" for e in st["events"])
    assert set_uuid(saved[0]) == keep
    _del(dev["id"])


def test_an_entry_that_allows_it_starts_degraded_without_the_option(saved, conf,
                                                                   tmp_path):
    p = conf / "vol0.toml"
    p.write_text(p.read_text().replace("allow_degraded = false", "allow_degraded = true"))
    away(saved[0], tmp_path)
    r = qb("assemble", "--json", "vol0", fake=True)
    assert r.returncode == 0, r.stderr
    _del(json.loads(r.stdout)["id"])


def _entry_when(conf, check, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        e = config.read("vol0", str(conf))
        if check(e) or time.monotonic() > deadline:
            return e
        time.sleep(0.1)


def test_the_entry_follows_replace_and_remove_replica(conf, reps, nodes, tmp_path):
    """A replacement kept outside every folder assemble looks in is found
    at the next assemble, and a removed member is not waited for: the
    running device rewrote its entry."""
    r = qb("add", "--json", "--save", "vol0", "-t", "2", *reps, fake=True)
    assert r.returncode == 0, r.stderr
    dev = json.loads(r.stdout)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    new = elsewhere / "new.img"
    with open(new, "wb") as f:
        f.truncate(os.path.getsize(reps[2]))
    p = qb("replace", dev["id"], reps[2], new, fake=True)
    assert p.returncode == 0, p.stderr
    e = _entry_when(conf, lambda e: str(new) in e["replicas"])
    assert e["replicas"] == [str(reps[0]), str(reps[1]), str(new)]
    new_uuid = config.examine(str(new))["replica_uuid"]
    assert e["members"][2] == new_uuid
    p = qb("remove-replica", dev["id"], reps[1], fake=True)
    assert p.returncode == 0, p.stderr
    e = _entry_when(conf, lambda e: len(e["replicas"]) == 2)
    assert e["replicas"] == [str(reps[0]), str(new)]
    assert e["set_uuid"] == set_uuid(reps[0])
    _del(dev["id"])
    a = qb("assemble", "--json", "vol0", fake=True)
    assert a.returncode == 0, a.stderr
    got = json.loads(a.stdout)
    st = json.loads(qb("status", "--json", got["id"], fake=True).stdout)
    assert [(x["path"], x["state"]) for x in st["replicas"]] == [
        (str(reps[0]), "in-service"), (str(new), "in-service")]
    _del(got["id"])


def test_assemble_finds_a_member_that_moved_through_devices_globs(saved, conf, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(saved[1], moved / "b.img")
    p = conf / "vol0.toml"
    p.write_text(p.read_text() + f'devices = ["{moved}/*.img"]\n')
    r = qb("assemble", "--json", "vol0", fake=True)
    assert r.returncode == 0, r.stderr
    dev = json.loads(r.stdout)
    st = json.loads(qb("status", "--json", dev["id"], fake=True).stdout)
    assert str(moved / "b.img") in [r["path"] for r in st["replicas"]]
    assert st["in_service"] == 3
    _del(dev["id"])


def test_assemble_scan_starts_what_is_configured_and_not_running(saved, nodes):
    r = qb("assemble", "--scan", fake=True)
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(nodes)) == 1
    _del(os.path.basename(r.stdout.strip()))


# -- the systemd unit --

def test_install_unit_writes_and_enables_the_unit(saved, conf, tmp_path):
    units = tmp_path / "units"
    exe = os.path.realpath(sys.executable)      # verify wants it executable
    r = qb("config", "install-unit", "--unit-dir", units, "--exec", exe, "vol0")
    assert r.returncode == 0, r.stderr
    unit = units / "quorumblk@vol0.service"
    text = unit.read_text()
    for line in ("Type=notify", "DefaultDependencies=no",
                 f"ExecStart={exe} assemble --foreground --config-dir {conf} vol0",
                 f"RequiresMountsFor={os.path.dirname(saved[0])}",
                 "Conflicts=umount.target shutdown.target",
                 "Before=local-fs.target umount.target shutdown.target",
                 "Restart=on-abnormal", "WantedBy=local-fs.target"):
        assert line + "\n" in text, text
    wants = units / "local-fs.target.wants" / "quorumblk@vol0.service"
    assert os.readlink(wants) == "../quorumblk@vol0.service"
    if not shutil.which("systemd-analyze"):
        return
    v = subprocess.run(["systemd-analyze", "verify", str(unit)],
                       capture_output=True, text=True)
    assert v.returncode == 0 and "quorumblk@vol0" not in v.stderr, v.stderr


def test_a_unit_over_nbd_exports_comes_up_with_the_remote_file_systems(conf, tmp_path):
    """Remote replicas need the network: the unit is ordered after it and
    with remote-fs.target (before local-fs.target it would be a cycle with
    the network), and waits for no file for an export."""
    uris = [f"nbd://10.0.0.{i}/disk" for i in (1, 2, 3)]
    config.write(entry(name="far", replicas=uris), str(conf))
    units = tmp_path / "units"
    exe = os.path.realpath(sys.executable)
    (units / "local-fs.target.wants").mkdir(parents=True)
    os.symlink("../quorumblk@far.service",
               units / "local-fs.target.wants" / "quorumblk@far.service")
    r = qb("config", "install-unit", "--unit-dir", units, "--exec", exe, "far")
    assert r.returncode == 0, r.stderr
    unit = units / "quorumblk@far.service"
    text = unit.read_text()
    for line in ("Wants=network-online.target",
                 "After=network-online.target remote-fs-pre.target",
                 "Before=remote-fs.target umount.target shutdown.target",
                 "WantedBy=remote-fs.target"):
        assert line + "\n" in text, text
    assert "local-fs.target" not in text and "RequiresMountsFor" not in text, text
    assert os.readlink(units / "remote-fs.target.wants" / "quorumblk@far.service") == \
        "../quorumblk@far.service"
    assert not os.path.lexists(units / "local-fs.target.wants" / "quorumblk@far.service")
    if not shutil.which("systemd-analyze"):
        return
    v = subprocess.run(["systemd-analyze", "verify", str(unit)],
                       capture_output=True, text=True)
    assert v.returncode == 0 and "quorumblk@far" not in v.stderr, v.stderr


def test_unit_escaping_is_systemd_escapes():
    assert config._unit_escape("/dev/disk/by-id/virtio-a-b") == \
        "dev-disk-by\\x2did-virtio\\x2da\\x2db"
    if shutil.which("systemd-escape"):
        out = subprocess.run(["systemd-escape", "--path", "/dev/disk/by-id/virtio-a-b"],
                             capture_output=True, text=True).stdout.strip()
        assert out == "dev-disk-by\\x2did-virtio\\x2da\\x2db"
