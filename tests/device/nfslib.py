"""NFS servers for the device tests (in the VM): each one an nfsd of its own
in a network namespace of its own, reached over a veth pair with its own
addresses, exporting a directory; the client (the test, and quorumblk) is
the root namespace, which mounts each export.

nfsd keeps its state per network namespace (threads, exports cache,
grace period), so one server can be stopped and started alone, and an
nftables table in its namespace drops its traffic alone. Its daemons
(rpc.mountd for the exports cache, nfsdcld for the v4 client records a
restart's grace period needs) run in a mount namespace of the server's
own where /var/lib/nfs, its rpc_pipefs and /proc/fs/nfsd are the
server's: a tmpfs directory, since the VM's root file system (the
host's) is not ours to write. NFSv4 only, so no rpcbind and no statd.

Run as a script (`python nfslib.py`) it starts three servers, mounts
them, prints what it sees and tears everything down: for trying the
harness in a VM by hand.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

PREFIX = "qbN"                      # netns, links and folders: ours alone
BASE = f"/dev/shm/{PREFIX}-nfs"
LEASE = 10                          # seconds: nfsd's minimum, a short grace
MODULES = ("nfsd", "nfs", "nfsv4", "veth", "nf_tables", "sch_netem")


def sh(cmd, check=True, timeout=60, **kw):
    """Run a command (list); on failure raise with its output."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\n"
                             f"stdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}")
    return p


def load_modules():
    for m in MODULES:
        sh(["modprobe", m])


def missing():
    """Why NFS servers cannot run here, or None."""
    for tool in ("rpc.nfsd", "rpc.mountd", "exportfs", "nfsdcld", "mount.nfs4",
                 "nft", "tc", "ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"no {tool} (scripts/setup installs it)"
    return None


class Server:
    """NFS server i: namespace qbN<i>, address 10.213.<i>.2 (the client's
    end is 10.213.<i>.1), exporting <BASE>/s<i>/export."""

    def __init__(self, i):
        self.i = i
        self.ns = f"{PREFIX}{i}"
        self.addr = f"10.213.{i}.2"
        self.client_addr = f"10.213.{i}.1"
        self.link = f"{PREFIX}{i}s"           # the server's end of the veth
        self.dir = os.path.join(BASE, f"s{i}")
        self.export = os.path.join(self.dir, "export")
        self.state = os.path.join(self.dir, "state")   # its /var/lib/nfs
        self.holder = None          # keeps the mount namespace; nsenter target
        self.daemons = []
        self.cut_off = False

    # ---- inside the server ----

    def run(self, cmd, check=True, timeout=60):
        """A command in the server's network and mount namespaces."""
        return sh(["nsenter", "-t", str(self.holder.pid), "-n", "-m", "--"] + cmd,
                  check=check, timeout=timeout)

    def spawn(self, cmd):
        """A daemon in the server's namespaces; its messages go to a log
        file in the server's folder (a pipe nobody reads could fill)."""
        log = os.path.join(self.dir, os.path.basename(cmd[0]) + ".log")
        with open(log, "a") as f:
            p = subprocess.Popen(["nsenter", "-t", str(self.holder.pid), "-n",
                                  "-m", "--"] + cmd, stdout=subprocess.DEVNULL,
                                 stderr=f)
        p.log = log
        self.daemons.append(p)
        return p

    # ---- life ----

    def start(self):
        for d in (self.export, os.path.join(self.state, "rpc_pipefs"),
                  os.path.join(self.state, "nfsdcld")):
            os.makedirs(d, exist_ok=True)
        for f in ("etab", "rmtab"):
            open(os.path.join(self.state, f), "a").close()
        sh(["ip", "netns", "add", self.ns])
        host_end = f"{PREFIX}{self.i}c"
        sh(["ip", "link", "add", host_end, "type", "veth", "peer", "name", self.link,
            "netns", self.ns])
        sh(["ip", "addr", "add", f"{self.client_addr}/24", "dev", host_end])
        sh(["ip", "link", "set", host_end, "up"])
        sh(["ip", "-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", self.link])
        sh(["ip", "-n", self.ns, "link", "set", self.link, "up"])
        sh(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        # the holder: a mount namespace where /var/lib/nfs, rpc_pipefs and
        # /proc/fs/nfsd are this server's (each file system mounted from
        # inside the network namespace is that namespace's instance)
        setup = (f"mount --bind {self.state} /var/lib/nfs && "
                 "mount -t rpc_pipefs sunrpc /var/lib/nfs/rpc_pipefs && "
                 "mount -t nfsd nfsd /proc/fs/nfsd && echo ready && exec sleep infinity")
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--mount",
             "--propagation", "private", "sh", "-c", setup],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            raise AssertionError(f"server {self.i}'s namespace: "
                                 f"{self.holder.stderr.read()[-2000:]}")
        # the holder is sleep now, the same process (exec). The export is
        # the server's NFSv4 root (fsid=0): mounted as ADDR:/
        self.run(["exportfs", "-o", f"rw,sync,no_root_squash,no_subtree_check,"
                  "fsid=0", f"{self.client_addr}:{self.export}"])
        # nfsd asks nfsdcld for its client records when it starts, and
        # mountd for each export: both must be listening first
        cld = self.spawn(["nfsdcld", "-F", "-p", "/var/lib/nfs/rpc_pipefs",
                          "-s", "/var/lib/nfs/nfsdcld"])
        wait_for(lambda: _has_fd(cld, "anon_inode:inotify"), 60,
                 f"server {self.i}: nfsdcld waiting for nfsd")
        mountd = self.spawn(["rpc.mountd", "-F", "-N", "2", "-N", "3"])
        wait_for(lambda: _has_fd(mountd, "nfsd.export/channel"), 60,
                 f"server {self.i}: mountd reading the exports channel")
        self.start_nfsd()

    def start_nfsd(self):
        """nfsd's threads in this namespace: v4 only, a short lease and
        grace period (a restart's grace lasts LEASE seconds)."""
        self.run(["rpc.nfsd", "-N", "3", "-V", "4", "--no-udp",
                  "-L", str(LEASE), "-G", str(LEASE), "8"])
        assert self.threads() == 8, f"server {self.i}: nfsd did not start"

    def stop_nfsd(self):
        self.run(["rpc.nfsd", "0"])
        assert self.threads() == 0, f"server {self.i}: nfsd did not stop"

    def threads(self):
        return int(self.run(["cat", "/proc/fs/nfsd/threads"]).stdout.strip() or 0)

    def stop(self):
        """Everything gone, whatever state it is in (a finalizer's)."""
        if self.holder is not None:
            self.run(["rpc.nfsd", "0"], check=False)
            self.run(["exportfs", "-ua"], check=False)
            for p in self.daemons:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            self.holder.kill()
            self.holder.wait()
            self.holder = None
        sh(["ip", "netns", "del", self.ns], check=False)

    # ---- faults ----

    def cut(self):
        """Every packet in or out of the server dropped: to the client it is
        unreachable (no reset, no error: its TCP segments go unanswered)."""
        rules = ("table inet qbcut {\n"
                 " chain in { type filter hook input priority 0; counter drop; }\n"
                 " chain out { type filter hook output priority 0; counter drop; }\n"
                 "}\n")
        path = os.path.join(self.dir, "cut.nft")
        with open(path, "w") as f:
            f.write(rules)
        self.run(["nft", "-f", path])
        self.cut_off = True

    def heal(self):
        if self.cut_off:
            self.run(["nft", "delete", "table", "inet", "qbcut"])
            self.cut_off = False

    def dropped(self):
        """Packets the cut has dropped so far (its premise)."""
        out = self.run(["nft", "list", "table", "inet", "qbcut"]).stdout
        return sum(int(n) for n in re.findall(r"packets (\d+)", out))

    def delay(self, ms):
        """Every packet from the server held ms milliseconds (tc netem)."""
        self.run(["tc", "qdisc", "replace", "dev", self.link, "root", "netem",
                  "delay", f"{ms}ms"])

    def undelay(self):
        self.run(["tc", "qdisc", "del", "dev", self.link, "root"], check=False)


class Nfs:
    """n servers and the client's mounts of their exports."""

    def __init__(self, n=3):
        self.servers = [Server(i) for i in range(n)]
        self.mounts = [os.path.join(BASE, f"mnt{i}") for i in range(n)]
        self.mounted = [False] * n

    def start(self, options="hard,timeo=100,retrans=2"):
        load_modules()
        for s in self.servers:
            s.start()
        for i in range(len(self.servers)):
            self.mount(i, options)
        return self

    def mount(self, i, options):
        s = self.servers[i]
        os.makedirs(self.mounts[i], exist_ok=True)
        sh(["mount", "-t", "nfs4", "-o", f"vers=4.2,{options}",
            f"{s.addr}:/", self.mounts[i]], timeout=120)
        self.mounted[i] = True

    def umount(self, i):
        if self.mounted[i]:
            sh(["umount", self.mounts[i]], check=False, timeout=60)
            if os.path.ismount(self.mounts[i]):
                sh(["umount", "-f", "-l", self.mounts[i]], check=False, timeout=60)
            self.mounted[i] = False

    def replica(self, i):
        """(path through the client's mount, path on the server's side)
        of replica image i."""
        return (os.path.join(self.mounts[i], "r.img"),
                os.path.join(self.servers[i].export, "r.img"))

    def stop(self):
        for s in self.servers:
            if s.holder:            # a server left cut off or slow comes back
                s.undelay()
                s.heal()
        for i in range(len(self.servers)):
            self.umount(i)
        for s in self.servers:
            s.stop()
        shutil.rmtree(BASE, ignore_errors=True)


def _has_fd(proc, text):
    """Has the process an open file whose link names text (False once it
    has exited: the wait then fails with its message)."""
    if proc.poll() is not None:
        with open(proc.log) as f:
            raise AssertionError(f"{proc.args!r} exited {proc.returncode}: "
                                 f"{f.read()[-2000:]}")
    d = f"/proc/{proc.pid}/fd"
    for fd in os.listdir(d):
        try:
            if text in os.readlink(os.path.join(d, fd)):
                return True
        except FileNotFoundError:
            pass
    return False


def wait_for(cond, timeout, what, step=0.1):
    """Until cond() is true; its last value. Raises after timeout seconds."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(step)


def _try():
    nfs = Nfs()
    try:
        nfs.start()
        print(open("/proc/self/mountinfo").read())
        for i, s in enumerate(nfs.servers):
            c, srv = nfs.replica(i)
            with open(c, "wb") as f:
                f.write(b"x" * 4096)
            print(i, os.path.getsize(srv), s.threads())
        t0 = time.monotonic()
        nfs.servers[1].stop_nfsd()
        nfs.servers[1].start_nfsd()
        fd = os.open(nfs.replica(1)[0], os.O_RDWR | os.O_DIRECT)
        print("reopen after restart", time.monotonic() - t0)
        os.close(fd)
    finally:
        nfs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_try())
