"""The error type for user mistakes, and close-match suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix.

    The CLI prints it as one ``error: ...`` line on stderr and exits with code 2;
    ``--debug`` shows the traceback.
    """


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return a ``" (did you mean ...?)"`` suffix naming close matches of ``name``, or ``""``.

    Args:
        name: The unknown name the user gave.
        choices: The valid names.
    """
    matches = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


def unknown(kind: str, name: str, choices: Iterable[str], option: str) -> UserError:
    """Build the error for an unknown plugin name, listing close matches.

    Args:
        kind: What was looked up, e.g. ``"backbone"``.
        name: The unknown name.
        choices: The registered names.
        option: The CLI option the name came from, e.g. ``"--backbone"``.
    """
    choices = sorted(choices)
    hint = did_you_mean(name, choices)
    listing = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return UserError(f"{option}: unknown {kind} {name!r}{hint}; known: {listing}")
