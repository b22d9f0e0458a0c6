"""The errors both services and their commands raise on purpose, and the exit code each means.

Code catches these by type, never by message text. A command prints one line
for any of them (:mod:`pbxcore.cli`) and exits with :attr:`PbxError.exit_code`:
2 for a configuration the operator must fix, 1 for everything else.
"""

from __future__ import annotations

import os

EXIT_CONFIG = 2  # the configuration (file, variable, flag) is wrong: fix it and run again
EXIT_FAILURE = 1  # anything else that stopped the command


class PbxError(Exception):
    """Base of the errors we raise on purpose; ``str()`` is the whole one-line message."""

    exit_code = EXIT_FAILURE


class ConfigError(PbxError):
    """A configuration file, variable or flag is wrong; the message names the file (or
    variable) and the key."""

    exit_code = EXIT_CONFIG


class StateError(PbxError):
    """The state directory or a file in it cannot be used (missing, not writable, broken)."""


class ServiceUnavailable(PbxError):
    """A running service that a command needs did not answer (not started, wrong address)."""


class Unauthorized(PbxError):
    """A service refused the command's credentials (HTTP 401 or 403)."""


class RequestRefused(PbxError):
    """A service answered a command's request with an error other than 401/403."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ListenError(PbxError):
    """A listener could not bind: which one (``what``, e.g. "SIP UDP" or "push API"),
    where, and the operating system's errno."""

    def __init__(self, what: str, address: str, errno: int | None, detail: str = ""):
        self.what = what
        self.address = address
        self.errno = errno
        reason = detail or (os.strerror(errno) if errno else "failed")
        super().__init__(f"cannot listen: {what} on {address}: {reason}")

    @classmethod
    def from_oserror(cls, what: str, address: str, err: OSError) -> ListenError:
        """The error for ``err`` raised while binding ``what`` at ``address``."""
        return cls(what, address, err.errno, err.strerror or "")
