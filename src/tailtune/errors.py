"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class TailtuneError(Exception):
    """A problem with the user's input or environment, stated in one line.

    Raise it for anything the user can fix (a missing file, an unknown key, a column that is
    not there). The CLI prints ``error: <message>`` and exits 2 without a traceback.
    """
