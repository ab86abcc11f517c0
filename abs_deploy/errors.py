"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a file, a name, a path or a decision that does not fit."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type when it has none), cut to `limit`:
    the part of a library error (torch's shape messages run to many lines) worth one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
