"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class TailtuneError(Exception):
    """A problem with the user's input or environment, stated in one line.

    Raise it for anything the user can fix (a missing file, an unknown key, a column that is
    not there). The CLI prints ``error: <message>`` and exits 2 without a traceback.
    """


class NoTokens(TailtuneError):
    """Texts the tokenizer turns into no token at all, so there is nothing to classify.

    ``rows`` are their positions in the list given to the tokenizer; a caller that can leave a
    text unlabelled (``predict`` on a file) does so for these instead of stopping.
    """

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows


def first_line(exc: BaseException) -> str:
    """An exception's first line, or its type when it has no message (``"".splitlines()[0]``
    raised IndexError inside the handler meant to turn it into one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
