"""Pure core: codec, limits, origins, rate limiting (no I/O)."""

from __future__ import annotations

import pytest

from aleatoria.codec import decode, encode, now, parse_time_ns, payload_as
from aleatoria.errors import AbuseDetected, ClientError, InvalidMessage
from aleatoria.limits import RateLimiter, clamp_limit, id_problem
from aleatoria.messages import ChatPayload, Envelope, RecentMessagesRequest
from aleatoria.origin import OriginPolicy


def test_envelope_round_trip_uses_camel_case_and_omits_absent_fields() -> None:
    """Wire names are camelCase and absent fields are omitted, never null."""
    env = decode('{"type":"chat_message","toUser":"b","payload":{"content":"x"},"extra":1}')
    assert Envelope(type="chat_message", to_user="b", payload={"content": "x"}) == env
    assert b'{"type":"chat_message","toUser":"b","payload":{"content":"x"}}' == encode(env)


@pytest.mark.parametrize(
    "frame",
    ["nope", "[1]", "5", '"s"', "{}", '{"type":5}', '{"type":"x","room":1}', '{"type":"x","incoming":"y"}'],
)
def test_malformed_envelopes_are_invalid_messages(frame: str) -> None:
    """Non-JSON, non-objects, missing type and wrongly typed fields are InvalidMessage."""
    with pytest.raises(InvalidMessage):
        decode(frame)


def test_payload_types_are_strict() -> None:
    """No coercion: a number is not a string, a boolean is not an integer."""
    with pytest.raises(ClientError):
        payload_as({"content": 5}, ChatPayload)
    with pytest.raises(ClientError):
        payload_as({"limit": True}, RecentMessagesRequest)
    assert RecentMessagesRequest(limit=3) == payload_as({"limit": 3}, RecentMessagesRequest)


def test_timestamps_are_rfc3339_with_microseconds_and_parse_back() -> None:
    """createTime has microseconds and a Z; nanosecond input (as Go writes) parses."""
    ns, text = now()
    assert text.endswith("Z") and 27 == len(text)
    assert ns // 1000 * 1000 == parse_time_ns(text)
    assert 1_795_636_800_123_456_000 == parse_time_ns("2026-11-25T20:00:00.123456789Z")
    with pytest.raises(ClientError):
        parse_time_ns("yesterday")


@pytest.mark.parametrize(
    ("value", "ok"),
    [("alice", True), ("a.b-c_d@e", True), ("a:b", False), ("", False), ("x" * 65, False), ("a b", False)],
)
def test_ids(value: str, ok: bool) -> None:
    """Ids are 1-64 chars of letters, digits and _-.@."""
    assert ok == (id_problem(value) is None)


def test_limit_is_clamped() -> None:
    """limit defaults to 50 and is clamped to 1..200."""
    assert (50, 1, 200, 7) == (clamp_limit(None), clamp_limit(-1), clamp_limit(10**9), clamp_limit(7))


def test_origin_policy() -> None:
    """Allowed origins match after normalising the default port; same-origin is allowed."""
    policy = OriginPolicy(("https://www.aleatoria.chat",), require_origin=False)
    assert policy.allows("https://www.aleatoria.chat:443", "example:1")
    assert policy.allows("http://127.0.0.1:8085", "127.0.0.1:8085")
    assert not policy.allows("https://evil.example", "127.0.0.1:8085")
    assert not policy.allows("null", "127.0.0.1:8085")
    assert policy.allows(None, "x")
    assert not OriginPolicy((), require_origin=True).allows(None, "x")
    assert OriginPolicy(("*",), require_origin=False).allows("https://any.example", "x")


def test_rate_limiter_limits_then_detects_abuse() -> None:
    """Over the burst, messages are refused; sustained abuse raises AbuseDetected."""
    limiter = RateLimiter(rate=10, burst=5, abuse_seconds=1)
    for _ in range(5):
        limiter.check(0.0)
    with pytest.raises(ClientError):
        limiter.check(0.0)
    refused = []
    with pytest.raises(AbuseDetected):
        for _ in range(20):
            try:
                limiter.check(0.0)
            except AbuseDetected:
                raise
            except ClientError as exc:
                refused.append(exc.close_code)
    assert refused and {None} == set(refused)  # refusals answer; only abuse closes
    # After a pause the client is welcome again.
    limiter.check(10.0)
