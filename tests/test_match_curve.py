"""scripts/match_curve.py's reading of the generator's records: medians per user count and
mode, and the highest rate within the latency bound."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(_SCRIPTS))  # match_curve imports side_by_side beside it
try:
    _spec = importlib.util.spec_from_file_location("match_curve", _SCRIPTS / "match_curve.py")
    assert _spec is not None and _spec.loader is not None
    curve: Any = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(curve)
finally:
    sys.path.remove(str(_SCRIPTS))


def _record(server: str, users: int, rate: float, p99: float, **more: Any) -> dict[str, Any]:
    return {
        "server": server,
        "users": users,
        "matches_per_s": rate,
        "server_cpu_util": 0.5,
        "match_latency": {"p50_ms": p99 / 4, "p90_ms": p99 / 2, "p99_ms": p99},
        "timeouts": 0,
        "duplicate_assigns": 0,
        **more,
    }


def _reps(server: str, users: int, *p99s: float, rate: float = 100.0) -> list[dict[str, Any]]:
    return [_record(server, users, rate + index, p99) for index, p99 in enumerate(p99s)]


def test_each_point_is_the_median_of_its_repetitions() -> None:
    records = (
        _reps("memory", 50, 3.0, 9.0, 4.0)
        + _reps("redis", 50, 30.0, 10.0, 12.0)
        + [_record("redis", 50, 1.0, 1.0, error="server did not open its port")]
    )
    found = curve.points(records)
    assert [(point.users, point.mode) for point in found] == [(50, "memory"), (50, "redis")]
    assert found[0].p99_ms == 4.0 and found[0].matches_per_s == 101.0
    assert found[1].p99_ms == 12.0 and found[1].p50_ms == 3.0


def test_points_come_by_user_count_then_mode() -> None:
    records = _reps("redis", 200, 50.0) + _reps("memory", 25, 1.0) + _reps("redis", 25, 5.0)
    found = curve.points(records)
    assert [(point.users, point.mode) for point in found] == [(25, "memory"), (25, "redis"), (200, "redis")]


def test_the_best_rate_within_the_bound_is_the_fastest_point_that_kept_it() -> None:
    found = curve.points(
        _reps("redis", 25, 8.0, rate=500)
        + _reps("redis", 50, 15.0, rate=900)
        + _reps("redis", 100, 28.0, rate=1300)
        + _reps("memory", 200, 26.0, rate=2000)
    )
    best = curve.best_within(found, "redis", 20.0)
    assert best is not None and best.users == 50 and best.matches_per_s == 900
    assert curve.best_within(found, "redis", 28.0).users == 100  # the bound is inclusive
    assert curve.best_within(found, "memory", 20.0) is None


def test_the_report_gives_the_verdict_for_each_mode() -> None:
    found = curve.points(_reps("memory", 50, 4.0, rate=1800) + _reps("redis", 50, 25.0, rate=950))
    text = curve.render(found, 20.0, {50: 210.4})
    assert "| 50 | memory | 1,800 |" in text
    assert "| 50 | redis | 950 |" in text and "| 210 us |" in text
    assert "- memory: up to 1,800 matches/s with a p99 within 20 ms (50 users, p99 4.0 ms" in text
    assert "- redis: no user count kept the match latency p99 within 20 ms" in text
