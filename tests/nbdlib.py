"""NBD servers for the tests, each alone in its own network namespace.

A Server is one NBD server process (nbdkit's file plugin or qemu-nbd, both
from Debian) over a backing file, in a network namespace of its own, linked
to the test's (the host's) namespace by a veth pair with a /30 of its own, so
that one server can be cut off while the others keep answering. Both servers
run without a page cache of their own (nbdkit cache=none, qemu-nbd
--cache=none: O_DIRECT), so a bit flipped in the backing file is what the
next read over NBD sees.

What a test can do to a server, as the world does it to a real one:
  kill()     SIGKILL; start() again serves the same file at the same address
  freeze()   SIGSTOP: connections stay up, nothing is answered; thaw() SIGCONT
  drop()     every packet on its link silently lost in both directions
             (nftables netdev ingress + egress in its namespace: no RST, no
             ICMP, so a TCP connection stays up); restore() lets them through
             and the connection resumes with TCP's retransmissions
  flip()     a bit changed in the backing file, below the server
A slow server is started slow: start(delay_ms=...) puts nbdkit's delay
filter in front of the file (this host's kernel has no sch_netem, so the
delay is the server's, which is also what a slow appliance does).

Namespaces and veths are named qbH<pid>x<n>..., so parallel runs do not
clash and what a killed run left behind can be recognised (its pid is gone)
and removed. Net.close() (the `nbd_net` fixture's finalizer) kills every
server and removes every namespace and veth even when a test failed.

Every operation checks that it happened: start() waits until nbdinfo reads
the export's size (with a deadline), freeze() until the process is stopped,
drop() until a TCP connect to the server times out (neither accepted nor
refused), kill() until the process is reaped.
"""
import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest

PREFIX = "qbH"
PORT = 10809
SUBNET = "10.253"               # a /30 per server out of 10.253.0.0/16
START_S = 20.0                  # a server answers within this, or start fails
_seq = 0


def run(*args, check=True, timeout=30):
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: "
                           f"{p.stderr.strip()[-500:]}")
    return p


def missing_tools(kind="nbdkit"):
    """What this machine lacks to run NBD servers in namespaces, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    tools = ["ip", "nft", "nbdinfo", kind]
    gone = [t for t in tools if not shutil.which(t)]
    if gone:
        return f"{', '.join(gone)} not installed (scripts/setup)"
    return None


def _die_with_parent():
    """In the child before exec: SIGKILL when the test process dies, so a
    test run killed outright leaves no server behind (PR_SET_PDEATHSIG
    survives the exec of `ip netns exec` and of the server it execs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_leftovers():
    """Namespaces and veths of earlier runs whose process is gone."""
    names = run("ip", "netns", "list", check=False).stdout.split()
    links = re.findall(r"^\d+: (" + PREFIX + r"\d+x\d+[hp])[@:]",
                       run("ip", "-o", "link", "show", check=False).stdout, re.M)
    for name in names + links:
        m = re.match(PREFIX + r"(\d+)x\d+", name)
        if m and not _pid_alive(int(m.group(1))):
            if name in names:
                run("ip", "netns", "del", name, check=False)
            else:
                run("ip", "link", "del", name, check=False)


class _SubnetLock:
    """Choosing a free /30 and putting the address on it, one run at a time."""

    def __enter__(self):
        self.f = open(os.path.join(tempfile.gettempdir(), PREFIX + "-nbdlib.lock"), "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _free_subnet(first):
    """The first /30 of 10.253/16 from index `first` that no address of
    this namespace uses."""
    used = set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/",
                          run("ip", "-4", "-o", "addr", "show").stdout))
    for k in range(16384):
        i = (first + k) % 16384
        c, d = i >> 6, (i & 63) * 4
        host, peer = f"{SUBNET}.{c}.{d + 1}", f"{SUBNET}.{c}.{d + 2}"
        if host not in used and peer not in used:
            return host, peer
    raise RuntimeError(f"no free /30 left in {SUBNET}.0.0/16")


def tcp_answers(addr, port, timeout):
    """'accepted', 'refused' or 'timeout': what a TCP connect meets."""
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
        return "accepted"
    except ConnectionRefusedError:
        return "refused"
    except (socket.timeout, TimeoutError):
        return "timeout"
    except OSError as e:
        return f"error {errno.errorcode.get(e.errno, e.errno)}"
    finally:
        s.close()


class Server:
    """One NBD server in its own namespace (see the module's comment)."""

    def __init__(self, net, backing, kind="nbdkit", export="r0"):
        global _seq
        _seq += 1
        self.net, self.backing, self.kind, self.export = net, backing, kind, export
        self.name = f"{PREFIX}{os.getpid()}x{_seq}"
        self.ns = self.name
        self.veth_host, self.veth_peer = self.name + "h", self.name + "p"
        self.proc = None
        self.dropped = False
        self.log = os.path.join(net.dir, self.name + ".log")
        self._link()

    def _link(self):
        run("ip", "netns", "add", self.ns)
        self.net.namespaces.append(self.ns)
        run("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name",
            self.veth_peer, "netns", self.ns)
        self.net.links.append(self.veth_host)
        with _SubnetLock():
            self.host_addr, self.addr = _free_subnet(os.getpid() * 4 + _seq)
            run("ip", "addr", "add", self.host_addr + "/30", "dev", self.veth_host)
        run("ip", "link", "set", self.veth_host, "up")
        run("ip", "-n", self.ns, "addr", "add", self.addr + "/30", "dev", self.veth_peer)
        run("ip", "-n", self.ns, "link", "set", self.veth_peer, "up")
        run("ip", "-n", self.ns, "link", "set", "lo", "up")

    @property
    def uri(self):
        return f"nbd://{self.addr}:{PORT}/{self.export}"

    def _command(self, delay_ms):
        if self.kind == "qemu-nbd":
            assert not delay_ms, "a slow server is nbdkit's (delay filter)"
            return ["qemu-nbd", "-f", "raw", "--cache=none", "--aio=native",
                    "--persistent", "--shared=0", "-b", self.addr, "-p", str(PORT),
                    "-x", self.export, self.backing]
        cmd = ["nbdkit", "-f", "-i", self.addr, "-p", str(PORT), "-e", self.export]
        if delay_ms:
            cmd += ["--filter=delay"]
        cmd += ["file", f"file={self.backing}", "cache=none"]
        if delay_ms:
            cmd += [f"delay-read={delay_ms}ms", f"delay-write={delay_ms}ms"]
        return cmd

    def start(self, delay_ms=0):
        """Serve the backing file; returns once nbdinfo reads its size."""
        assert self.proc is None, "already running"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns] + self._command(delay_ms),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_die_with_parent)
        self.wait_answers()
        return self

    def wait_answers(self, deadline_s=START_S):
        """Premise: the export answers with the backing file's size."""
        want = os.path.getsize(self.backing)
        end = time.monotonic() + deadline_s
        last = ""
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} for {self.uri} exited "
                                   f"{self.proc.returncode}: {self.tail()}")
            try:
                p = run("nbdinfo", "--size", self.uri, check=False, timeout=5)
                if p.returncode == 0 and p.stdout.strip() == str(want):
                    return
                last = (p.stderr or p.stdout).strip()
            except subprocess.TimeoutExpired:
                last = "nbdinfo: no answer within 5 s"
            time.sleep(0.1)
        raise RuntimeError(f"{self.uri} did not answer within {deadline_s} s: "
                           f"{last}; {self.tail()}")

    def tail(self):
        try:
            with open(self.log) as f:
                return f.read()[-500:].strip()
        except OSError:
            return ""

    @property
    def pid(self):
        return self.proc.pid

    def kill(self):
        """SIGKILL, and reaped: its connections are reset by the kernel."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped one dies too
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc = None

    def _states(self):
        """The state letter of each of the server's threads: SIGSTOP
        reaches them one by one, and a thread still running could serve a
        request sent after freeze() returned."""
        out = []
        task = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(task):
            try:
                with open(f"{task}/{tid}/stat") as f:
                    out.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:       # a thread that just ended
                pass
        return out

    def _signal_until(self, sig, want_stopped):
        os.kill(self.proc.pid, sig)
        end = time.monotonic() + 10
        while any((st in "tT") != want_stopped for st in self._states()):
            assert time.monotonic() < end, f"{self.name}: {sig!r} did not take"
            time.sleep(0.01)

    def freeze(self):
        """SIGSTOP: the process holds its connections and answers nothing."""
        self._signal_until(signal.SIGSTOP, True)

    def thaw(self):
        self._signal_until(signal.SIGCONT, False)

    def drop(self, existing_only=False):
        """Every packet to and from the server lost, silently: checked by a
        TCP connect that neither gets in nor gets refused. existing_only:
        only the connections open now are cut (new ones get through, as
        after a NAT or a path change that stranded the old ones); checked
        by a connect that gets in."""
        dev = self.veth_peer
        match_in = match_out = ""
        if existing_only:
            ports = self.client_ports()
            assert ports, f"{self.uri}: no connection to cut"
            ports = "{ " + ", ".join(map(str, ports)) + " }"
            match_in, match_out = f"tcp sport {ports} ", f"tcp dport {ports} "
        rules = ("table netdev qbdrop {\n"
                 f'  chain in {{ type filter hook ingress device "{dev}" priority 0; }}\n'
                 f'  chain out {{ type filter hook egress device "{dev}" priority 0; }}\n'
                 "}\n"
                 "delete table netdev qbdrop\n"      # one transaction: atomic
                 "table netdev qbdrop {\n"
                 f'  chain in {{ type filter hook ingress device "{dev}" priority 0; {match_in}drop; }}\n'
                 f'  chain out {{ type filter hook egress device "{dev}" priority 0; {match_out}drop; }}\n'
                 "}\n")
        p = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"],
                           input=rules, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"nft in {self.ns}: {p.stderr.strip()}")
        self.dropped = True
        got = tcp_answers(self.addr, PORT, 1.0 if not existing_only else 10.0)
        want = "accepted" if existing_only else "timeout"
        assert got == want, f"{self.uri} after drop(existing_only={existing_only}): {got}"

    def client_ports(self):
        """The local ports of this namespace's connections to the server."""
        out = run("ss", "-Htn", "state", "established", "dst",
                  f"{self.addr}:{PORT}").stdout
        return sorted({int(line.split()[-2].rsplit(":", 1)[1])
                       for line in out.splitlines() if line.strip()})

    def restore(self):
        run("ip", "netns", "exec", self.ns, "nft", "delete", "table", "netdev", "qbdrop")
        self.dropped = False
        got = tcp_answers(self.addr, PORT, 10.0)
        assert got == "accepted", f"{self.uri} after restore(): {got}"

    def flip(self, offset, bit=0):
        """Flip one bit of the backing file (the server's storage rots)."""
        fd = os.open(self.backing, os.O_RDWR)
        try:
            old = os.pread(fd, 1, offset)[0]
            assert os.pwrite(fd, bytes([old ^ (1 << bit)]), offset) == 1
            os.fsync(fd)
        finally:
            os.close(fd)


class Net:
    """The servers of one test and everything they need, all removed by
    close() whatever state the test left them in."""

    def __init__(self, directory):
        self.dir = str(directory)
        self.servers, self.namespaces, self.links = [], [], []
        remove_leftovers()

    def server(self, backing, kind="nbdkit", export="r0", delay_ms=0, start=True):
        s = Server(self, backing, kind, export)
        self.servers.append(s)
        return s.start(delay_ms) if start else s

    def close(self):
        for s in self.servers:
            try:
                s.kill()
            except Exception:
                pass
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)
        for link in self.links:     # gone with its peer's namespace, mostly
            if run("ip", "link", "show", link, check=False).returncode == 0:
                run("ip", "link", "del", link, check=False)


@pytest.fixture
def nbd_net(tmp_path):
    """A Net for the test; skips where NBD servers in namespaces cannot run
    (not root, or the Debian packages missing)."""
    why = missing_tools("nbdkit") or missing_tools("qemu-nbd")
    if why:
        pytest.skip(why)
    net = Net(tmp_path)
    try:
        yield net
    finally:
        net.close()


# ---------------------------------------------------------- a small client
#
# Enough NBD (fixed newstyle, NBD_OPT_GO, simple replies) to check what the
# harness does to a connection without the engine: one request at a time.

NBD_OPT_GO = 7
NBD_REP_ACK, NBD_REP_INFO = 1, 3
NBD_CMD_READ, NBD_CMD_WRITE = 0, 1
OPT_MAGIC = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698


class Client:
    def __init__(self, server, timeout=10.0):
        self.sock = socket.create_connection((server.addr, PORT), timeout=timeout)
        self._handshake(server.export.encode())
        self.handle = 0

    def _recv(self, n):
        out = b""
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise ConnectionError("server closed the connection")
            out += got
        return out

    def _handshake(self, name):
        magic, opt, _flags = struct.unpack(">8sQH", self._recv(18))
        assert magic == b"NBDMAGIC" and opt == OPT_MAGIC, "not a newstyle NBD server"
        self.sock.sendall(struct.pack(">I", 3))     # FIXED_NEWSTYLE | NO_ZEROES
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", OPT_MAGIC, NBD_OPT_GO, len(data)) + data)
        while True:
            magic, _opt, rep, length = struct.unpack(">QIII", self._recv(20))
            body = self._recv(length)
            assert magic == REP_MAGIC and not rep & 0x80000000, f"NBD_OPT_GO refused: {rep:#x}"
            if rep == NBD_REP_INFO and struct.unpack(">H", body[:2])[0] == 0:
                self.size = struct.unpack(">Q", body[2:10])[0]
            if rep == NBD_REP_ACK:
                return

    def send(self, cmd, offset, length, data=b""):
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, self.handle,
                                      offset, length) + data)
        return self.handle

    def reply(self, length, timeout):
        """The reply to the request sent last (data for a read)."""
        self.sock.settimeout(timeout)
        magic, err, handle = struct.unpack(">IIQ", self._recv(16))
        assert magic == SIMPLE_MAGIC and handle == self.handle, "out of step"
        if err:
            raise OSError(err, f"NBD error {err}")
        return self._recv(length) if length else b""

    def read(self, offset, length, timeout=10.0):
        self.send(NBD_CMD_READ, offset, length)
        return self.reply(length, timeout)

    def write(self, offset, data, timeout=10.0):
        self.send(NBD_CMD_WRITE, offset, len(data), data)
        return self.reply(0, timeout)

    def close(self):
        self.sock.close()
