"""Paths as answers show them: relative to ``RAPPORT_HOME``, else by file name only.

``/v1/info`` and 503 bodies go to clients, who have no business knowing the server's
folders; the server's log keeps the full paths for its operator.
"""

from __future__ import annotations

import re
from pathlib import Path

#: The name under which answers show the home folder in free text.
HOME = "$RAPPORT_HOME"
#: An absolute path with at least one folder; not the path part of a URL (``host/a/b``).
_ABSOLUTE = re.compile(
    r"(?<![\w.~$-])/(?!\$)(?:[^\s'\"/:,;()\[\]{}<>]+/)+([^\s'\"/:,;()\[\]{}<>]*)"
)


def _homes(home: Path) -> list[str]:
    """The spellings of the home folder in messages, longest first."""
    spelled = {str(home.resolve()), str(home.absolute())}
    return sorted((h for h in spelled if h != "/"), key=len, reverse=True)


def shown_path(path: str | Path, home: Path) -> str:
    """``path`` relative to ``home`` when inside it, else its file name."""
    target = Path(path)
    for base in (home.resolve(), home.absolute()):
        for candidate in (target.absolute(), target.resolve()):
            if candidate.is_relative_to(base):
                return candidate.relative_to(base).as_posix()
    return target.name


def redact(text: str, home: Path) -> str:
    """``text`` with the home written ``$RAPPORT_HOME``, other absolute paths cut to names."""
    for spelled in _homes(home):
        text = text.replace(spelled, HOME)
    return _ABSOLUTE.sub(lambda m: m.group(1) or "", text)
