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
