"""JSON <-> message models, through one explicit cattrs converter.

The converter is strict: a JSON value of the wrong type is an error, never coerced (cattrs'
defaults would turn ``5`` into ``"5"``). Decode errors are translated here, at the edge, into
``InvalidMessage`` (bad envelope) or ``ClientError`` (bad payload); nothing deeper catches
json or cattrs errors.
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from aleatoria.errors import INVALID_PAYLOAD, ClientError, InvalidMessage
from aleatoria.messages import SYSTEM, Envelope

T = TypeVar("T")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _strict(kind: type) -> Any:
    expected = {str: "a string", bool: "a boolean", int: "an integer"}[kind]

    def structure(value: Any, _: Any) -> Any:
        # bool is an int subclass in Python, but not an integer in JSON terms.
        if type(value) is not kind:
            raise TypeError(f"expected {expected}, got {_json_type(value)}")
        return value

    return structure


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _any(value: Any, _: Any) -> Any:
    return value


def _any_out(value: Any) -> Any:
    return value


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter()
    for kind in (str, bool, int):
        converter.register_structure_hook(kind, _strict(kind))
    converter.register_structure_hook(Any, _any)

    def structure_factory(cls: type) -> Any:
        renames: dict[str, Any] = {a.name: override(rename=_camel(a.name)) for a in attrs.fields(cls)}
        return make_dict_structure_fn(cls, converter, **renames)

    def unstructure_factory(cls: type) -> Any:
        renames: dict[str, Any] = {a.name: override(rename=_camel(a.name)) for a in attrs.fields(cls)}
        return make_dict_unstructure_fn(cls, converter, _cattrs_omit_if_default=True, **renames)

    converter.register_structure_hook_factory(attrs.has, structure_factory)
    converter.register_unstructure_hook_factory(attrs.has, unstructure_factory)
    # Client payloads (dicts and lists under an ``Any`` field) are already JSON-ready: pass
    # them through instead of copying them level by level (which is slow, and recursion
    # deep enough to fail on hostile nesting).
    converter.register_unstructure_hook(dict, _any_out)
    converter.register_unstructure_hook(list, _any_out)
    return converter


converter = _make_converter()


_SNAKE_PATH = re.compile(r"\.([a-z]+(?:_[a-z]+)+)")


def _describe(exc: Exception) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        text = "; ".join(cattrs.transform_error(exc, path="$"))
        # cattrs names attributes; the client knows the wire (camelCase) names.
        return _SNAKE_PATH.sub(lambda match: "." + _camel(match.group(1)), text)
    return str(exc)


# JSON stays JSON (PROTOCOL.md section 16): a frame with a non-finite number or an integer
# beyond 64 bits is refused, so nothing the server stores or relays can make it write
# ``Infinity``, ``NaN`` or a number a browser would read differently. orjson refuses the
# non-finite ones itself but reads integers of 2**64 and more (and below -2**63) as floats,
# losing them; a run of 20+ digits (19 after a minus sign) sends the frame to the standard
# library's parser, which checks each integer exactly. The run is found by mapping digits
# and "-" to "1" and the rest to "0" (C-speed translate and one substring search: a regex
# costs ten times more on every frame). A minus counts as a digit so that one search finds
# both runs; a run of dashes and digits that is no number (rare) only costs the slow parser.
_DIGIT_MAP = bytes(0x31 if 0x30 <= c <= 0x39 or c == 0x2D else 0x30 for c in range(256))
_TWENTY_DIGITS = b"1" * 20
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def _has_long_digit_run(frame: str | bytes | bytearray) -> bool:
    raw = frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame
    return _TWENTY_DIGITS in raw.translate(_DIGIT_MAP)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact_int(text: str) -> int:
    if len(text) > 21:  # longer than any 64-bit integer: refuse before converting
        raise ValueError("an integer beyond 64 bits")
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise ValueError("an integer beyond 64 bits")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number beyond the range of a double")
    return value


# A lone surrogate: the standard library's parser reads ``"\ud800"`` (and, from bytes, the
# raw bytes of one) where orjson refuses it, and no encoder can write such a string back.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_lone_surrogates(value: Any) -> None:
    """Raise ValueError if any string in ``value`` (keys too) holds a lone surrogate (a
    valid pair is one character by now). Iterative: nesting is as deep as the parser went."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            if not item.isascii() and _LONE_SURROGATE.search(item):
                raise ValueError("a lone surrogate in a string")
        elif type(item) is dict:
            stack.extend(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)


def loads(frame: str | bytes | bytearray) -> Any:
    """Parse JSON text. Raises InvalidMessage (also for non-finite numbers, integers beyond
    64 bits and lone surrogates: whatever parses can be written back)."""
    try:
        if not _has_long_digit_run(frame):
            return orjson.loads(frame)
        value = json.loads(
            frame, parse_constant=_reject_constant, parse_int=_exact_int, parse_float=_finite_float
        )
        _reject_lone_surrogates(value)
        return value
    except (orjson.JSONDecodeError, ValueError, RecursionError) as exc:
        raise InvalidMessage(f"not valid JSON: {exc}") from None


def dumps(value: Any) -> bytes:
    """Serialise to compact JSON. Raises ClientError(invalid_payload) when a client's value
    cannot be written back (deeper than the encoder allows). Never writes NaN or Infinity."""
    try:
        # A right-sized copy: orjson 3.12+ hands out bytes that keep a buffer of 4 KB or more
        # (ijl/orjson, see home-assistant/core#181245), and history keeps what we encode for a
        # day -- measured: 4.1 KB instead of 0.3 KB per stored DM. The copy costs ~0.2 us.
        return bytes(memoryview(orjson.dumps(value)))
    except orjson.JSONEncodeError:
        pass  # unsigned 64-bit integers orjson refuses to mix, or nesting beyond 254 levels
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (RecursionError, TypeError, ValueError):
        raise ClientError(INVALID_PAYLOAD, "payload is nested too deeply to relay") from None


def decode(frame: str | bytes | bytearray) -> Envelope:
    """Parse one frame into an Envelope. Raises InvalidMessage (answered error_response)."""
    return envelope_of(loads(frame))


def envelope_of(data: Any) -> Envelope:
    """``decode`` of a frame ``loads`` has parsed already. Raises InvalidMessage."""
    if type(data) is not dict:
        raise InvalidMessage(f"expected a JSON object, got {_json_type(data)}")
    if "type" not in data:
        raise InvalidMessage("missing required field 'type'")
    # The usual envelope, every field of its JSON type, built directly: cattrs' structuring
    # is ~1 us of every message. Anything else goes through cattrs for its exact error (a
    # property test holds the two equal).
    get = data.get
    kind, from_user, to_user, room = data["type"], get("fromUser"), get("toUser"), get("room")
    message_id, create_time, incoming = get("messageId"), get("createTime"), get("incoming")
    if (
        type(kind) is str
        and (from_user is None or type(from_user) is str)
        and (to_user is None or type(to_user) is str)
        and (room is None or type(room) is str)
        and (message_id is None or type(message_id) is str)
        and (create_time is None or type(create_time) is str)
        and (incoming is None or type(incoming) is bool)
    ):
        return Envelope(kind, from_user, to_user, room, get("payload"), message_id, create_time, incoming)
    try:
        return converter.structure(data, Envelope)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        raise InvalidMessage(_describe(exc)) from None


def payload_as(payload: Any, cls: type[T], *, optional: bool = False) -> T:
    """Structure an envelope's payload into ``cls``. Raises ClientError(invalid_payload)."""
    if payload is None and optional:
        payload = {}
    if type(payload) is not dict:
        raise ClientError(INVALID_PAYLOAD, f"payload must be an object, got {_json_type(payload)}")
    try:
        return converter.structure(payload, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        raise ClientError(INVALID_PAYLOAD, "invalid payload: " + _describe(exc)) from None


def to_wire(message: Any) -> Any:
    """The JSON-ready form of a model (camelCase keys, absent fields omitted)."""
    return converter.unstructure(message)


def encode(envelope: Envelope) -> bytes:
    """One envelope as JSON bytes. Raises ClientError if a client payload cannot be encoded."""
    return dumps(converter.unstructure(envelope))


def encode_relayed(
    kind: str,
    from_user: str,
    to_user: str | None,
    room: str | None,
    payload: Any,
    message_id: str,
    create_time: str,
) -> bytes:
    """``encode`` of the envelope of a relayed message (chat, signaling), byte for byte (a
    property test holds them equal), without building the Envelope: every chat message and
    signal takes this path, and the Envelope and its unstructuring were ~3 us of the ~15 a
    message costs in the session."""
    message: dict[str, Any] = {"type": kind, "fromUser": from_user}
    if to_user is not None:
        message["toUser"] = to_user
    if room is not None:
        message["room"] = room
    if payload is not None:
        message["payload"] = payload
    message["messageId"] = message_id
    message["createTime"] = create_time
    return dumps(message)


def encode_reply(kind: str, to_user: str, payload: Any, room: str | None = None) -> bytes:
    """``encode`` of a server message to ``to_user`` (``fromUser`` system; ``payload`` a
    model or None), byte for byte (a property test holds them equal), without building the
    Envelope: replies and match announcements take this path."""
    message: dict[str, Any] = {"type": kind, "fromUser": SYSTEM, "toUser": to_user}
    if room is not None:
        message["room"] = room
    if payload is not None:
        message["payload"] = converter.unstructure(payload)
    return dumps(message)


# -- timestamps -----------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FRACTION = re.compile(r"(\.\d{6})\d+")
_SECONDS = "%Y-%m-%dT%H:%M:%S"
_second_cache: tuple[int, str] = (-1, "")


def now() -> tuple[int, str]:
    """The current time as (epoch nanoseconds, RFC 3339 UTC with microseconds)."""
    global _second_cache
    ns = time.time_ns()
    seconds, rest = divmod(ns, 1_000_000_000)
    cached_second, prefix = _second_cache
    if cached_second != seconds:
        prefix = time.strftime(_SECONDS, time.gmtime(seconds))
        _second_cache = (seconds, prefix)
    return ns, f"{prefix}.{rest // 1000:06d}Z"


def rfc3339(ns: int) -> str:
    """Epoch nanoseconds in ``now``'s form: fixed width, so texts order as their times do
    (the DM history script compares them as text)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return f"{time.strftime(_SECONDS, time.gmtime(seconds))}.{rest // 1000:06d}Z"


def parse_time_ns(text: str) -> int:
    """RFC 3339 text to epoch nanoseconds. Raises ClientError(invalid_payload)."""
    try:
        # Go writes nanoseconds; Python parses at most microseconds.
        moment = datetime.fromisoformat(_FRACTION.sub(r"\1", text))
    except ValueError:
        raise ClientError(INVALID_PAYLOAD, f"not an RFC 3339 time: {text[:64]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICROSECOND * 1000


_MICROSECOND = datetime.resolution
