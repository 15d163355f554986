"""Alerts on the host, with the real command and daemon and only the kernel
faked (tests/fake_ublk_cli.py): the events file (bounded, kept across a
re-add of the same id), the journal and syslog lines (on sockets the test
binds; the harness points the daemon at them), `quorumblk monitor`
(--program, its timeout, --mail, --oneshot, SIGTERM), the health word of
status and list, and "format" in every JSON output. The real device is
tested in the VM (tests/device/test_alerts.py).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import flip, make_images
from test_cli import FAKE, devices, nodes, qb, reps, rundir, wait_dead  # noqa: F401

pytestmark = pytest.mark.timeout(120)

MAX = 1 << 20       # quorumblk.events.MAX_EVENTS_FILE
BAD = [4096 * 3 + 17, 4096 * 100, 4096 * 255 + 4095]


def lines(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def types(evs):
    return [e["type"] for e in evs]


def wait_for(what, timeout=30.0):
    """what() until it is true; returns it (asserts on time out)."""
    end = time.monotonic() + timeout
    while True:
        v = what()
        if v or time.monotonic() > end:
            assert v, f"still false after {timeout} s: {what}"
            return v
        time.sleep(0.05)


def flip_bad(path):
    for off in BAD:
        flip(path, off)


def filler(path, size):
    """An events file of exactly size bytes of old events."""
    def line(pad):
        return json.dumps({"type": "old-filler", "replica": None, "path": None,
                           "offset": 0, "length": 0, "errno": 0, "time": 1.0,
                           "suppressed": 0, "pad": "x" * pad}) + "\n"
    n = size // len(line(100)) - 1
    last = size - n * len(line(100))
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "w") as f:
        f.write(line(100) * n + line(100 + last - len(line(100))))
    os.chmod(path, 0o600)
    return os.path.getsize(path)


# -- the events file --

def test_events_file_survives_a_readd_of_the_same_id(reps, devices, rundir):
    flip_bad(reps[1])
    devices("-t", "2", "--id", "0", *reps, env={"FAKE_UBLK_READ_ALL": "1"})
    assert qb("del", "0", fake=True).returncode == 0
    first = lines(rundir / "0.events")
    assert types(first).count("bad-block") == 3 and types(first)[-1] == "device-stopped"
    devices("-t", "2", "--id", "0", *reps)
    assert qb("del", "0", fake=True).returncode == 0
    both = lines(rundir / "0.events")
    assert both[:len(first)] == first
    assert types(both[len(first):]) == ["device-started", "device-stopped"]


def test_events_file_is_bounded(reps, devices, rundir):
    """Past 1 MiB N.events becomes N.events.1 (the older one goes) and a new
    N.events begins: the device's events never take more than ~2 MiB."""
    old = filler(rundir / "0.events", MAX - 100)
    flip_bad(reps[1])
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1"})
    assert qb("status", "0", fake=True).returncode == 0     # drains the events
    rotated = lines(rundir / "0.events.1")
    assert types(rotated)[-1] == "device-started"
    assert types(rotated[:-1]) == ["old-filler"] * len(rotated[:-1])
    assert os.path.getsize(rundir / "0.events.1") > old
    now = lines(rundir / "0.events")
    assert types(now).count("bad-block") == 3 and "old-filler" not in types(now)
    assert os.stat(rundir / "0.events.1").st_mode & 0o777 == 0o600
    assert os.stat(rundir / "0.events").st_mode & 0o777 == 0o600

    # a full file at the next start goes the same way, the older .1 with it
    assert qb("del", "0", fake=True).returncode == 0
    filler(rundir / "0.events", MAX + 10)
    devices("-t", "2", *reps)
    assert set(types(lines(rundir / "0.events.1"))) == {"old-filler"}
    assert types(lines(rundir / "0.events")) == ["device-started"]


def test_a_recovered_device_says_so_in_the_same_file(reps, devices, rundir):
    info = devices("-t", "2", *reps)
    os.kill(info["pid"], signal.SIGKILL)
    assert wait_dead(info["pid"])
    p = qb("recover", "--json", "0", fake=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["format"] == 1
    assert qb("del", "0", fake=True).returncode == 0
    assert types(lines(rundir / "0.events")) == ["device-started", "device-recovered",
                                                 "device-stopped"]


# -- the system log --

@pytest.fixture
def listener(tmp_path):
    """A datagram socket the test binds, as a logger would; recv() returns
    what came within a timeout, the premise being that something does."""
    path = str(tmp_path / "log.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(30)
    got = []

    def recv(until):
        while not until(got):
            got.append(s.recv(65536))
        return got

    yield path, recv
    s.close()


def test_events_reach_syslog_with_their_fields(reps, devices, listener):
    path, recv = listener
    flip_bad(reps[1])
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1", "FAKE_SYSLOG_SOCKET": path})
    got = recv(lambda got: sum(b"repaired" in g for g in got) >= 3)
    bad = [g.decode() for g in got if b": device 0: bad-block" in g]
    assert len(bad) == 3
    for g in bad:
        # facility daemon (3), warning (4): 3 * 8 + 4
        assert g.startswith("<28>") and " quorumblk[" in g, g
        assert "event=bad-block" in g and "replica=1" in g and f"path={reps[1]}" in g
        assert "length=4096" in g and "device=0" in g
    assert sorted(int(g.split(" offset=")[1].split()[0]) for g in bad) == \
        [o // 4096 * 4096 for o in BAD]
    assert [g[:4] for g in got if b"device-started" in g] == [b"<30>"]
    assert all(g.startswith(b"<29>") for g in got if b": device 0: repaired" in g)


def test_events_reach_the_journal_with_structured_fields(reps, devices, listener, rundir):
    path, recv = listener
    flip(reps[2], 4096 * 7)
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1", "FAKE_JOURNAL_SOCKET": path,
                                   "FAKE_SYSLOG_SOCKET": path + ".unused"})
    got = recv(lambda got: any(b"QUORUMBLK_EVENT=repaired" in g for g in got))
    bad = [g for g in got if b"QUORUMBLK_EVENT=bad-block\n" in g]
    assert len(bad) == 1
    fields = dict(line.split("=", 1) for line in bad[0].decode().splitlines())
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "quorumblk"
    assert fields["SYSLOG_FACILITY"] == "3"
    assert fields["QUORUMBLK_DEVICE"] == "0" and fields["QUORUMBLK_REPLICA"] == "2"
    assert fields["QUORUMBLK_PATH"] == reps[2] and fields["QUORUMBLK_OFFSET"] == str(4096 * 7)
    assert fields["QUORUMBLK_LENGTH"] == "4096"
    assert fields["MESSAGE"] == (f"device 0: bad-block on replica 2 ({reps[2]}) "
                                 f"offset {4096 * 7} length 4096")
    assert not os.path.exists(path + ".unused")


def test_journal_values_with_a_newline_use_the_binary_form():
    from quorumblk.events import journal_datagram

    d = journal_datagram({"A": "one", "B": "two\nlines"})
    assert d == b"A=one\nB\n" + (9).to_bytes(8, "little") + b"two\nlines\n"


def test_a_logger_that_does_not_listen_costs_nothing(reps, devices, rundir, tmp_path):
    """A socket nobody reads from any more (ECONNREFUSED): the events file
    still gets every event, status counts the lost lines, the device goes on."""
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.close()
    flip_bad(reps[1])
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1", "FAKE_SYSLOG_SOCKET": path})
    s = json.loads(qb("status", "--json", "0", fake=True).stdout)
    assert s["log_errors"] >= 7         # device-started, 3 bad-block, 3 repaired
    assert types(lines(rundir / "0.events")).count("repaired") == 3
    assert "sending events to the system log" in (rundir / "0.log").read_text()
    assert qb("del", "0", fake=True).returncode == 0


# -- monitor --

def monitor(*args, env=None):
    """Start `quorumblk monitor`; returns it once it has said that it
    follows the events (what comes after that is not backlog)."""
    p = subprocess.Popen([sys.executable, FAKE, "monitor", *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, **(env or {})))
    line = p.stderr.readline()
    assert "following the events of every device" in line, line + p.stderr.read()
    return p


def stop(p):
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    return out, err


def recorder(tmp_path, sleep=0):
    """A program that records its arguments and environment, a line per run."""
    prog = tmp_path / "prog.sh"
    rec = tmp_path / "prog.out"
    prog.write_text("#!/bin/sh\n"
                    f'printf \'%s|%s|%s|%s\\n\' "$*" "$QUORUMBLK_DEVICE" '
                    f'"$QUORUMBLK_DEVICE_ID" "$QUORUMBLK_EVENT_JSON" >> {rec}\n'
                    + (f"sleep {sleep}\n" if sleep else ""))
    prog.chmod(0o755)
    return prog, rec


def runs(rec):
    if not os.path.exists(rec):
        return []
    out = []
    for line in open(rec).read().splitlines():
        argv, dev, dev_id, ev = line.split("|", 3)
        out.append((argv.split(), dev, dev_id, json.loads(ev)))
    return out


def test_monitor_runs_the_program_for_each_event(reps, devices, rundir, nodes, tmp_path):
    # the events file rotates while the monitor follows it; its old lines
    # (and the events of a device that came and went before) are backlog
    filler(rundir / "0.events", MAX - 100)
    prog, rec = recorder(tmp_path)
    mon = monitor("--program", prog, "--scan-interval", "0.1", "--json")
    flip_bad(reps[1])
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1"})
    assert os.path.exists(rundir / "0.events.1")
    wait_for(lambda: [r for r in runs(rec) if r[3]["type"] == "repaired"][2:])
    got = runs(rec)
    assert got[0][3]["type"] == "device-started"
    assert sorted(r[3]["type"] for r in got[1:]) == ["bad-block"] * 3 + ["repaired"] * 3
    dev = str(nodes / "ublkb0")
    for argv, d, dev_id, e in got[1:]:
        assert argv == [e["type"], dev, reps[1]] and d == dev and dev_id == "0"
        assert e["replica"] == 1 and e["path"] == reps[1] and e["length"] == 4096
    assert sorted(r[3]["offset"] for r in got if r[3]["type"] == "bad-block") == \
        [o // 4096 * 4096 for o in BAD]
    assert got[0][0] == ["device-started", dev]

    # a device added while it runs is followed too
    (tmp_path / "more").mkdir()
    devices("-t", "2", *make_images(tmp_path / "more", 3, size=1 << 20))
    wait_for(lambda: any(r[2] == "1" for r in runs(rec)))
    out, _err = stop(mon)
    shown = [json.loads(line) for line in out.splitlines()]
    assert all(s["format"] == 1 and s["type"] == "event" for s in shown)
    assert [(s["device"], s["event"]["type"]) for s in shown] == \
        [(0, r[3]["type"]) for r in got] + [(1, "device-started")]


def test_monitor_kills_a_program_that_hangs_and_goes_on(reps, devices, tmp_path):
    prog, rec = recorder(tmp_path, sleep=1000)
    mon = monitor("--program", prog, "--program-timeout", "1", "--scan-interval", "0.1")
    flip(reps[0], 4096 * 9)
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1"})
    wait_for(lambda: len(runs(rec)) == 3)
    assert [r[3]["type"] for r in runs(rec)] == ["device-started", "bad-block", "repaired"]
    _out, err = stop(mon)
    assert err.count("ran longer than 1 s") >= 2, err


def test_monitor_mails_through_sendmail(reps, devices, tmp_path):
    mail = tmp_path / "mail.out"
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f'#!/bin/sh\necho "ARGS $*" >> {mail}\ncat >> {mail}\n')
    sendmail.chmod(0o755)
    mon = monitor("--mail", "ops@example.org", "--scan-interval", "0.1",
                  env={"FAKE_SENDMAIL": str(sendmail)})
    flip(reps[2], 4096 * 4)
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1"})
    wait_for(lambda: mail.exists() and "repaired" in mail.read_text())
    stop(mon)
    text = mail.read_text()
    assert "ARGS -t" in text and "To: ops@example.org" in text
    assert f"Subject: quorumblk: device 0: bad-block on replica 2 ({reps[2]})" in text


def test_monitor_mail_without_an_mta_is_refused(rundir, nodes, tmp_path):
    p = qb("monitor", "--mail", "root", fake=True,
           env={"FAKE_SENDMAIL": str(tmp_path / "no-sendmail")})
    assert p.returncode == 2
    assert p.stderr.startswith("quorumblk: --mail needs a local MTA") and \
        "no-sendmail" in p.stderr


def test_monitor_program_not_found_is_refused(rundir, nodes):
    p = qb("monitor", "--program", "/no/such/prog", fake=True)
    assert p.returncode == 2 and "/no/such/prog" in p.stderr


def test_monitor_backlog_reads_what_was_there(reps, devices, rundir):
    flip(reps[1], 0)
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1"})
    assert qb("status", "0", fake=True).returncode == 0     # drains the events
    mon = monitor("--backlog", "--scan-interval", "0.1")
    out, _ = stop(mon)
    assert "device 0: device-started" in out and "device 0: bad-block on replica 1" in out


def test_monitor_oneshot_summary_and_exit_code(reps, devices, rundir):
    p = qb("monitor", "--oneshot", fake=True)
    assert p.returncode == 0 and p.stdout == "no quorumblk devices\n"
    flip(reps[1], 4096)
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1"})
    p = qb("monitor", "--oneshot", fake=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(rundir.parent / "nodes" / "ublkb0"), "clean", "events:",
                                "bad-block", "1,", "device-started", "1,", "repaired", "1"]
    os.truncate(reps[2], 0)         # its reads fail: it leaves service
    assert qb("scrub", "0", fake=True).returncode == 0
    p = qb("monitor", "--oneshot", "--json", fake=True)
    assert p.returncode == 15, p.stderr
    s = json.loads(p.stdout)
    assert s["format"] == 1 and s["type"] == "summary" and s["clean"] is False
    (d,) = s["devices"]
    assert d["health"] == "degraded" and d["id"] == 0
    assert d["events"]["replica-failed"] == 1 and d["events"]["bad-block"] == 1


# -- health --

def health(dev="0"):
    p = qb("status", dev, fake=True)
    assert p.returncode == 0, p.stderr
    s = json.loads(qb("status", "--json", dev, fake=True).stdout)
    (entry,) = [d for d in json.loads(qb("list", "--json", fake=True).stdout)
                if d["id"] == int(dev)]
    assert p.stdout.splitlines()[0] == s["health"] == entry["health"]
    return s["health"]


def test_health_words(reps, devices, rundir, tmp_path):
    info = devices("-t", "2", *reps)
    assert health() == "clean"
    text = qb("status", "0", fake=True).stdout.splitlines()
    assert text[3].split()[:4] == ["replica", "state", "io", "reads"]
    assert text[6].startswith("replica 2 in-service") and text[6].endswith(reps[2])

    # a new replica being filled: resyncing (a slow copy, cancelled after)
    new = tmp_path / "new.img"
    new.write_bytes(b"\0" * (1 << 20))
    p = qb("add-replica", "0", new, "--rate", "16K", "--background", fake=True)
    assert p.returncode == 0, p.stderr
    assert health() == "resyncing"
    assert qb("job", "cancel", "0", fake=True).returncode == 0
    assert health() == "clean"

    os.truncate(reps[2], 0)
    assert qb("scrub", "0", fake=True).returncode == 0
    assert health() == "degraded"
    os.truncate(reps[1], 0)
    qb("scrub", "0", fake=True)
    assert health() == "failed"
    assert "failed" in qb("list", fake=True).stdout.splitlines()[0].split()

    os.kill(info["pid"], signal.SIGKILL)
    assert wait_dead(info["pid"])
    (entry,) = json.loads(qb("list", "--json", fake=True).stdout)
    assert entry["health"] == "quiesced" and entry["state"] == "quiesced"
    assert health() == "quiesced"
    s = json.loads(qb("status", "--json", "0", fake=True).stdout)
    assert (s["health"], s["state"]) == ("quiesced", "quiesced")
    assert "quorumblk recover 0" in s["error"], s["error"]
    assert qb("del", "0", fake=True).returncode == 0


# -- "format" in every JSON output --

def test_every_json_output_has_the_format(reps, devices, rundir, tmp_path):
    def out(*args, code=0):
        p = qb(*args, fake=True)
        assert p.returncode == code, p.stderr
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()] \
            if not p.stdout.startswith("[") and "\n " not in p.stdout \
            else [json.loads(p.stdout)]

    def check(objs):
        for o in objs:
            for x in (o if isinstance(o, list) else [o]):
                assert x["format"] == 1, x

    p = qb("add", "--json", "-t", "2", *reps, fake=True)
    check([json.loads(p.stdout)])
    check(out("list", "--json"))
    check(out("status", "--json", "0"))
    scrub = out("scrub", "--json", "0")
    assert {o["type"] for o in scrub} == {"progress", "result"}
    check(scrub)
    check(out("job", "show", "--json", "0"))
    new = tmp_path / "new.img"
    new.write_bytes(b"\0" * (1 << 20))
    check(out("add-replica", "--json", "--background", "0", new, "--rate", "16K"))
    check(out("job", "cancel", "--json", "0"))
    check(out("remove-replica", "--json", "0", "2"))
    err = out("status", "--json", "9", code=7)
    assert err[0]["type"] == "error"
    check(err)
    check(out("del", "--json", "0"))
    check(out("del", "--json", "--all"))
