"""The exceptions that end a run with a one-line message instead of a traceback."""


class BitfitError(Exception):
    """Bad data, a wrong path, a delta for another model: the user can fix it.

    Raised with a message that names the row, file or tensor at fault. Entry points print it as one
    line and exit with code 2; any other exception is a bug in bitfit and keeps its traceback.
    """


class NonFiniteError(Exception):
    """A NaN or inf loss or gradient: the run stops before the bad step is applied (exit code 3)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was written; the message says how to resume (exit code 130)."""
