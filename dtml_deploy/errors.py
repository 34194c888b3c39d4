"""The toolkit's own exceptions: the CLI turns each into one line and a non-zero exit."""


class DtmlError(Exception):
    """Base class for errors a user can fix (bad input, missing dependency, wrong bundle)."""


class BundleError(DtmlError):
    """A model bundle is missing, corrupt or does not match what is asked of it."""


class InputError(DtmlError):
    """An input file or folder cannot be used (missing, corrupt, wrong shape, non-finite)."""


class DataError(DtmlError):
    """A training data set is inconsistent (empty lists, shape mismatch, non-binary labels)."""


class BackendUnavailable(DtmlError):
    """An inference backend cannot run on this machine (package or device absent)."""


class OutOfMemory(DtmlError):
    """The device ran out of memory; the message says which setting to change."""


def first_line(e: BaseException, limit: int = 300, typed: bool = False) -> str:
    """An exception as one short line: the first non-blank line of its message (its type name when it has
    none), at most `limit` characters. `typed` prefixes the type name to anything but the toolkit's own
    errors, so an unexpected error stays recognisable as a bug."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if typed and not isinstance(e, DtmlError):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return (text or type(e).__name__)[:limit]
