"""docs/protocol.md is the project's own complete reference of the wire protocol: it names
every message type the server reads or sends and every error code, its example frames are
valid JSON of known types, and no doc links outside the repository for the protocol."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from inmemory import connect, inmemory_server

from aleatoria import errors
from aleatoria import messages as m

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
SERVER_TYPES = {
    m.ROOM_JOINED,
    m.ROOM_LEFT,
    m.ROOMS_LIST,
    m.ASSIGN_ROLE,
    m.NO_PEER_AVAILABLE,
    m.RECENT_MESSAGES,
    m.DIRECT_MESSAGES,
    m.ERROR,
    m.ERROR_RESPONSE,
    m.PONG,
    m.TOKEN_REFRESHED,
    m.ROOMS_DIRECTORY,
    m.ROOM_MEMBERS,
    m.STATS,
    m.ICE_SERVERS,
    m.USER_BLOCKED,
    m.USER_UNBLOCKED,
    m.BLOCKED_USERS,
    m.REPORT_RECEIVED,
    m.WELCOME,
    m.MEMBER_JOINED,
    m.MEMBER_LEFT,
    m.SEARCHING,
}
ERROR_CODES = {
    errors.NOT_IN_ROOM,
    errors.INVALID_TARGET,
    errors.UNKNOWN_TYPE,
    errors.INVALID_PAYLOAD,
    errors.TOO_LARGE,
    errors.RATE_LIMITED,
    errors.PEER_UNAVAILABLE,
    errors.LIMIT_REACHED,
    errors.INVALID_TOKEN,
}


@pytest.mark.parametrize("kind", sorted(m.CLIENT_TYPES | SERVER_TYPES))
def test_every_message_type_is_documented(kind: str) -> None:
    """Each type the server reads or sends has its row (or example) in docs/protocol.md."""
    assert f"`{kind}`" in PROTOCOL


def test_the_server_types_above_are_all_of_them() -> None:
    """Every message type name in aleatoria.messages is a client type or in SERVER_TYPES, so
    a new server type cannot miss its documentation."""
    not_types = {m.SYSTEM, m.NO_PEER_TEXT, m.PEER_LEFT}
    names = {v for k, v in vars(m).items() if k.isupper() and isinstance(v, str)} - not_types
    assert names - m.CLIENT_TYPES == SERVER_TYPES


def test_every_error_code_is_in_the_errors_table() -> None:
    """Each machine-readable error code is a row of the errors table."""
    table = PROTOCOL.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `")}
    assert ERROR_CODES == rows


def test_the_example_frames_are_json_of_known_types() -> None:
    """Every example frame (``→ {...}`` / ``← {...}``) parses, and its type is one the
    server reads (→) or sends (←)."""
    frames = re.findall(r"^(?:\w+ *)?([→←]) (\{.*\})$", PROTOCOL, flags=re.MULTILINE)
    assert len(frames) > 30
    for arrow, text in frames:
        frame = json.loads(text)
        expected = m.CLIENT_TYPES if arrow == "→" else SERVER_TYPES | m.CLIENT_TYPES
        assert frame["type"] in expected, text


def test_no_doc_links_outside_the_repository_for_the_protocol() -> None:
    """README and docs point to docs/protocol.md, not to a file beside the repository."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "shared/PROTOCOL" not in path.read_text(), path.name
    assert "(docs/protocol.md)" in (ROOT / "README.md").read_text()


# Values the server makes up afresh each time: the README shows one of their kind.
_VOLATILE = {"messageId", "createTime", "matchId"}


def _same_shape(documented: Any, real: Any) -> bool:
    """The same keys at every level, and the same values but for ``_VOLATILE`` ones."""
    if isinstance(documented, dict):
        return (
            isinstance(real, dict)
            and documented.keys() == real.keys()
            and all(
                isinstance(real[k], str) if k in _VOLATILE else _same_shape(v, real[k])
                for k, v in documented.items()
            )
        )
    return bool(documented == real)


async def test_the_readme_wire_session_is_what_the_server_says() -> None:
    """The README's session on the wire, replayed as alice (bob waiting in the pool):
    every frame the server sends has the documented fields, assign_role's level-1
    matchId and commonInterests included."""
    readme = (ROOT / "README.md").read_text()
    session = readme.split("A session looks like this on the wire", 1)[1].split("```text", 1)[1]
    lines = re.findall(r"^([→←]) (\{.*\})$", session.split("```", 1)[0], flags=re.MULTILINE)
    assert 6 <= len(lines)
    async with inmemory_server(rate_limit=0) as server, connect(server, "bob", "Lobby") as bob:
        await bob.send({"type": "user_available_webrtc"})
        await bob.sync()
        async with connect(server, "alice", "Lobby", joined=False) as alice:
            for arrow, text in lines:
                frame = json.loads(text)
                if arrow == "→":
                    await alice.send(frame)
                else:
                    real = await alice.recv()
                    assert _same_shape(frame, real), (frame, real)
