"""The shards of each process in ``/status`` (from its heartbeat row)."""

from __future__ import annotations

from bot.operations import ProcessRow, describe_processes


def test_status_names_each_process_s_shards_and_those_not_connected() -> None:
    """``/status``'s process lines start with the shards the heartbeat recorded."""
    def row(name: str, shards: dict[str, object] | None) -> ProcessRow:
        return ProcessRow(id=1, name=name, alive=True, this=False, started_at=0.0, beat_age=2.0,
                          stopped_at=None, state={"mode": "normal", "discord": True, "shards": shards})

    text = describe_processes([
        row("a:1", {"count": 3, "ids": [0], "open": [0]}),
        row("b:2", {"count": 4, "ids": [1, 3], "open": [1]}),
        row("c:3", None),
    ], heartbeat=5.0)
    assert text.splitlines() == [
        "a:1: shard 0 of 3; normal; heartbeat 2 s ago",
        "b:2: shards 1, 3 of 4 (3 not connected); normal; heartbeat 2 s ago",
        "c:3: normal; heartbeat 2 s ago",
    ]
