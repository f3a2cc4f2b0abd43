"""One-line error messages: what every layer shows a user instead of a traceback."""

from __future__ import annotations


def first_line(exc: BaseException, fallback: str = "") -> str:
    """``exc``'s message up to its first line break, for a one-line error (torch's, pyarrow's and MLflow's
    messages run over many lines); ``fallback`` when the message is empty."""
    return (str(exc).strip().splitlines() or [fallback])[0]
