"""The one exception type users see: its message is a single clear sentence."""


class ForgeError(Exception):
    """A problem the user can fix; the CLI prints it on one line and exits non-zero."""

    exit_code = 2


def closest(word: str, choices: list[str], n: int = 3) -> list[str]:
    """The choices that look most like `word` (for "did you mean" hints)."""
    import difflib

    return difflib.get_close_matches(word, choices, n=n, cutoff=0.5)


def did_you_mean(word: str, choices: list[str]) -> str:
    hits = closest(word, choices)
    return f" Did you mean {', '.join(repr(h) for h in hits)}?" if hits else ""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]


def one_line(e: BaseException, limit: int = 300) -> str:
    """An unexpected exception as one line for users: its type and the first line of its message."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}"[:limit] if lines else type(e).__name__


def user_line(e: BaseException) -> str:
    """What a screen shows for a failure: a ForgeError's sentence, anything else as one_line."""
    return str(e) if isinstance(e, ForgeError) else one_line(e)
