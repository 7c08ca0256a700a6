"""The one exception type for problems with what the user gave us."""


class BitfitError(Exception):
    """Bad data, a wrong path, a delta for another model: the user can fix it.

    Raised with a message that names the row, file or tensor at fault. Entry points print it as one
    line and exit with code 2; any other exception is a bug in bitfit and keeps its traceback.
    """
