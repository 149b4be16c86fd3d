"""The one exception type for problems the user can fix (bad input, bad files, bad protocol)."""

from __future__ import annotations


class InputError(Exception):
    """A problem with user input. ``str(exc)`` is a one-line, user-facing message.

    Messages name the file and the field when there is one, e.g.
    ``case.yaml: courses[0].fractions: missing (the number of fractions must be given)``.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        parts = [p for p in (source, field) if p]
        full = ": ".join(parts + [message]) if parts else message
        super().__init__(full.replace("\n", " "))
        self.source = source
        self.field = field
        self.detail = message
