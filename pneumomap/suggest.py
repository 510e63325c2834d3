"""The "did you mean" hint of every error about an unknown name (a recipe key, a pipeline node, a
``--set`` path): one matcher, so every command suggests the same way. Imports nothing of pneumomap."""
from __future__ import annotations

import difflib
from typing import Any, Iterable


def closest(name: Any, choices: Iterable[Any]) -> str | None:
    """The choice most like ``name`` (compared as strings, difflib ratio >= 0.5), or None."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return match[0] if match else None


def did_you_mean(name: Any, choices: Iterable[Any]) -> str:
    """`` (did you mean 'X'?)`` for the closest choice, or "" when none is close: for the end of a message."""
    match = closest(name, choices)
    return f" (did you mean '{match}'?)" if match else ""
