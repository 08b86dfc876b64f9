"""``python -m rehearsal simulate``: a real short run keeps the promise under injected faults, the CLI
validates its options, and the score punishes anything lost or duplicated."""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rehearsal.cli import build_parser
from rehearsal.ledger import Ledger
from rehearsal.simulate import (
    DEFAULT_MIX,
    InjectedFaults,
    Progress,
    SimulationOptions,
    format_report,
    install_gemini_mix,
    parse_mix,
    resilience_score,
    simulate,
)
from sandbox.discord_emu import DiscordEmulator
from sandbox.faults import FaultPlan

REPO_ROOT = Path(__file__).resolve().parents[2]

REPORT_FIELDS = {
    "accepted", "answered_direct", "answered_after_queue", "told_why", "told_why_kinds", "lost",
    "duplicated", "out_of_order_channels", "latency_ms", "breaker_transitions", "retries",
    "heal_to_empty_queue_seconds", "faults_injected", "messages_per_second", "score", "score_definition",
    "passed", "failed_because", "settings", "data_dir", "bot_logs", "wall_seconds", "bot_exit_code",
    "cpu_seconds", "gemini_faulted_share_of_attempts",
}


@pytest.mark.timeout(60)
async def test_a_short_run_under_heavy_faults_loses_nothing_answers_nothing_twice_and_reports_every_figure(
    tmp_path: Path,
) -> None:
    """100 messages, 30 % of Gemini calls failing (the default mix), 10 % of Discord sends failing
    and a 2 s total outage (which lasts until it has opened the breaker): every message is answered or
    told why, once; the faults the emulators injected are the failures the bot counted; the
    report has every field."""
    options = SimulationOptions(
        users=10, channels=10, messages=100, rate=60.0, gemini_error_rate=0.3, discord_error_rate=0.1,
        outage=2.0, long_429_share=0.0, data_dir=tmp_path / "sim", settle_timeout=30.0,
        breaker_reset_seconds=1.0,
    )
    report = await simulate(options)

    assert REPORT_FIELDS <= report.keys()
    assert report["lost"] == 0, report["lost_examples"]
    assert report["duplicated"] == 0
    assert report["accepted"] == 100
    settled = report["answered_direct"] + report["answered_after_queue"] + report["told_why"]
    assert settled == 100
    assert report["answered_after_queue"] > 0  # the outage really queued messages

    injected = report["faults_injected"]
    assert injected["gemini"]["outage 503"] > 0 and injected["discord"]["send 503"] > 0
    assert sum(n for kind, n in injected["gemini"].items() if kind != "outage 503") > 0
    # What the emulator injected is exactly what the bot saw, status by status.
    seen_by_bot = report["retries"]["gemini_attempts_by_code"]
    assert seen_by_bot.get("503", 0) == injected["gemini"].get("503", 0) + injected["gemini"]["outage 503"]
    assert seen_by_bot.get("500", 0) == injected["gemini"].get("500", 0)
    assert seen_by_bot.get("429", 0) == injected["gemini"].get("429 (1 s hint)", 0)
    assert seen_by_bot.get("none", 0) == injected["gemini"].get("timeout", 0)

    assert report["breaker_transitions"]["gemini"]["closed->open"] >= 1
    assert report["retries"]["spent"] > 0
    assert report["heal_to_empty_queue_seconds"]["mean"] is not None
    assert report["latency_ms"]["direct_answer"]["p50"] > 0
    assert report["score"] == resilience_score(**report["score_inputs"]) > 0
    # Under three times the default fault rate the score may fall below the bar: the verdict says so.
    assert report["passed"] == (report["score"] >= 85) and report["passed"] == (not report["failed_because"])
    assert report["bot_exit_code"] == 0  # stopped with SIGTERM, shut down cleanly
    assert Path(report["bot_logs"]["stdout"]).parent == (tmp_path / "sim").resolve()

    json.dumps(report)  # --json prints exactly this
    table = format_report(report)
    for row in ("LOST", "DUPLICATED", "answered after queueing", "breaker transitions",
                "heal -> empty queue", "RESILIENCE SCORE", report["bot_logs"]["stderr"]):
        assert row in table


def test_simulate_help_lists_every_option() -> None:
    """``python -m rehearsal simulate --help`` works (a real process) and documents the options."""
    result = subprocess.run(
        [sys.executable, "-m", "rehearsal", "simulate", "--help"],
        cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--users", "--channels", "--messages", "--duration", "--rate", "--gemini-error-rate",
                   "--gemini-mix", "--discord-error-rate", "--outage", "--seed", "--json", "--no-progress"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("mix", "problem"),
    [("timeout=40,bogus=5", "unknown fault kind 'bogus'"), ("timeout=0,503=0", "no positive weight"),
     ("timeout", "is not KIND=WEIGHT"), ("503=lots", "not a number"), ("503=-1", ">= 0")],
)
def test_a_bad_gemini_mix_is_a_usage_error_that_names_the_problem(
    mix: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mix that does not parse or sums to 0 exits with code 2 and says what is wrong."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["simulate", "--gemini-mix", mix])
    assert exit_info.value.code == 2
    assert problem in capsys.readouterr().err


def test_bad_numbers_and_both_amounts_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--users", "0"], ["--rate", "0"], ["--gemini-error-rate", "1.5"],
                 ["--messages", "10", "--duration", "5"], ["--outage", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["simulate", *argv])
        assert exit_info.value.code == 2, argv
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_default_mix_is_the_issue_s_and_timeout_means_a_hang() -> None:
    assert parse_mix(DEFAULT_MIX) == {"hang": 40.0, "503": 30.0, "429": 20.0, "500": 10.0}
    args = build_parser().parse_args(["simulate"])
    assert args.gemini_mix == parse_mix(DEFAULT_MIX) and args.gemini_error_rate == 0.10


def test_the_mix_gives_each_kind_its_share_of_all_calls_although_the_first_matching_fault_wins() -> None:
    """Conditional probabilities: 10 % of 40,000 draws fail, split 40/30/20/10."""
    plan = FaultPlan(rng=random.Random(7))
    injected = InjectedFaults()
    install_gemini_mix(plan, 0.10, parse_mix(DEFAULT_MIX), injected, long_429_share=0.1)
    calls = 40_000
    for _ in range(calls):
        plan.pick("gemini-2.5-flash")
    counts = injected.counts()["gemini"]
    failed = sum(counts.values())
    assert abs(failed / calls - 0.10) < 0.01
    assert abs(counts["timeout"] / failed - 0.4) < 0.03
    assert abs(counts["503"] / failed - 0.3) < 0.03
    assert abs((counts["429 (1 s hint)"] + counts["429 (30 s hint)"]) / failed - 0.2) < 0.03
    assert abs(counts["429 (30 s hint)"] / failed - 0.02) < 0.01
    assert abs(counts["500"] / failed - 0.1) < 0.02


def test_an_error_rate_of_one_fails_every_call() -> None:
    plan = FaultPlan(rng=random.Random(1))
    install_gemini_mix(plan, 1.0, {"503": 1.0, "500": 1.0}, InjectedFaults())
    assert all(plan.pick("m") is not None for _ in range(200))


SCORE_BASE = {"accepted": 100, "answered": 100, "lost": 0, "duplicated": 0, "acks": 10, "acks_in_time": 10,
              "direct_in_time": 100}


def test_the_score_is_100_when_everything_was_answered_promptly() -> None:
    assert resilience_score(**SCORE_BASE) == 100.0


@pytest.mark.parametrize("broken", [{"lost": 1, "answered": 99}, {"duplicated": 1}])
def test_the_score_is_zero_when_anything_was_lost_or_answered_twice(broken: dict[str, int]) -> None:
    assert resilience_score(**(SCORE_BASE | broken)) == 0.0


def test_the_score_weighs_answers_acks_within_1_s_and_direct_answers_within_5_s() -> None:
    # 90 answered, 10 told why; half the acks late; 80 answered directly within 5 s.
    score = resilience_score(**(SCORE_BASE | {"answered": 90, "acks_in_time": 5, "direct_in_time": 80}))
    assert score == round(100 * (0.6 * 0.9 + 0.2 * 0.5 + 0.2 * 0.8), 1) == 80.0
    assert resilience_score(**(SCORE_BASE | {"acks": 0, "acks_in_time": 0})) == 100.0  # nothing queued
    assert resilience_score(**(SCORE_BASE | {"accepted": 0, "answered": 0, "direct_in_time": 0})) == 0.0
    # Everything answered, but all of it after queueing: the promise is kept, the service is not good.
    assert resilience_score(**(SCORE_BASE | {"acks": 100, "acks_in_time": 100, "direct_in_time": 0})) == 80.0


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.timeout(60)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize(("sig", "when"), [(signal.SIGINT, "traffic"), (signal.SIGTERM, "start-up")],
                         ids=["ctrl-c-mid-traffic", "sigterm-during-start-up"])
def test_ctrl_c_or_sigterm_stops_the_bot_child(sig: signal.Signals, when: str, tmp_path: Path) -> None:
    """Interrupted mid-traffic or while the bot starts, ``simulate`` stops its bot child before
    exiting (exit code 130): no orphan is left running."""
    data = tmp_path / "sim"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rehearsal", "simulate", "--messages", "100000", "--rate", "20",
         "--no-progress", "--data-dir", str(data)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        if when == "traffic":
            while '"event": "bot.ready"' not in _read(data / "bot.stderr.log"):
                assert proc.poll() is None and time.monotonic() < deadline, "the bot child never got ready"
                time.sleep(0.05)
            time.sleep(0.5)
        while not (children := _children(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "no bot child was started"
            time.sleep(0.02)
        assert len(children) == 1
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted; the bot was stopped" in err
        # Reaped by simulate, so gone; an orphan would still be listed (under init).
        assert not Path(f"/proc/{children[0]}").exists()
        if when == "traffic":  # a started bot is stopped gracefully, with SIGTERM
            assert '"event": "bot.signal"' in _read(data / "bot.stderr.log")
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def test_the_progress_line_rewrites_itself_on_stderr_and_stays_silent_when_disabled() -> None:
    """One line updated in place with ``\\r`` (a newline only at the end); nothing when disabled."""
    async with DiscordEmulator() as discord:
        ledger = Ledger(discord)
        await ledger.ask(discord.channels["general"], "normal", "hello")
        out = io.StringIO()
        progress = Progress(ledger, 10, out, enabled=True)
        progress.show()
        progress.show()
        assert out.getvalue().count("\r") == 2 and "\n" not in out.getvalue()
        assert "[..........] 1/10 sent 0 settled 0 queued 1 waiting" in out.getvalue()
        progress.finish()
        assert out.getvalue().endswith("\n")
        quiet = io.StringIO()
        silent = Progress(ledger, 10, quiet, enabled=False)
        silent.show()
        silent.finish()
        assert quiet.getvalue() == ""
