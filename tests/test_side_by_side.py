"""scripts/side_by_side.py's verdict: each speed target computed from the records of one run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "side_by_side.py"
_spec = importlib.util.spec_from_file_location("side_by_side", _PATH)
assert _spec is not None and _spec.loader is not None
sbs: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sbs)


def _reps(server: str, *values: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"server": server, **value} for value in values]


def _run(**changes: Any) -> dict[str, list[dict[str, Any]]]:
    """One run's records, three repetitions per server, every target met unless changed."""
    match_redis = {
        "matches_per_s": 800.0,
        "match_latency": {"p99_ms": 15.0},
        "relay_latency": {"p99_ms": 90.0},
        "timeouts": 0,
        "double_matches": 0,
    }
    match_redis.update(changes.get("match_redis", {}))
    return {
        "dm": _reps("dm-floor", *[{"server_cpu_us_per_round_trip": v} for v in (70.0, 80.0, 75.0)])
        + _reps("memory", *[{"server_cpu_us_per_round_trip": v} for v in (100.0, 110.0, 90.0)])
        + _reps("redis", *[{"server_cpu_us_per_round_trip": v} for v in (120.0, 125.0, 130.0)])
        + [{"server": "redis", "error": "a failed rep is left out", "server_cpu_us_per_round_trip": 1e9}],
        "fanout-1x500": [],
        "fanout-10x50": _reps("memory", {"server_cpu_us_per_delivery": 3.0, "lost": changes.get("lost", 0)})
        + _reps("redis", {"server_cpu_us_per_delivery": 3.6, "lost": 0, "order_violations": 0}),
        "match": _reps(
            "memory",
            {"matches_per_s": 1500.0, "match_latency": {"p99_ms": 12.0}, "timeouts": 0, "double_matches": 0},
        )
        + _reps("redis", match_redis),
        "match-floor": _reps("floor", {"match_latency": {"p99_ms": 9.0}, "timeouts": 4})
        + _reps("floor-redis", {"match_latency": {"p99_ms": 11.0}, "timeouts": 6}),
        "conns": _reps("h11-floor", {"server_cpu_us_per_connect": 200.0})
        + _reps("memory", {"server_cpu_us_per_connect": 210.0, "server_bytes_per_conn": 6100}),
    }


def _verdict(echo_us: float, results: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[float, bool]]:
    return {t.name: (round(t.figure, 3), t.holds) for t in sbs.targets(echo_us, results)}


def test_every_target_from_its_own_medians() -> None:
    verdict = _verdict(25.0, _run())
    assert verdict == {
        "DM round trip / echo floor": (4.0, True),  # median 100 over the echo floor's 25
        "connect / h11 floor": (1.05, True),
        "idle memory per connection (KB)": (6.1, True),
        "Redis DM / memory": (0.8, True),  # 100 / 125: the failed rep is not a figure
        "Redis fan-out 10x50 / memory": (0.833, True),
        "Redis match / memory": (0.533, True),
        "Redis match latency p99 (ms)": (15.0, True),
        "Redis match generator timeouts": (0.0, True),
        "lost, reordered, double matched (all runs)": (0.0, True),
    }


def test_each_target_fails_past_its_bound() -> None:
    verdict = _verdict(20.0, _run(lost=2, match_redis={"timeouts": 3, "match_latency": {"p99_ms": 20.5}}))
    failed = {name for name, (_, holds) in verdict.items() if not holds}
    assert failed == {
        "DM round trip / echo floor",  # 5x
        "Redis match latency p99 (ms)",
        "Redis match generator timeouts",
        "lost, reordered, double matched (all runs)",
    }


def test_the_match_target_is_the_match_latency_not_the_relay_latency() -> None:
    """compare.py's match table shows the relay latency; the target is request to assign_role."""
    assert _verdict(25.0, _run())["Redis match latency p99 (ms)"] == (15.0, True)
    slow = _run(match_redis={"match_latency": {"p99_ms": 105.0}, "relay_latency": {"p99_ms": 10.0}})
    assert _verdict(25.0, slow)["Redis match latency p99 (ms)"] == (105.0, False)


def test_the_match_targets_name_what_the_floors_reach() -> None:
    """The match floor's latency and timeouts beside the two match targets, each floor's own."""
    details = {t.name: t.detail for t in sbs.targets(25.0, _run())}
    assert (
        details["Redis match latency p99 (ms)"]
        == "memory mode 12.0; the match floor alone 11.0 in Redis, 9.0 in memory"
    )
    assert (
        details["Redis match generator timeouts"]
        == "memory mode 0; the match floor alone 6 in Redis, 4 in memory"
    )


def test_a_server_with_no_figure_is_an_error_not_a_pass() -> None:
    results = _run()
    results["conns"] = _reps("memory", {"server_cpu_us_per_connect": 210.0, "server_bytes_per_conn": 6100})
    with pytest.raises(ValueError, match="h11-floor"):
        sbs.targets(25.0, results)


def test_the_report_names_every_target_and_the_echo_runs() -> None:
    results = _run()
    results["fanout-1x500"] = _reps("memory", {"server_cpu_us_per_delivery": 3.0}) + _reps(
        "redis", {"server_cpu_us_per_delivery": 3.9}
    )
    for name, extra in (("match", {"match_latency": {"p50_ms": 5.0}, "relay_latency": {"p99_ms": 9.0}}),):
        for record in results[name]:
            for key, value in extra.items():
                record.setdefault(key, {}).update(value)
    text = sbs.render(2, [24.0, 26.0, 25.0], results, {"dm": "27.00 us per round trip"})
    assert text.startswith("## Run 2\n")
    assert "echo floor: 25.0 us per message (median of 24.0, 26.0, 25.0)" in text
    for target in sbs.targets(25.0, results):
        assert f"| {target.name} |" in text
    assert "| dm | us per round trip | 100.00 | 125.00 | 27.00 us per round trip |" in text
    # A figure just under its bound does not print as the bound.
    results["fanout-10x50"] = _reps("memory", {"server_cpu_us_per_delivery": 2.25}) + _reps(
        "redis", {"server_cpu_us_per_delivery": 2.83}
    )
    text = sbs.render(2, [25.0], results, {})
    assert "| Redis fan-out 10x50 / memory | 0.795 | >= 0.8x | **no** |" in text
    # redis-server's CPU is per scenario: on its first row only.
    text = sbs.render(2, [25.0], results, {"match": "400.00 us per match"})
    assert 1 == text.count("400.00 us per match")
