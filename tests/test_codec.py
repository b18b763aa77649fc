"""The codec's output is what history keeps (up to a day, 1,000 messages per room and per
DM conversation), so it must be right-sized."""

from __future__ import annotations

import tracemalloc

from aleatoria import messages as m
from aleatoria.codec import encode
from aleatoria.messages import Envelope


def test_encoded_messages_are_right_sized() -> None:
    envelope = Envelope(
        type=m.CHAT_MESSAGE,
        from_user="alice",
        to_user="bob",
        payload={"content": "x" * 150},
        message_id="m-1",
        create_time="2026-11-26T00:00:00.000000Z",
    )
    kept: list[bytes] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept.extend(encode(envelope) for _ in range(500))
        per_message = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    size = len(kept[0])
    # A bytes object costs its length plus ~33 bytes of header, and the list a pointer.
    # orjson 3.12+ alone retains a 4 KB buffer per result (4,098 bytes measured here).
    assert per_message < size + 100, (per_message, size)
