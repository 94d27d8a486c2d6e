"""Where each key of a TOML text is: tomllib keeps no source positions, so `LineIndex` scans
the text once and maps each key path (`("devices", 1, "poll_interval_s")`) to the 1-based
line that defines it, for config errors that name the line (`edge_agent.config.site`).
"""

from __future__ import annotations

import re

Loc = tuple[str | int, ...]

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*(\]\]?)\s*(#.*)?$")
_KEY_RE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                     r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_INLINE_KEY_RE = re.compile(r"""[{,]\s*([A-Za-z0-9_-]+|"[^"]*"|'[^']*')\s*=""")


def _split_key(dotted: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", dotted)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _strip_strings(line: str) -> str:
    """The line without string contents and comments, to count brackets safely."""
    out = re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', '""', line)
    return out.split("#", 1)[0]


class LineIndex:
    """Maps key paths of a TOML text to 1-based line numbers (best effort, no full parser)."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Loc, int] = {}
        self._arrays: dict[Loc, int] = {}  # array-of-tables path -> current index
        prefix: Loc = ()
        depth = 0  # open brackets of a multi-line array value
        in_ml: str | None = None  # inside a multi-line string opened by this delimiter
        for n, line in enumerate(text.splitlines(), start=1):
            if in_ml is not None:
                if in_ml in line:
                    in_ml = None
                continue
            if depth > 0:
                s = _strip_strings(line)
                depth += s.count("[") - s.count("]")
                continue
            header = _HEADER_RE.match(line)
            if header and header.group(1) == header.group(3)[::-1].replace("]", "["):
                prefix = self._enter(_split_key(header.group(2)), header.group(1) == "[[", n)
                continue
            key = _KEY_RE.match(line)
            if not key:
                continue
            path = prefix + tuple(_split_key(key.group(1)))
            self.lines.setdefault(path, n)
            rest = line[key.end():]
            for delim in ('"""', "'''"):
                if rest.count(delim) == 1:
                    in_ml = delim
            if in_ml is None:
                s = _strip_strings(rest)
                depth = max(0, s.count("[") - s.count("]"))
                if "{" in s:
                    for inner in _INLINE_KEY_RE.finditer(rest):
                        self.lines.setdefault(path + tuple(_split_key(inner.group(1))), n)

    def _enter(self, parts: list[str], is_array: bool, n: int) -> Loc:
        resolved: Loc = ()
        for i, part in enumerate(parts):
            resolved = resolved + (part,)
            last = i == len(parts) - 1
            if last and is_array:
                idx = self._arrays.get(resolved, -1) + 1
                self._arrays[resolved] = idx
                # Nested arrays restart under a new parent element.
                stale = [k for k in self._arrays
                         if k[: len(resolved)] == resolved and k != resolved]
                for other in stale:
                    del self._arrays[other]
                resolved = resolved + (idx,)
            elif resolved in self._arrays:
                resolved = resolved + (self._arrays[resolved],)
        self.lines.setdefault(resolved, n)
        return resolved

    def line_of(self, loc: Loc) -> int | None:
        """The line of the deepest part of `loc` the text defines; unknown parts are skipped
        (a key the file leaves out, such as a required one, falls back to its table's line)."""
        best: int | None = None
        resolved: Loc = ()
        for part in loc:
            candidate = resolved + (part,)
            if candidate in self.lines or any(k[: len(candidate)] == candidate for k in self.lines):
                resolved = candidate
                if candidate in self.lines:
                    best = self.lines[candidate]
        return best


__all__ = ["LineIndex", "Loc"]
