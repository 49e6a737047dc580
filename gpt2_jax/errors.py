"""The exceptions that end a command with one line: the CLIs print the message and exit with `exit_code`."""


class UserError(Exception):
    """Bad input from the user: a file, key or value, and what to do about it (exit 2)."""

    exit_code = 2


class StorageError(UserError):
    """A checkpoint could not be written (disk full, I/O error): what failed and what is intact (exit 3)."""

    exit_code = 3


def reason(error: BaseException) -> str:
    """The most telling one-line message in an exception chain: an OS error's (disk full, permission...),
    else the innermost exception's first line."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in chain:
        text = str(x)
        for known in ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
                      "Input/output error"):
            if known in text or (isinstance(x, OSError) and x.strerror == known):
                return known
    os_errors = [x for x in chain if isinstance(x, OSError)]
    pick = os_errors[0] if os_errors else chain[-1]
    lines = str(pick).strip().splitlines()
    return (lines[0] if lines else type(pick).__name__)[:300]
