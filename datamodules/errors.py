"""Errors raised while reading a dataset, before any training starts."""

from __future__ import annotations


class DataValidationError(ValueError):
    """A dataset problem the user must fix: the message names the file or row and the fix.

    Collected problems are reported together (up to ``max_listed``) so that a user with a
    thousand-image folder fixes them in one pass instead of one per run.
    """

    def __init__(self, summary: str, problems: list[str] | None = None, fix: str = "", max_listed: int = 20):
        self.summary = summary
        self.problems = list(problems or [])
        self.fix = fix
        lines = [summary]
        for problem in self.problems[:max_listed]:
            lines.append(f"  - {problem}")
        if len(self.problems) > max_listed:
            lines.append(f"  ... and {len(self.problems) - max_listed} more")
        if fix:
            lines.append(f"Fix: {fix}")
        super().__init__("\n".join(lines))
