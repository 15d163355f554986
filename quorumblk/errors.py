"""The exception family of quorumblk. Every error is an OSError with errno
and a message; the subclasses say why."""
import errno as _errno
import os


class QuorumError(OSError):
    """An error from quorumblk (the root class)."""

    def __init__(self, err, message):
        super().__init__(err, message)

    def __str__(self):
        """The message with the errno's name, once (the engine's own
        messages often name it already)."""
        name = _errno.errorcode.get(self.errno, str(self.errno))
        text = str(self.strerror)
        if f"({name})" in text or f"[{name}]" in text:
            return text
        return f"{text} [{name}]"


class NoQuorumError(QuorumError):
    """A block had no quorum: fewer than threshold replicas agree (EIO)."""


class DegradedError(QuorumError):
    """Fewer than threshold replicas are in service or answered (EIO)."""


class InvalidArgumentError(QuorumError, ValueError):
    """Bad input: nothing was done."""


def raise_for(ret, lib, ffi):
    """Turn a negative C return code plus the engine's last-error text into
    the right exception. Returns ret when it is not an error."""
    if ret >= 0:
        return ret
    err = -ret
    message = ffi.string(lib.qb_last_error()).decode(errors="replace")
    if not message:
        message = os.strerror(err)
    kind = lib.qb_last_error_kind()
    cls = {lib.QB_ERR_NO_QUORUM: NoQuorumError,
           lib.QB_ERR_DEGRADED: DegradedError,
           lib.QB_ERR_INVALID: InvalidArgumentError}.get(kind, QuorumError)
    raise cls(err, message)
