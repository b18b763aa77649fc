"""The load test's stamp inside a chat ``content`` string.

The protocol only lets a client choose ``content`` (a string of at most 4,000
characters), so the sequence number and send time travel there as
``lt|<seq>|<monotonic ns>|<padding>``: compact, cheap to split, and recognisable so that
unrelated traffic (another client in the same room) is ignored rather than miscounted.
The send time is ``time.monotonic_ns()``, which on Linux is one clock for every process
on the machine, so worker processes can compare stamps.
"""

from __future__ import annotations

import time
from typing import NamedTuple

PREFIX = "lt|"
MAX_CONTENT = 4000


class Stamp(NamedTuple):
    seq: int
    sent_ns: int


def now_ns() -> int:
    return time.monotonic_ns()


def encode(seq: int, sent_ns: int, size: int = 0) -> str:
    """The content string for message ``seq``, padded to ``size`` characters when larger."""
    text = f"{PREFIX}{seq}|{sent_ns}|"
    if len(text) < size:
        text += "x" * (min(size, MAX_CONTENT) - len(text))
    return text


def decode(content: object) -> Stamp | None:
    """The stamp in ``content``, or None when it is not one of ours."""
    if not isinstance(content, str) or not content.startswith(PREFIX):
        return None
    parts = content.split("|", 3)
    if len(parts) < 3:
        return None
    try:
        return Stamp(int(parts[1]), int(parts[2]))
    except ValueError:
        return None
