"""Unit tests for the HTTP API's pure parts: latency window, histogram percentiles, path hiding.

The routes themselves are tested against a real application in tests/integration/test_http_api.py.
"""

from __future__ import annotations

import pytest

from services.http_api import LatencyWindow, _histogram_percentiles, _without_paths
from services.metrics import Metrics


def test_an_empty_window_has_no_percentiles() -> None:
    assert LatencyWindow().percentiles() == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}


def test_window_percentiles_are_nearest_rank_over_the_kept_samples() -> None:
    window = LatencyWindow(maxlen=10)
    for seconds in (5.0, 1.0, 3.0, 2.0, 4.0):  # order of arrival does not matter
        window.observe(seconds)
    assert window.percentiles() == {"count": 5, "p50": 3.0, "p95": 5.0, "p99": 5.0, "max": 5.0}


def test_the_window_keeps_only_the_latest_samples() -> None:
    window = LatencyWindow(maxlen=3)
    for seconds in (100.0, 100.0, 1.0, 2.0, 3.0):
        window.observe(seconds)
    assert len(window) == 3
    assert window.percentiles()["max"] == 3.0  # the old slow samples fell out


def test_histogram_estimate_interpolates_inside_the_bucket_holding_the_rank() -> None:
    metrics = Metrics(process_metrics=False)
    for _ in range(100):
        metrics.message_latency.labels("answered").observe(0.3)  # all in the (0.25, 0.5] bucket
    estimate = _histogram_percentiles(metrics.message_latency)
    assert estimate["count"] == 100
    assert estimate["p50"] == pytest.approx(0.375)  # halfway through the bucket
    assert estimate["p99"] == pytest.approx(0.4975)
    assert estimate["max"] is None


def test_histogram_estimate_sums_every_label_and_caps_at_the_last_finite_bucket() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.message_latency.labels("answered").observe(0.005)
    metrics.message_latency.labels("queued").observe(500.0)  # beyond the 60 s bucket
    estimate = _histogram_percentiles(metrics.message_latency)
    assert estimate["count"] == 2
    assert estimate["p50"] == pytest.approx(0.01)
    assert estimate["p99"] == 60.0  # all a histogram can say: at least the last bound


def test_histogram_estimate_of_an_empty_histogram_is_empty() -> None:
    estimate = _histogram_percentiles(Metrics(process_metrics=False).gemini_latency)
    assert estimate == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}


def test_without_paths_keeps_only_the_names_of_absolute_paths_anywhere_in_a_body() -> None:
    body = {
        "path": "/var/lib/gemini-bot/bot.sqlite3",
        "last_error": "cannot open '/var/lib/gemini-bot/guilds.json': denied (at /srv/x/backups/)",
        "nested": [{"quarantined": "/var/lib/gemini-bot/quarantine/guilds.json.1"}, 5, None, True],
        "/keys/are/kept": "as they are",
    }
    assert _without_paths(body) == {
        "path": "bot.sqlite3",
        "last_error": "cannot open 'guilds.json': denied (at backups)",
        "nested": [{"quarantined": "guilds.json.1"}, 5, None, True],
        "/keys/are/kept": "as they are",
    }


def test_without_paths_leaves_urls_relative_paths_keys_and_fractions_alone() -> None:
    kept = [
        "http://127.0.0.1:3000/api/health/status",
        "data/bot.sqlite3",
        "thread:5/a",
        "3/4 done",
        "~/bot/.env",
        "no path here",
    ]
    assert _without_paths(kept) == kept
