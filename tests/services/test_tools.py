"""Function calling: the tool registry (breaker, timeout, argument checks, metrics) and the manual loop
of ``GeminiService`` with the real google-genai client against the Gemini emulator.

Time is a ``FakeClock``: the tool timeouts run on asyncio's clock only where a tool hangs, and that
tool hangs on an ``asyncio.Event`` that is never set, with a timeout of 0.05 s (no sleep, no race:
nothing else can finish it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.genai import types
from structlog.testing import capture_logs

from resilience.breakers import BreakerBoard
from resilience.clock import FakeClock
from sandbox import functions as emulated
from sandbox.gemini import GeminiEmulator
from services.gemini import ReplyKind
from services.metrics import Metrics
from services.tools import FunctionCall, Safety, Tool, ToolRegistry, check_arguments


async def _now(context: Any, args: dict[str, Any]) -> dict[str, Any]:
    return {"utc": "2026-01-01T00:00:00Z"}


async def _echo(context: Any, args: dict[str, Any]) -> Any:
    return {"said": args["text"]}


async def _hang(context: Any, args: dict[str, Any]) -> Any:
    await asyncio.Event().wait()


async def _boom(context: Any, args: dict[str, Any]) -> Any:
    raise RuntimeError("broken")


ECHO = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def registry(clock: FakeClock, metrics: Metrics | None = None) -> ToolRegistry:
    tools = ToolRegistry(BreakerBoard(clock, fail_max=2, reset_timeout=30.0), clock=clock, metrics=metrics)
    tools.register(Tool("current_time", "The time.", _now))
    tools.register(Tool("echo", "Says text back.", _echo, ECHO))
    tools.register(Tool("hang", "Never answers.", _hang, timeout=0.05))
    tools.register(Tool("boom", "Fails.", _boom))
    return tools


class Caller:
    """A ``FunctionCaller`` over a registry: every tool offered, calls recorded."""

    def __init__(self, tools: ToolRegistry, *, max_rounds: int = 5, seconds: float = 60.0) -> None:
        self.tools = tools
        self.max_rounds = max_rounds
        self.seconds = seconds
        self.calls: list[FunctionCall] = []

    def declarations(self) -> list[types.FunctionDeclarationDict]:
        return [tool.declaration() for tool in self.tools]

    async def call(self, call: FunctionCall) -> dict[str, Any]:
        self.calls.append(call)
        tool = self.tools.get(call.name)
        if tool is None:
            return {"error": f"no function {call.name}"}
        return await self.tools.run(tool, call.args, None)


def function_rounds(emu: GeminiEmulator) -> list[dict[str, Any]]:
    return [r.body for r in emu.requests if r.action in ("generateContent", "streamGenerateContent")]


# -- the registry ------------------------------------------------------------------------------


def test_register_refuses_bad_names_duplicates_and_destructive_tools_that_are_not_admin(fake_clock):
    tools = registry(fake_clock)
    with pytest.raises(ValueError, match="already registered"):
        tools.register(Tool("echo", "again", _echo))
    with pytest.raises(ValueError, match="lower-case"):
        tools.register(Tool("Bad Name", "x", _echo))
    with pytest.raises(ValueError, match="only admin tools"):
        tools.register(Tool("wipe", "x", _echo, safety=Safety.WRITE, destructive=True))
    assert "tool:echo" in [b.name for b in tools._board]


def test_arguments_are_checked_against_the_schema():
    assert check_arguments(ECHO, {}) == "missing argument(s): text"
    assert check_arguments(ECHO, {"text": 3}) == "argument 'text' must be of type string"
    assert check_arguments(ECHO, {"text": "a", "more": 1}) == "unknown argument(s): more"
    count = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}}}
    assert check_arguments(count, {"n": 9}) == "argument 'n' must be from 1 to 5"
    assert check_arguments(count, {"n": 2.0}) is None  # JSON numbers arrive as floats
    assert check_arguments(ECHO, {"text": "ok"}) is None


async def test_a_failing_hanging_or_misused_tool_gives_an_error_result_and_is_counted(fake_clock):
    metrics = Metrics(process_metrics=False)
    tools = registry(fake_clock, metrics)
    hang, boom, echo = tools.get("hang"), tools.get("boom"), tools.get("echo")
    assert hang is not None and boom is not None and echo is not None
    assert await tools.run(hang, {}, None) == {"error": "hang did not answer within 0.05 s"}
    assert await tools.run(boom, {}, None) == {"error": "boom failed (internal)"}
    assert await tools.run(echo, {}, None) == {"error": "echo: missing argument(s): text"}
    assert await tools.run(echo, {"text": "hi"}, None) == {"result": {"said": "hi"}}
    # boom's breaker opens after two failures (fail_max=2): the next call is not made at all
    await tools.run(boom, {}, None)
    assert await tools.run(boom, {}, None) == {"error": "boom is failing and paused; try without it"}
    assert Metrics.total(metrics.tool_calls, tool="hang", outcome="timeout") == 1
    assert Metrics.total(metrics.tool_calls, tool="boom", outcome="open") == 1
    assert Metrics.total(metrics.tool_calls, tool="echo", outcome="invalid") == 1


# -- the loop through GeminiService --------------------------------------------------------------


async def test_three_calls_in_three_rounds_then_one_answer_with_every_result(emu, harness, fake_clock):
    service = await harness.service()
    caller = Caller(registry(fake_clock))
    reply = await service.generate('use tools: current_time, echo{"text": "hi"}, boom', functions=caller)
    assert [c.name for c in caller.calls] == ["current_time", "echo", "boom"]
    assert reply.ok and reply.rounds == 3 and reply.calls == ()
    assert reply.text == (
        "I called 3 function(s):\n"
        '- current_time: {"utc": "2026-01-01T00:00:00Z"}\n'
        '- echo: {"said": "hi"}\n'
        "- boom failed: boom failed (internal)"
    )
    bodies = function_rounds(emu)
    assert len(bodies) == 4
    first = bodies[0]
    declared = [d["name"] for d in first["tools"][-1]["functionDeclarations"]]
    assert declared == ["current_time", "echo", "hang", "boom"]
    echo = first["tools"][-1]["functionDeclarations"][1]
    # google-genai sends this field in snake_case; protobuf's JSON reads either name
    assert echo.get("parametersJsonSchema", echo.get("parameters_json_schema")) == ECHO
    # Every round after the first sends the model's call turn back, then one response part per call.
    last = bodies[-1]["contents"]
    assert [c["role"] for c in last] == ["user", "model", "user", "model", "user", "model", "user"]
    assert last[-1]["parts"] == [{"functionResponse": {"id": "call-3", "name": "boom",
                                                       "response": {"error": "boom failed (internal)"}}}]
    assert emulated.turn_problem(bodies[-1]) is None


async def test_parallel_calls_are_answered_in_one_turn_and_streamed_rounds_work(emu, harness, fake_clock):
    service = await harness.service()
    caller = Caller(registry(fake_clock))

    class Observer:
        silence_seconds = 5.0
        texts: list[str] = []

        def text(self, text: str) -> None:
            self.texts.append(text)

        def interrupted(self) -> None:
            raise AssertionError("a function round is no failure")

    observer = Observer()
    prompt = "use tools together: current_time, hang"
    reply = await service.stream(prompt, observer=observer, functions=caller)
    assert [c.name for c in caller.calls] == ["current_time", "hang"] and reply.rounds == 1
    assert reply.text.endswith("- hang failed: hang did not answer within 0.05 s")
    assert observer.texts[-1] == reply.text
    [_, second] = [r for r in emu.requests if r.action == "streamGenerateContent"]
    assert len(second.body["contents"][-1]["parts"]) == 2


async def test_the_round_cap_holds_and_the_last_round_forbids_calls(emu, harness, fake_clock):
    service = await harness.service()
    caller = Caller(registry(fake_clock), max_rounds=2)
    reply = await service.generate("use tools forever: current_time", functions=caller)
    assert len(caller.calls) == 2 and reply.rounds == 2
    assert reply.text.startswith("I called 2 function(s) (I was asked to stop calling functions)")
    bodies = function_rounds(emu)
    assert len(bodies) == 3
    assert "toolConfig" not in bodies[0]
    assert bodies[-1]["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


async def test_the_time_cap_makes_the_next_round_the_last(emu, harness, fake_clock):
    service = await harness.service()
    caller = Caller(registry(fake_clock), max_rounds=10, seconds=30.0)
    original = caller.call

    async def slow(call: FunctionCall) -> dict[str, Any]:
        fake_clock.advance(20.0)  # each call takes 20 s of the loop's 30
        return await original(call)

    caller.call = slow  # type: ignore[method-assign]
    reply = await service.generate("use tools forever: current_time", functions=caller)
    assert len(caller.calls) == 2 and reply.kind is ReplyKind.ANSWER
    assert function_rounds(emu)[-1]["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


async def test_without_declarations_there_is_no_loop(emu, harness, fake_clock):
    service = await harness.service()
    caller = Caller(ToolRegistry(BreakerBoard(fake_clock), clock=fake_clock))
    reply = await service.generate("use tools: current_time", functions=caller)
    assert reply.ok and reply.rounds == 0 and "tools" not in function_rounds(emu)[0]


def test_the_emulator_refuses_a_call_turn_without_its_responses():
    body = {
        "contents": [
            {"role": "user", "parts": [{"text": "use tools: a"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "a", "args": {}}},
                                        {"functionCall": {"name": "b", "args": {}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "a", "response": {}}}]},
        ]
    }
    assert emulated.turn_problem(body) == emulated.COUNT_MISMATCH
    body["contents"][2]["parts"].append({"functionResponse": {"name": "c", "response": {}}})
    assert "does not match the call 'b'" in (emulated.turn_problem(body) or "")


async def test_calls_are_logged_without_their_arguments_or_results(fake_clock):
    tools = registry(fake_clock)
    echo = tools.get("echo")
    assert echo is not None
    with capture_logs() as logs:
        await tools.run(echo, {"text": "a secret the user wrote"}, None)
    assert [line["event"] for line in logs] == ["tool.call"]
    assert "secret" not in repr(logs) and logs[0]["tool"] == "echo" and logs[0]["outcome"] == "ok"
