"""cffi build script: compiles csrc/ into quorumblk._core (API mode).

The cdef is read from the public headers in a fixed order; preprocessor
lines are dropped and `#define NAME value` becomes `#define NAME ...` so the
compiler, not this file, supplies the value.

csrc/ is found beside the package directory, in a checkout and in an
unpacked sdist alike (MANIFEST.in puts every source and header there); the
sources are named relative to the directory the build runs in, as setuptools
wants them.
"""
import os
import re
import subprocess
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
PUBLIC_HEADERS = ["quorumblk.h", "qb_ublk.h"]

# header -> Debian package that ships it
REQUIRED = [
    ("liburing.h", "liburing-dev"),
    ("xxhash.h", "libxxhash-dev"),
    ("openssl/evp.h", "libssl-dev"),
    ("libnbd.h", "libnbd-dev"),
]


def check_headers():
    cc = os.environ.get("CC", "cc")
    missing = []
    for header, package in REQUIRED:
        probe = subprocess.run([cc, "-E", "-x", "c", "-", "-o", os.devnull],
                               input=f"#include <{header}>\n", text=True,
                               capture_output=True)
        if probe.returncode != 0:
            missing.append(f"{header} (Debian package {package})")
    if missing:
        sys.exit("quorumblk: cannot build the C core, missing headers: "
                 + ", ".join(missing)
                 + ". Install them, e.g. apt-get install "
                 + " ".join(p for h, p in REQUIRED
                            if any(m.startswith(h) for m in missing)))


def cdef_text(path):
    out = []
    for line in open(path):
        m = re.match(r"#define\s+(\w+)\s+\S", line)
        if m:
            out.append(f"#define {m.group(1)} ...")
        elif not line.lstrip().startswith("#"):
            out.append(line.rstrip("\n"))
    return "\n".join(out)


def sources():
    if not os.path.isdir(CSRC):
        return []
    return sorted(os.path.relpath(os.path.join(CSRC, f))
                  for f in os.listdir(CSRC) if f.endswith(".c"))


def check_tree():
    """An incomplete source tree (an sdist without the headers, say) is named
    here, not left to a compiler error in the middle of the build: every
    public header, and every header a csrc file includes with quotes."""
    if not os.path.isdir(CSRC) or not sources():
        sys.exit(f"quorumblk: cannot build the C core: no C sources in {CSRC}")
    wanted = set(PUBLIC_HEADERS)
    for name in os.listdir(CSRC):
        if name.endswith((".c", ".h")):
            with open(os.path.join(CSRC, name)) as f:
                wanted.update(re.findall(r'^\s*#\s*include\s+"([^"]+)"',
                                         f.read(), re.M))
    missing = sorted(h for h in wanted
                     if not os.path.exists(os.path.join(CSRC, h)))
    if missing:
        sys.exit(f"quorumblk: cannot build the C core: {CSRC} lacks "
                 + ", ".join(missing) + " (an incomplete checkout or sdist)")


check_tree()
check_headers()
ffibuilder = FFI()
ffibuilder.cdef("\n".join(cdef_text(os.path.join(CSRC, h)) for h in PUBLIC_HEADERS))
ffibuilder.set_source(
    "quorumblk._core",
    "\n".join(f'#include "{h}"' for h in PUBLIC_HEADERS),
    sources=sources(),
    include_dirs=[CSRC],
    libraries=["uring", "xxhash", "crypto", "nbd", "pthread"],
    extra_compile_args=["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra",
                        "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
