"""The errors of quorumblk, in two families. The engine's: every error is an
OSError with errno and a message (QuorumError and its subclasses say why).
The command's: CommandError and its subclasses, each with the exit status
the `quorumblk` command ends with; EXIT_STATUS is the one table of those
statuses (the command's --help prints it, the README lists it)."""
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


# -- the command's errors and its exit statuses --

EXIT_STATUS = (
    (0, "success"),
    (1, "other failure (also a job that failed or was cancelled)"),
    (2, "bad usage"),
    (3, "not root"),
    (4, "no ublk driver"),
    (5, "replica used by another device"),
    (6, "device id in use"),
    (7, "no such device"),
    (8, "daemon did not answer or stop in time"),
    (9, "the device did not start (or recover)"),
    (10, "the replicas were refused (threshold, size, open, identity, the "
         "engine) or a replica change was refused"),
    (11, "another job (scrub, resync) runs on the device"),
    (12, "scrub found blocks without quorum (left as they were)"),
    (13, "not recoverable (daemon alive, device not quiesced)"),
    (14, "the device is in use (mounted, open): del refused"),
    (15, "a device is not clean (monitor --oneshot)"),
)


class CommandError(Exception):
    """quorumblk failed."""
    exit_code = 1

    def __init__(self, message=None, exit_code=None):
        super().__init__(message or self.__doc__)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(CommandError):
    """the configuration cannot be used."""


class UsageError(CommandError):
    """bad usage."""
    exit_code = 2


class NotRootError(CommandError):
    """quorumblk must be run as root."""
    exit_code = 3


class UblkMissingError(CommandError):
    """the kernel's ublk driver is not available."""
    exit_code = 4


class ReplicaInUseError(CommandError):
    """a replica is already used by another quorumblk device."""
    exit_code = 5


class IdInUseError(CommandError):
    """the device id is already in use."""
    exit_code = 6


class NoSuchDeviceError(CommandError):
    """no such quorumblk device."""
    exit_code = 7


class DaemonError(CommandError):
    """the device's daemon did not answer or did not stop in time."""
    exit_code = 8


class StartError(CommandError):
    """the device could not be started."""
    exit_code = 9


class RefusedError(CommandError):
    """the replicas were refused."""
    exit_code = 10


class JobRunningError(CommandError):
    """another job runs on this device."""
    exit_code = 11


class NotCancellableError(JobRunningError):
    """the job cannot be cancelled."""


class NoQuorumFoundError(CommandError):
    """the scrub found blocks without quorum."""
    exit_code = 12


class NotRecoverableError(CommandError):
    """the device cannot be recovered (its daemon runs, or the kernel does
    not hold it quiesced)."""
    exit_code = 13


class DeviceInUseError(CommandError):
    """the device is in use (mounted, held or open)."""
    exit_code = 14


class NotCleanError(CommandError):
    """a device is not clean."""
    exit_code = 15


def exit_status_text():
    """EXIT_STATUS as the command's --help shows it."""
    return "exit status:\n" + "".join(f"  {code:2} {what}\n" for code, what in EXIT_STATUS)
