"""Sessions of closed-loop control over HTTP: each id holds one policy session (the history an LSTM, GPT or
interleaved head needs). Bounded in number (the least recently used is dropped when full) and dropped after an idle
time, so clients that vanish cost nothing for long."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    model: str
    session: Any
    last_used: float


class SessionStore:
    """Policy sessions by id; `clock` is injectable so expiry is testable without waiting."""

    def __init__(self, max_sessions: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic):
        if max_sessions < 1 or idle_seconds <= 0:
            raise ValueError(f"sessions: max_sessions ({max_sessions}) must be >= 1 and idle_seconds "
                             f"({idle_seconds}) > 0")
        self.max_sessions, self.idle_seconds, self.clock = max_sessions, idle_seconds, clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, e in self._entries.items() if now - e.last_used > self.idle_seconds]:
            del self._entries[key]

    def start(self, session_id: str, model: str, session: Any) -> None:
        """Begin (or begin again) the episode of `session_id` with a fresh policy session."""
        self._expire()
        self._entries.pop(session_id, None)
        while len(self._entries) >= self.max_sessions:
            self._entries.popitem(last=False)
        self._entries[session_id] = _Entry(model, session, self.clock())

    def get(self, session_id: str) -> tuple[str, Any] | None:
        """(model name, session) of a live session, marking it used; None when unknown or expired."""
        self._expire()
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        entry.last_used = self.clock()
        self._entries.move_to_end(session_id)
        return entry.model, entry.session
