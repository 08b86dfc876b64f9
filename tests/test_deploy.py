"""The deployment files agree with the code they deploy.

The Grafana dashboard queries only metrics (and labels) that ``services.metrics.Metrics``
exports and charts every one of them; the Dockerfile builds a non-root image with a data
volume whose health check really probes ``/live``; the systemd unit restarts on failure,
waits longer than the bot's shutdown grace and passes ``systemd-analyze verify`` when that
tool exists. Docker itself is not run (no engine in CI).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bot.alerts import RULE_NAMES
from services.config import Config, load_config
from services.http_api import DEFAULT_MAX_CONNECTIONS
from services.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UNIT = ROOT / "deploy" / "gemini-bot.service"
DEPLOY_README = ROOT / "deploy" / "README.md"

# Labels Prometheus attaches when scraping, and the histogram bucket label.
SCRAPE_LABELS = frozenset({"instance", "job", "le"})
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


# --- helpers ---------------------------------------------------------------------------------


def exported_metrics() -> dict[str, set[str]]:
    """Every sample name ``Metrics().render()`` can expose, mapped to the label names it carries.

    Each labelled family gets one child first, so its samples (and label names) appear; a
    family still without samples contributes its type's names with no known labels.
    """
    metrics = Metrics()
    metrics.observe_message("answered", 0.1)
    metrics.observe_gemini("answer", 0.2, 200)
    metrics.observe_tokens("gemini-2.5-flash", prompt=3, output=4)
    metrics.breaker_listener("gemini", "closed", "open")
    metrics.retries.labels("gemini", "retried").inc()
    metrics.retry_budget_tokens.labels("gemini").set(5)
    metrics.http_requests.labels("/live", "200").inc()
    metrics.set_commands(["ask"])
    metrics.supervised_task_disabled.labels("drain").set(0)
    metrics.alerts_firing.labels("breaker_open").set(0)
    metrics.incidents.labels("gemini").inc()
    metrics.incident_mttr.labels("gemini").set(1)
    metrics.observe_tool("current_time", "ok", 0.01)
    text = metrics.render()[0].decode()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def bot_families() -> set[str]:
    """The bot's own metric families as queried (counters with ``_total``), without ``_created``."""
    text = Metrics().render()[0].decode()
    out = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("bot_") and not family.name.endswith("_created"):
            out.add(family.name + ("_total" if family.type == "counter" else ""))
    return out


def promql_parts(expr: str) -> tuple[set[str], set[str]]:
    """``(metric names, label names)`` referenced by a PromQL expression.

    Good enough for the dashboard's expressions: label names come from matchers and from
    ``by``/``without``/``on``/``ignoring`` clauses; what is left that is neither a function
    call nor a keyword is a metric name.
    """
    labels: set[str] = set()
    for block in re.findall(r"\{([^}]*)\}", expr):
        labels.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", block))
    rest = re.sub(r"\{[^}]*\}", " ", expr)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", rest):
        labels.update(name.strip() for name in clause.split(",") if name.strip())
    rest = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
    rest = re.sub(r"\$\w+", " ", rest)
    metrics = {
        m.group(1)
        for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*+)(?!\s*\()", rest)
        if m.group(1).lower() not in PROMQL_KEYWORDS
    }
    return metrics, labels


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every query in the dashboard, variables included."""
    board = dashboard()
    out = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            # Grafana's label_values(metric, label) is not PromQL; this is its PromQL equivalent.
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            assert found, f"variable {var['name']}: unexpected query {var['definition']!r}"
            out.append((f"variable {var['name']}", f"count by ({found.group(2)}) ({found.group(1)})"))
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1]:]


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """The unit file as ``{section: {key: [values in order]}}``."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        assert section is not None, f"setting outside a section: {line}"
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def runner_exit_codes() -> dict[str, int]:
    """The ``EXIT_*`` constants of bot/runner.py, read without importing discord.py (a second)."""
    tree = ast.parse((ROOT / "bot" / "runner.py").read_text())
    codes = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for name in node.targets:
                if isinstance(name, ast.Name) and name.id.startswith("EXIT_"):
                    codes[name.id] = node.value.value
    return codes


def seconds(value: str) -> float:
    """A systemd time span like ``30``, ``30s``, ``1min`` or ``1min 30s`` in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


# --- Grafana dashboard -----------------------------------------------------------------------


def test_promql_parts_finds_metrics_and_labels_and_skips_functions() -> None:
    """The extractor the dashboard checks rely on separates metrics, labels and functions."""
    metrics, labels = promql_parts(
        'histogram_quantile(0.95, sum by (le, kind) (rate(a_bucket{instance=~"$instance", '
        'state!="done"}[$__rate_interval]))) / on (job) b_total or vector(0)'
    )
    assert metrics == {"a_bucket", "b_total"}
    assert labels == {"le", "kind", "instance", "state", "job"}


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable() -> None:
    """The JSON parses, has a current schema, and every query goes through the ${datasource} variable."""
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["description"].strip(), f"panel {panel['title']!r} has no description"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert '$instance' in target["expr"], f"{panel['title']!r} ignores the instance variable"


def test_dashboard_panels_do_not_overlap() -> None:
    """No two panels share a grid cell (Grafana would shuffle them on load)."""
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    """Each metric name in a PromQL expression is a sample name Metrics().render() exposes."""
    exported = exported_metrics()
    for title, expr in dashboard_exprs():
        metrics, _ = promql_parts(expr)
        assert metrics, f"{title!r}: no metric found in {expr!r}"
        unknown = metrics - exported.keys()
        assert not unknown, f"{title!r} queries {sorted(unknown)}, which services/metrics.py does not export"


def test_every_label_the_dashboard_queries_exists_on_its_metrics() -> None:
    """Labels in matchers and by-clauses belong to the metrics of the same expression."""
    exported = exported_metrics()
    for title, expr in dashboard_exprs():
        metrics, labels = promql_parts(expr)
        known: set[str] = set()
        for name in metrics:
            known |= exported.get(name, set())
        unknown = labels - known - SCRAPE_LABELS
        assert not unknown, f"{title!r} uses labels {sorted(unknown)} that {sorted(metrics)} do not have"


def test_dashboard_charts_every_bot_metric() -> None:
    """Each of the bot's metric families appears in some panel (a new metric needs a panel)."""
    queried: set[str] = set()
    for _, expr in dashboard_exprs():
        queried |= promql_parts(expr)[0]
    for family in sorted(bot_families()):
        if family.endswith("_total") or family in queried:
            assert family in queried, f"{family} is exported but not on the dashboard"
        else:  # a histogram is charted through its buckets
            assert {family, family + "_bucket"} & queried, f"{family} is exported but not on the dashboard"


def test_deploy_readme_documents_every_bot_metric() -> None:
    """deploy/README.md names each of the bot's metric families (the metrics reference)."""
    text = DEPLOY_README.read_text()
    missing = [family for family in sorted(bot_families()) if f"`{family}" not in text]
    assert not missing, f"deploy/README.md does not document {missing}"


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_runs_the_bot_as_non_root_with_a_data_volume() -> None:
    """Final stage: python:3.11-slim, a non-root USER, VOLUME = DATA_DIR, the run command."""
    stage = final_stage(dockerfile_instructions())
    assert stage[0] == ("FROM", "python:3.11-slim")
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    volumes = [args.strip('[]"') for keyword, args in stage if keyword == "VOLUME"]
    env = " ".join(args for keyword, args in stage if keyword == "ENV")
    data_dir = re.search(r"\bDATA_DIR=(\S+)", env)
    assert data_dir, "DATA_DIR is not set in the image"
    assert volumes == [data_dir.group(1)], "the volume must be the data directory"
    cmd = [args for keyword, args in stage if keyword == "CMD"]
    assert json.loads(cmd[-1]) == ["python", "-m", "bot", "run"]
    assert ("EXPOSE", str(Config().http_port)) in stage
    assert not any(keyword == "ENTRYPOINT" for keyword, _ in stage), "CMD must stay replaceable"


def test_dockerfile_keeps_the_http_api_on_loopback_by_default() -> None:
    """HTTP_HOST in the image is a loopback address: the health check needs no published port."""
    env = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "ENV")
    host = re.search(r"\bHTTP_HOST=(\S+)", env)
    assert host and host.group(1) == "127.0.0.1"


def test_docker_build_context_holds_the_package_and_nothing_secret() -> None:
    """COPY takes every package pyproject installs plus its readme; .dockerignore lets exactly those in."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied: set[str] = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            copied.update(part.rstrip("/") for part in args.split()[:-1])
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore must be an allow-list (secrets and data stay out)"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == copied, f".dockerignore allows {sorted(allowed)}, COPY takes {sorted(copied)}"
    assert not allowed & {".env", "data", ".git", ".venv"}


def healthcheck_command() -> list[str]:
    for keyword, args in dockerfile_instructions():
        if keyword == "HEALTHCHECK":
            command = args[args.index("CMD") + len("CMD"):].strip()
            return list(json.loads(command))
    raise AssertionError("no HEALTHCHECK")


async def run_healthcheck(status: int) -> tuple[int, list[str]]:
    """Run the Dockerfile's health check command against a loopback server answering ``status``."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"ok": status == 200}, status=status)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        command = healthcheck_command()
        assert command[0] == "python"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *command[1:], env={"HTTP_PORT": str(port)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        code = await asyncio.wait_for(proc.wait(), timeout=10)
    finally:
        await runner.cleanup()
    return code, seen


async def test_healthcheck_is_healthy_when_live_answers_200() -> None:
    """The HEALTHCHECK command exits 0 after a GET /live on 127.0.0.1:$HTTP_PORT that answers 200."""
    code, seen = await run_healthcheck(200)
    assert (code, seen) == (0, ["/live"])


async def test_healthcheck_is_unhealthy_when_live_answers_503() -> None:
    """The HEALTHCHECK command exits 1 (Docker's 'unhealthy') when /live answers an error status."""
    code, seen = await run_healthcheck(503)
    assert (code, seen) == (1, ["/live"])


def test_healthcheck_options_are_bounded() -> None:
    """The check times out before Docker's own timeout and gives start-up a grace period."""
    args = next(args for keyword, args in dockerfile_instructions() if keyword == "HEALTHCHECK")
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", args.split("CMD")[0]))
    assert {"interval", "timeout", "start-period", "retries"} <= options.keys()
    inner = re.search(r"timeout=(\d+)\)", args)
    assert inner and float(inner.group(1)) < seconds(options["timeout"])


# --- systemd unit ----------------------------------------------------------------------------


def test_unit_restarts_on_failure_and_runs_the_bot_as_a_dedicated_user() -> None:
    """Restart=on-failure with a delay and a start limit, ExecStart `-m bot run`, a non-root User."""
    unit = unit_settings()
    service = unit["Service"]
    assert service["Restart"] == ["on-failure"]
    assert seconds(service["RestartSec"][-1]) > 0
    assert {"StartLimitIntervalSec", "StartLimitBurst"} <= unit["Unit"].keys()
    assert service["ExecStart"][-1].endswith(" -m bot run")
    assert service["User"][-1] not in ("root", "0")
    assert service["EnvironmentFile"] and service["WorkingDirectory"]


def test_unit_does_not_restart_on_a_rejected_token() -> None:
    """The exit code for a rejected token (a person must fix it) is the one restart is prevented on."""
    codes = runner_exit_codes()
    prevented = {int(code) for value in unit_settings()["Service"]["RestartPreventExitStatus"]
                 for code in value.split()}
    assert codes["EXIT_AUTH"] in prevented
    # EXIT_CONFIG (1) is also what an uncaught exception exits with: a crash must restart.
    assert codes["EXIT_CONFIG"] not in prevented


def test_unit_stop_timeout_exceeds_the_shutdown_grace() -> None:
    """SIGTERM first, and systemd waits longer than SHUTDOWN_GRACE_SECONDS before SIGKILL."""
    service = unit_settings()["Service"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert seconds(service["TimeoutStopSec"][-1]) > Config().shutdown_grace_seconds


def test_unit_is_hardened_and_may_write_only_its_data_dir() -> None:
    """NoNewPrivileges, ProtectSystem=strict with ReadWritePaths = DATA_DIR, PrivateTmp."""
    service = unit_settings()["Service"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["PrivateTmp"] == ["yes"]
    env = " ".join(service["Environment"])
    data_dir = re.search(r"\bDATA_DIR=(\S+)", env)
    assert data_dir, "the unit does not set DATA_DIR"
    assert service["ReadWritePaths"] == [data_dir.group(1)]


def test_unit_sets_a_file_descriptor_limit_with_room_for_the_http_api_cap() -> None:
    """LimitNOFILE is one number (soft = hard), at least systemd's default soft limit and far
    above the HTTP API's connection cap, so a flood of connections cannot starve the bot's files."""
    [value] = unit_settings()["Service"]["LimitNOFILE"]
    assert value.isdigit(), f"LimitNOFILE={value} is not one number"
    assert int(value) >= max(1024, 16 * DEFAULT_MAX_CONNECTIONS)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit with no warnings (ExecStart pointed at this Python)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.MULTILINE)
    assert exec_start
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(exec_start.group(1), sys.executable))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=20)
    complaints = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not complaints, result.stderr


# --- Prometheus alerting rules ---------------------------------------------------------------

ALERT_RULES = ROOT / "deploy" / "alerts.yml"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
# Each of the bot's own alert rules (bot/alerts.py RULE_NAMES) and its Prometheus twin.
PROMETHEUS_TWINS = {
    "breaker_open": "BotBreakerOpen",
    "queue_age": "BotQueueBacklog",
    "dead_letters": "BotDeadLetters",
    "datastore_defaults": "BotDataStoreDefaults",
    "task_disabled": "BotSupervisedTaskDisabled",
    "storage_errors": "BotStorageErrors",
    "memory": "BotMemoryHigh",
    "error_rate": "BotErrorRateHigh",
}


def _deeper(line: str, indent: int) -> bool:
    """A blank line, or one indented more than ``indent``: part of a folded block."""
    return not line.strip() or len(line) - len(line.lstrip()) > indent


def alert_rules() -> list[dict[str, str]]:
    """The rules of deploy/alerts.yml as ``{alert, expr, for, ...}``.

    PyYAML is not a dependency: the file keeps to a plain layout (a list of mappings under
    ``rules:``, scalars on one line or a ``>-`` folded block) that this reads; promtool, where it
    is installed, checks the real YAML and PromQL.
    """
    rules: list[dict[str, str]] = []
    lines = ALERT_RULES.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        found = re.match(r"^(\s*)(- )?([a-z_]+):\s*(.*)$", line)
        assert found, f"deploy/alerts.yml: unexpected line {line!r}"
        indent, item, key, value = len(found.group(1)), found.group(2), found.group(3), found.group(4)
        if item and key == "alert":
            rules.append({})
        if value in (">-", ">", "|"):
            block = []
            while i < len(lines) and _deeper(lines[i], indent):
                block.append(lines[i].strip())
                i += 1
            value = " ".join(part for part in block if part)
        if rules and key in ("alert", "expr", "for", "severity", "summary", "description"):
            rules[-1][key] = value.strip().strip('"')
    return rules


def test_alert_rules_cover_every_rule_the_bot_evaluates_and_nothing_else() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert set(PROMETHEUS_TWINS) == set(RULE_NAMES)
    assert set(PROMETHEUS_TWINS.values()) <= set(names)
    for rule in alert_rules():
        assert rule.get("expr") and rule.get("severity") and rule.get("summary"), rule


def test_alert_rules_query_only_metrics_and_labels_the_bot_exports() -> None:
    exported = exported_metrics()
    for rule in alert_rules():
        metrics, labels = promql_parts(rule["expr"])
        assert metrics, rule
        for metric in metrics:
            assert metric in exported, f"{rule['alert']}: {metric} is not exported"
        allowed = set().union(*(exported[m] for m in metrics)) | SCRAPE_LABELS
        assert labels <= allowed, f"{rule['alert']}: labels {labels - allowed} do not exist"


def test_every_alert_has_a_runbook_entry() -> None:
    text = RUNBOOK.read_text()
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in text, f"docs/RUNBOOK.md does not explain {rule['alert']}"


def test_alert_rules_pass_promtool_where_it_is_installed() -> None:
    """``promtool`` comes with Debian's ``prometheus`` package; ``PROMTOOL`` may name it."""
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus); the rules were parsed above")
    done = subprocess.run([promtool, "check", "rules", str(ALERT_RULES)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


# --- deploy/compose.shards.yml: PostgreSQL and one process per shard -----------------------------

COMPOSE = ROOT / "deploy" / "compose.shards.yml"


def read_plain_yaml(text: str) -> Any:
    """The compose file's plain layout (PyYAML is not a dependency): nested mappings by indent,
    block lists (``- item``) of scalars, quoted or bare scalars, ``#`` comments."""
    lines = [
        (len(raw) - len(raw.lstrip()), raw.strip())
        for raw in text.splitlines()
        if raw.strip() and not raw.strip().startswith("#")
    ]

    def scalar(value: str) -> str:
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'" else value

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items: list[Any] = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                assert ": " not in lines[i][1], f"compose: a list of mappings is not read: {lines[i]}"
                items.append(scalar(lines[i][1][2:].strip()))
                i += 1
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            key, _, value = lines[i][1].partition(":")
            assert not lines[i][1].startswith("- "), f"compose: unexpected list item {lines[i]}"
            i += 1
            if value.strip():
                mapping[key] = scalar(value.strip())
            elif i < len(lines) and lines[i][0] > indent:
                mapping[key], i = block(i, lines[i][0])
            else:
                mapping[key] = None
        return mapping, i

    parsed, end = block(0, 0)
    assert end == len(lines), f"compose: unread line {lines[end]}"
    return parsed


def compose_shards() -> dict[str, dict[str, Any]]:
    services = read_plain_yaml(COMPOSE.read_text())["services"]
    return {name: spec for name, spec in services.items() if name.startswith("shard-")}


def test_compose_runs_one_process_per_shard_with_one_shard_count() -> None:
    """Every shard of SHARD_COUNT has exactly one service, and every service says the same count."""
    shards = compose_shards()
    counts = {spec["environment"]["SHARD_COUNT"] for spec in shards.values()}
    assert counts == {str(len(shards))} and len(shards) >= 2
    ids = sorted(int(spec["environment"]["SHARD_IDS"]) for spec in shards.values())
    assert ids == list(range(len(shards)))
    assert {name: spec["environment"]["SHARD_IDS"] for name, spec in shards.items()} == {
        f"shard-{i}": str(i) for i in ids
    }


def test_compose_shards_share_one_database_and_keep_their_own_data_dir() -> None:
    compose = read_plain_yaml(COMPOSE.read_text())
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:") and postgres["healthcheck"]["test"][0] == "CMD-SHELL"
    shards = compose_shards()
    urls = {spec["environment"]["DATABASE_URL"] for spec in shards.values()}
    assert len(urls) == 1
    data = [volume for spec in shards.values() for volume in spec["volumes"] if volume.endswith(":/app/data")]
    assert len(set(data)) == len(shards), "each process needs a DATA_DIR of its own (its lock, its spool)"
    for spec in shards.values():
        assert spec["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert seconds(spec["stop_grace_period"]) > Config().shutdown_grace_seconds
    named = set(compose["volumes"])
    assert {v.split(":")[0] for v in data} | {"pg-data"} <= named


def test_compose_settings_pass_the_bot_s_own_checks() -> None:
    """Each shard's environment, with the password filled in, is a valid configuration: the URL a
    postgresql:// URL naming the postgres service and database, the shard settings consistent, and
    the pools within PostgreSQL's default 100 connections."""
    compose = read_plain_yaml(COMPOSE.read_text())
    database = compose["services"]["postgres"]["environment"]["POSTGRES_DB"]
    shards = compose_shards()
    for spec in shards.values():
        environ = {k: v.replace("${POSTGRES_PASSWORD}", "s3cret") for k, v in spec["environment"].items()}
        config = load_config(environ=environ, env_file=None)
        assert config.database_url is not None and config.database_url.endswith(f"@postgres:5432/{database}")
        assert config.sharded and config.shard_ids == (int(environ["SHARD_IDS"]),)
    assert len(shards) * (Config().database_pool_size + 1) < 100
