"""Streaming text with stop strings: never let any part of a stop string reach the caller."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringFilter:
    """Holds back the end of the text while it could still become a stop string.

    push() returns the text that is safe to show; once a stop string appears, the text before it
    is returned and `stopped` becomes True (everything after is dropped).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._partial_match_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The text held back when generation ends without a stop string."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
