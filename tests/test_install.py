"""Installing quorumblk: from an sdist into a fresh virtualenv, and the
command scripts/setup puts on root's PATH (scripts/install-command).

The sdist test builds the sdist the way a release would (python -m build),
then lets pip build and install it in a virtualenv of its own, away from the
checkout: that proves the sdist carries the whole C core (a header missing
from it fails the build there, as it did before MANIFEST.in). It compiles
the C core once, so it takes a while (about half a minute here); pip fetches
the build requirements (setuptools, wheel, cffi) and the dependencies as
for any install.
"""
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_COMMAND = os.path.join(ROOT, "scripts", "install-command")
VENV_COMMAND = os.path.join(ROOT, ".venv", "bin", "quorumblk")
pytestmark = pytest.mark.timeout(300)


def clean_env(**extra):
    """The environment minus what would point Python back at the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
                        "PYTHONSTARTUP", "PYTHONUSERBASE")}
    env.update(extra)
    return env


def run(cmd, cwd, timeout=240, env=None):
    p = subprocess.run([str(c) for c in cmd], cwd=str(cwd), capture_output=True,
                       text=True, timeout=timeout, env=env or clean_env())
    return p


def ok(p):
    assert p.returncode == 0, (
        f"{' '.join(p.args)} exited {p.returncode}\n"
        f"stdout: {p.stdout[-4000:]}\nstderr: {p.stderr[-4000:]}")
    return p


def outside_checkout(path):
    real, root = os.path.realpath(str(path)), os.path.realpath(ROOT)
    return os.path.commonpath([real, root]) != root


# what a checkout holds besides its own files (.gitignore's build products)
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
              "*.so", "*.o", ".hypothesis", ".pytest_cache", "logs", "results",
              "_core.c")


def clean_copy(dest):
    """The checkout's own files (tracked, or new and not ignored, as git
    lists them; without git, all but NOT_SOURCE), copied to dest."""
    try:
        listed = subprocess.run(
            ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
             "--exclude-standard"], capture_output=True, text=True)
    except FileNotFoundError:
        listed = None
    if listed is None or listed.returncode != 0:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    else:
        for name in filter(None, listed.stdout.split("\0")):
            path = os.path.join(ROOT, name)
            if os.path.isfile(path):
                os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
                shutil.copy2(path, os.path.join(dest, name))
    assert os.path.exists(os.path.join(dest, "pyproject.toml"))
    assert not [d for d in os.listdir(dest) if d.endswith(".egg-info")]
    return dest


def csrc_files():
    return sorted(f for f in os.listdir(os.path.join(ROOT, "csrc"))
                  if f.endswith((".c", ".h")))


def test_sdist_carries_the_c_core_and_installs_outside_the_checkout(tmp_path):
    assert outside_checkout(tmp_path), "the test's folder must not be in the checkout"
    sources = csrc_files()
    assert "quorumblk.h" in sources and any(f.endswith(".c") for f in sources)

    # From a clean copy of the checkout's files, as a release is made: an
    # egg-info folder left in the checkout by earlier builds feeds its old
    # file list into the next sdist and would hide a file MANIFEST.in misses.
    src = clean_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    ok(run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
            "--outdir", dist, src], cwd=src))
    [sdist] = os.listdir(dist)
    assert re.fullmatch(r"quorumblk-[\w.]+\.tar\.gz", sdist), sdist
    with tarfile.open(dist / sdist) as tar:
        names = tar.getnames()
    top = sdist[:-len(".tar.gz")]
    members = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    assert len(members) == len(names) - 1, "every member under one top folder"
    missing = [f for f in ["LICENSE", "README.md", "pyproject.toml", "setup.py",
                           "quorumblk/_build.py"] + [f"csrc/{f}" for f in sources]
               if f not in members]
    assert not missing, f"the sdist lacks {missing}"
    built = [m for m in members if m.endswith((".so", ".o", ".pyc"))]
    assert not built, f"build products in the sdist: {built}"
    with tarfile.open(dist / sdist) as tar:
        licence = tar.extractfile(f"{top}/LICENSE").read().decode()
    assert licence.startswith("MIT License") and "the quorumblk authors" in licence

    venv = tmp_path / "venv"
    ok(run([sys.executable, "-m", "venv", venv], cwd=tmp_path, timeout=120))
    ok(run([venv / "bin" / "python", "-m", "pip", "install", "-q",
            dist / sdist], cwd=tmp_path))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    helped = ok(run([venv / "bin" / "quorumblk", "--help"], cwd=elsewhere))
    assert helped.stdout.startswith("usage: quorumblk"), helped.stdout
    probe = ok(run([venv / "bin" / "python", "-c",
                    "import importlib.metadata as md, quorumblk._core as c\n"
                    "print(c.__file__)\n"
                    "print(len(dir(c.lib)))\n"
                    "print(*sorted(str(f) for f in md.files('quorumblk')), sep='\\n')"],
                   cwd=elsewhere))
    core, symbols, *files = probe.stdout.splitlines()
    assert outside_checkout(core), f"quorumblk._core came from the checkout: {core}"
    venv_real = os.path.realpath(venv)
    assert os.path.commonpath([os.path.realpath(core), venv_real]) == venv_real, core
    assert int(symbols) > 0
    assert any(os.path.basename(f) == "LICENSE" for f in files), files


@pytest.fixture
def venv_command():
    if not os.access(VENV_COMMAND, os.X_OK):
        pytest.skip(f"no {VENV_COMMAND}: the launcher runs it (scripts/setup makes it)")
    return VENV_COMMAND


def test_launcher_runs_the_checkouts_command_from_any_directory(tmp_path, venv_command):
    bindir = tmp_path / "bin"
    first = ok(run([INSTALL_COMMAND, bindir], cwd=tmp_path))
    launcher = bindir / "quorumblk"
    assert "installed" in first.stdout
    text = launcher.read_text()
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o755
    assert venv_command in text

    again = ok(run([INSTALL_COMMAND, bindir], cwd=tmp_path))
    assert "already runs" in again.stdout
    assert launcher.read_text() == text
    assert os.listdir(bindir) == ["quorumblk"], "no temporary file left behind"

    # A directory holding a package named quorumblk must not change what
    # runs (python -m would import it): run there, with sudo's bare PATH.
    decoy = tmp_path / "decoy"
    (decoy / "quorumblk").mkdir(parents=True)
    for name in ("__init__.py", "__main__.py", "cli.py"):
        (decoy / "quorumblk" / name).write_text("raise SystemExit('decoy imported')\n")
    secure_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    helped = ok(run([launcher, "--help"], cwd=decoy, env=clean_env(PATH=secure_path)))
    assert helped.stdout.startswith("usage: quorumblk"), helped.stdout
    assert "decoy" not in helped.stdout + helped.stderr


def test_launcher_never_replaces_another_quorumblk(tmp_path, venv_command):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    foreign = bindir / "quorumblk"
    foreign.write_text("#!/bin/sh\necho a pip-installed quorumblk\n")
    refused = run([INSTALL_COMMAND, bindir], cwd=tmp_path)
    assert refused.returncode == 1, refused
    assert "not a launcher of ours" in refused.stderr
    assert foreign.read_text() == "#!/bin/sh\necho a pip-installed quorumblk\n"

    foreign.unlink()
    foreign.symlink_to(venv_command)
    refused = run([INSTALL_COMMAND, bindir], cwd=tmp_path)
    assert refused.returncode == 1, refused
    assert os.readlink(foreign) == venv_command
    assert sorted(os.listdir(bindir)) == ["quorumblk"]


def test_systemd_units_run_the_command_the_launcher_installs():
    with open(INSTALL_COMMAND) as f:
        default = re.search(r"^bindir=\$\{1:-([^}]+)\}$", f.read(), re.M)
    assert default, "scripts/install-command names its default directory"
    installed = os.path.join(default.group(1), "quorumblk")
    units = [os.path.join(ROOT, "contrib", u)
             for u in os.listdir(os.path.join(ROOT, "contrib"))
             if u.endswith(".service")]
    execs = []
    for unit in units:
        with open(unit) as f:
            execs += [(unit, line.split("=", 1)[1].lstrip("-").split()[0])
                      for line in f if re.match(r"ExecStart=", line)]
    assert len(execs) >= 2, execs
    assert [(u, c) for u, c in execs if c != installed] == []
