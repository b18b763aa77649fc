"""Privacy mode (PROTOCOL.md section 14), pure: what a peer may see of relayed ICE signaling.

How this works. With ``ALEATORIA_RELAY_ONLY`` the server relays only relay candidates (those
a TURN server allocated: their address is the TURN server's), so no stranger learns a user's
own address from ``webrtc_candidate``, ``webrtc_offer`` or ``webrtc_answer`` — also when the
user's client ignores ``iceTransportPolicy`` or the stranger's client was modified.

Every rule fails closed: a candidate is kept only when it is recognised as a well-formed
relay candidate; anything else that could be a candidate is removed.

- A candidate (``payload.candidate`` when a string, or ``payload.candidate.candidate``) is
  ``candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type>``
  followed by name/value pairs (RFC 8839 section 5.1). It is kept when ``typ`` is the seventh
  field and ``relay`` the eighth, ``typ`` appears nowhere else and the text is printable
  ASCII (no line break that could smuggle a second line into SDP). Its ``raddr`` and
  ``rport`` values (the user's own address the relay was allocated from) become ``0.0.0.0``
  and ``0``. An empty candidate (end-of-candidates) or a null one passes; every other
  candidate message is dropped.
- SDP (``payload.sdp`` when a string, or ``payload.sdp.sdp``) is split at every CR and LF, so
  a line is judged whichever line ending its reader uses. A line that, stripped and lower
  case, starts with ``a=candidate`` is kept (raddr/rport blanked) or removed with its line
  ending by the rule above; ``a=remote-candidates`` lines (addresses, no type) are removed.
  The other places SDP writes an address — ``o=``, ``c=`` and ``a=rtcp:`` — keep it when it is
  unspecified (``0.0.0.0``, ``::``), loopback, or the address of a relay candidate kept in
  the same SDP, and otherwise get ``0.0.0.0`` (``::`` for IP6). Browsers take the path from
  the candidates alone, so this changes nothing for the call; a browser writes the address
  of its default candidate into ``c=`` once candidates are gathered (renegotiation, ICE
  restart), and that can be the host's own.
- A signal that carries candidate or SDP text anywhere else in its payload (a shape the
  server does not read, such as ``payload.description.sdp``) is dropped whole: the server
  cannot vouch for what it did not check. So is an offer or answer without SDP where the
  protocol puts it.

Everything else — the rest of each candidate and line, the line endings, every other field
of the payload — is kept byte for byte.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from aleatoria import messages as m

BLANK_ADDRESS = "0.0.0.0"
BLANK_PORT = "0"

_TOKEN = re.compile(r"[^ ]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
# A line is what lies between line breaks of any kind: the finest split any reader makes.
_LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n|$)")
# Text that, found outside the places the server checks, may be a candidate or SDP.
# (Every SDP has "IN IP4" or "IN IP6" in its o= line; an ICE ufrag or sdpMid has no space.)
_SUSPECT = re.compile(r"candidate|\bin\s+ip[46]\b", re.IGNORECASE)


class Scrubbed(NamedTuple):
    """The payload to relay, or ``keep`` False when the message must be dropped."""

    keep: bool
    payload: Any = None


_DROP = Scrubbed(False)


class _Relay(NamedTuple):
    text: str  # the candidate with raddr/rport blanked
    address: str  # its connection address


def _relay_candidate(text: str) -> _Relay | None:
    """``text`` (``candidate:...`` or ``a=candidate:...``) when it is a well-formed relay
    candidate, with its related address blanked; None for anything else."""
    if not _PRINTABLE.fullmatch(text):
        return None
    spans = [(match.start(), match.end()) for match in _TOKEN.finditer(text)]
    words = [text[start:end].lower() for start, end in spans]
    if len(words) < 8 or not words[0].startswith(("candidate:", "a=candidate:")):
        return None
    if words[6] != "typ" or words[7] != "relay" or "typ" in words[8:]:
        return None
    extensions = words[8:]
    if len(extensions) % 2:
        return None  # a name without its value: not a candidate any parser agrees on
    pieces: list[str] = []
    last = 0
    for index in range(8, len(words), 2):
        name = words[index]
        blank = BLANK_ADDRESS if name == "raddr" else BLANK_PORT if name == "rport" else None
        if blank is not None:
            start, end = spans[index + 1]
            pieces += [text[last:start], blank]
            last = end
    pieces.append(text[last:])
    start, end = spans[4]
    return _Relay("".join(pieces), text[start:end])


def scrub_candidate(text: str) -> str | None:
    """The candidate a peer may see: ``text`` itself if empty (end-of-candidates), the relay
    candidate with raddr/rport blanked, or None (drop it)."""
    if text == "":
        return text
    relay = _relay_candidate(text)
    return None if relay is None else relay.text


def is_candidate_line(line: str) -> bool:
    """True for an SDP line a reader could take for a candidate (``a=candidate...``)."""
    return line.lstrip().lower().startswith("a=candidate")


def scrub_sdp(sdp: str) -> str:
    """``sdp`` with every non-relay candidate line removed, the relay ones' raddr/rport
    blanked and the user's own address blanked from ``o=``, ``c=`` and ``a=rtcp:``."""
    lines = [(match.group(1), match.group(2)) for match in _LINE.finditer(sdp)]
    kept: list[tuple[str, str]] = []
    relays: set[str] = set()
    for text, ending in lines:
        if not text and not ending:
            continue  # the regex's final empty match
        lowered = text.lstrip().lower()
        if lowered.startswith("a=remote-candidates"):
            continue
        if lowered.startswith("a=candidate"):
            relay = _relay_candidate(text)
            if relay is None:
                continue
            relays.add(_bare(relay.address))
            text = relay.text
        kept.append((text, ending))
    out: list[str] = []
    for text, ending in kept:
        fixed = _blank_session_address(text, relays)
        if fixed is not None:
            out += [fixed, ending]
    return "".join(out)


# o=<user> <sess-id> <sess-version> IN <addrtype> <address>; c=IN <addrtype> <address>[/ttl];
# a=rtcp:<port> [IN <addrtype> <address>] (RFC 8866, RFC 3605): the index of addrtype.
_ADDRESS_LINES: dict[str, tuple[int, int]] = {"o=": (4, 6), "c=": (1, 3), "a=rtcp:": (2, 4)}


def _blank_session_address(text: str, relays: set[str]) -> str | None:
    """``text`` with its address blanked unless harmless; None to drop a malformed line."""
    head = text.lstrip()
    lowered = head.lower()
    prefix = next((p for p in _ADDRESS_LINES if lowered.startswith(p)), None)
    if prefix is None:
        return text
    type_index, count = _ADDRESS_LINES[prefix]
    offset = len(text) - len(head) + len(prefix)
    value = text[offset:]
    spans = [(match.start(), match.end()) for match in _TOKEN.finditer(value)]
    if prefix == "a=rtcp:" and len(spans) == 1:
        return text  # a port only
    if len(spans) != count:
        return None
    start, end = spans[-1]
    if _harmless(value[start:end], relays):
        return text
    blank = "::" if value[slice(*spans[type_index])].upper() == "IP6" else BLANK_ADDRESS
    return text[: offset + start] + blank + text[offset + end :]


def _bare(address: str) -> str:
    """An address without a multicast ``/ttl`` suffix or IPv6 brackets, lower case."""
    return address.split("/", 1)[0].strip("[]").lower()


def _harmless(address: str, relays: set[str]) -> bool:
    bare = _bare(address)
    if bare in relays:
        return True
    try:
        parsed = ipaddress.ip_address(bare)
    except ValueError:
        return False  # a host name (mDNS .local included) may name the user's machine
    return parsed.is_unspecified or parsed.is_loopback


# -- payloads ------------------------------------------------------------------------------------


def scrub_signal(kind: str, payload: Any) -> Scrubbed:
    """What to relay of a signaling message's ``payload`` in privacy mode."""
    if kind == m.WEBRTC_CANDIDATE:
        return _scrub_at(payload, "candidate", _candidate_value)
    if kind in (m.WEBRTC_OFFER, m.WEBRTC_ANSWER):
        return _scrub_at(payload, "sdp", _sdp_value)
    return Scrubbed(True, payload)


def _candidate_value(value: Any) -> Scrubbed:
    if value is None:
        return Scrubbed(True, None)  # end-of-candidates, as some clients send it
    if not isinstance(value, str):
        return _DROP
    scrubbed = scrub_candidate(value)
    return _DROP if scrubbed is None else Scrubbed(True, scrubbed)


def _sdp_value(value: Any) -> Scrubbed:
    return Scrubbed(True, scrub_sdp(value)) if isinstance(value, str) else _DROP


def _scrub_at(payload: Any, key: str, scrub: Callable[[Any], Scrubbed]) -> Scrubbed:
    """Scrub ``payload[key]`` when a string, else ``payload[key][key]`` (the browser's init
    dictionaries); drop the message if the value is missing or suspect text is elsewhere."""
    if payload is None and key == "candidate":
        return Scrubbed(True, None)  # end-of-candidates with no payload at all
    if not isinstance(payload, dict) or key not in payload:
        return _DROP
    outer = payload[key]
    nested = isinstance(outer, dict)
    if nested and key not in outer:
        return _DROP
    value = outer[key] if nested else outer
    if isinstance(value, dict | list):
        return _DROP
    others = [v for k, v in payload.items() if k != key]
    if nested:
        others += [v for k, v in outer.items() if k != key]
    if any(_suspect(other) for other in others):
        return _DROP
    scrubbed = scrub(value)
    if not scrubbed.keep:
        return _DROP
    if scrubbed.payload == value:
        return Scrubbed(True, payload)
    if nested:
        return Scrubbed(True, {**payload, key: {**outer, key: scrubbed.payload}})
    return Scrubbed(True, {**payload, key: scrubbed.payload})


def _suspect(value: Any) -> bool:
    """True when ``value`` holds, at any depth, text that may be a candidate or SDP."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _SUSPECT.search(item):
                return True
        elif isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return False
