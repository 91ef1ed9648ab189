"""The one exception type the CLI turns into a one-line message and exit code 2, and quoting for it."""


class UserError(Exception):
    """Bad input the user can fix: the message names the problem and the fix."""


def quote(path) -> str:
    """A file name fit for a one-line message: as it is when every character prints, else Python's repr, so a
    newline, tab or escape sequence in a name can neither split the error line nor drive the terminal."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def one_line(text: str) -> str:
    """`text` with line breaks escaped: the last guard of the one-line error contract."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")
