"""The one exception type for user mistakes.

Anything a user can fix (a missing file, a malformed line, an unknown key, an impossible
combination of options) raises `CepeError` with a one-line message naming the file, field or
option and what was expected. The CLI prints that line and exits with status 2; anything else is
a bug and keeps its traceback.
"""


class CepeError(Exception):
    """A user-facing error; `str(err)` is the whole message, one line."""
