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
