"""`GET /metrics` after a few real operations, parsed with the Prometheus client's own text parser:
the counters and histograms moved, the gauges say what exists."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon


@pytest.fixture
def spare_daemon() -> Iterator[Daemon]:
    """A daemon of its own that keeps one warm spare per snapshot, so a resume can hit one."""
    d = Daemon(warm_spares=1)
    try:
        yield d
    finally:
        d.stop()


def scrape(d: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, headers, body = d.get("/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_move_after_operations(spare_daemon: Daemon) -> None:
    daemon = spare_daemon
    before = scrape(daemon)
    assert value(before, "kiln_capacity_sandboxes", kind="limit") > 0
    assert value(before, "kiln_capacity_memory_mib", kind="limit") > 0
    sb = json.loads(daemon.kiln("--json", "sandbox", "create", "--name", "metrics-box", "--memory", "256"))
    daemon.kiln("exec", "metrics-box", "--", "true")
    daemon.kiln("--json", "snapshot", "create", "metrics-box", "--name", "metrics-snap")
    after = scrape(daemon)

    created = ("kiln_operations_total", {"kind": "sandbox.create", "outcome": "succeeded"})
    assert value(after, created[0], **created[1]) == value(before, created[0], **created[1]) + 1
    snap = {"kind": "snapshot.create", "outcome": "succeeded"}
    assert value(after, "kiln_operations_total", **snap) == value(before, "kiln_operations_total", **snap) + 1
    for kind in ("sandbox.create", "snapshot.create"):
        labels = {"kind": kind, "outcome": "succeeded"}
        assert value(after, "kiln_operation_duration_seconds_count", **labels) >= 1
        assert value(after, "kiln_operation_duration_seconds_sum", **labels) > 0
        assert value(after, "kiln_operation_duration_seconds_bucket", le="+Inf", **labels) >= 1
    assert value(after, "kiln_exec_start_duration_seconds_count", outcome="succeeded") >= 1 + value(
        before, "kiln_exec_start_duration_seconds_count", outcome="succeeded")
    # Relative to before: another test may have left things behind in this daemon.
    assert value(after, "kiln_sandboxes", state="running") == value(before, "kiln_sandboxes", state="running") + 1
    assert value(after, "kiln_snapshots") == value(before, "kiln_snapshots") + 1
    assert value(after, "kiln_snapshot_bytes") > value(before, "kiln_snapshot_bytes")
    assert value(after, "kiln_capacity_sandboxes", kind="used") >= 1
    assert value(after, "kiln_capacity_memory_mib", kind="used") >= sb["memory_mib"]
    assert value(after, "kiln_events_last_seq") > value(before, "kiln_events_last_seq")
    # Warm spares: the first resume finds none (a miss) and asks for one; once it is ready, the next resume
    # is served by it (a hit).
    daemon.kiln("--json", "snapshot", "resume", "metrics-snap", "--name", "metrics-copy1")
    missed = scrape(daemon)
    assert value(missed, "kiln_warm_spare_misses_total") == value(after, "kiln_warm_spare_misses_total") + 1
    deadline = time.monotonic() + 240
    while value(scrape(daemon), "kiln_warm_spares_ready") < 1:
        assert time.monotonic() < deadline, f"no warm spare became ready:\n{daemon.log_tail()}"
        time.sleep(1)
    daemon.kiln("--json", "snapshot", "resume", "metrics-snap", "--name", "metrics-copy2")
    hit = scrape(daemon)
    assert value(hit, "kiln_warm_spare_hits_total") == value(after, "kiln_warm_spare_hits_total") + 1
    assert value(hit, "kiln_warm_spare_misses_total") == value(missed, "kiln_warm_spare_misses_total")
    resumed = {"kind": "snapshot.resume", "outcome": "succeeded"}
    assert value(hit, "kiln_operation_duration_seconds_count", **resumed) == 2
    daemon.kiln("sandbox", "delete", "-y", "metrics-copy1", "metrics-copy2")

    # Over TCP /metrics needs the API token like every other route.
    status, _ = daemon.get_tcp("/metrics", None)
    assert status == 401
    status, body = daemon.get_tcp("/metrics", daemon.token)
    assert status == 200 and b"kiln_sandboxes" in body

    daemon.kiln("sandbox", "delete", "-y", "metrics-box")
    daemon.kiln("snapshot", "delete", "-y", "metrics-snap")
    final = scrape(daemon)
    assert value(final, "kiln_sandboxes", state="running") == value(before, "kiln_sandboxes", state="running")
    assert value(final, "kiln_snapshots") == value(before, "kiln_snapshots")
    deleted = {"kind": "sandbox.delete", "outcome": "succeeded"}
    assert value(final, "kiln_operations_total", **deleted) == value(after, "kiln_operations_total", **deleted) + 3
