#!/usr/bin/env bash
# Runbook step "answers are slow (p95 above a threshold)": check, find the cause, shed load, validate.
# shellcheck source=scripts/_lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--url URL] [--threshold-ms MS] [--window SECONDS] [--user-per-minute N]
       [--guild-per-minute N] [--queue-new] [--wait SECONDS] [--min-samples N] [--restore]

Bring the time the bot takes to handle a message (p95) back under a threshold.
  check     p95 of the messages handled in the last --window seconds (GET /api/traces?route=message,
            the admin token) and of the last 1,000 (GET /api/health/performance); under the
            threshold: nothing to do
  cause     breakers not closed (GET /api/health/circuits), Gemini's own p95, where the time goes
            in the three slowest recent messages (GET /api/traces/{id}: gemini.generate,
            gemini.attempt, mutex.wait, discord.send, accept, ...), the slow traces, and the
            busiest failure of the last 5 minutes (GET /api/health/errors)
  act       shed load (POST /api/admin/load/shed): per-user and per-guild rate limits down to
            --user-per-minute / --guild-per-minute (default: half of those in force), and with
            --queue-new new messages are saved and acknowledged at once, then answered by the
            queue's drain at QUEUE_DRAIN_PER_SECOND instead of live
  validate  within --wait seconds, at least --min-samples messages that arrived after the
            action, with their p95 under the threshold

The load stays shed until --restore (POST /api/admin/load/restore: the configured limits, live
answers) or a restart. With --queue-new a message's handling ends with its acknowledgement, so
the p95 measured is the time to that acknowledgement; the answer follows from the queue.

Options:
  --url URL               the bot's HTTP API (default: \$BOT_API_URL or http://127.0.0.1:3000)
  --threshold-ms MS       the p95 to get under, in milliseconds (default 5000)
  --window SECONDS        how far back "now" reaches for the check (default 300)
  --user-per-minute N     messages per user and minute while shedding (default: half the current)
  --guild-per-minute N    messages per server and minute while shedding (default: half the current)
  --queue-new             also queue new messages instead of answering them live
  --wait SECONDS          how long to wait for messages to validate with (default 60)
  --min-samples N         messages needed to judge a p95 (default 5)
  --restore               only undo an earlier shedding, then report the limits in force
  -h, --help              this text

Environment: BOT_API_URL, BOT_ADMIN_TOKEN (the bot's ADMIN_API_TOKEN; required),
BOT_HTTP_TIMEOUT (seconds per request, default 30), BOT_PYTHON.

Exit codes:
  0  p95 under the threshold (already, or after shedding); with --restore: restored
  1  p95 still above the threshold, or too few messages to tell (the reason on stderr)
  2  the bot's HTTP API is unreachable
  3  BOT_ADMIN_TOKEN missing or refused
  4  bad usage
EOF
}

THRESHOLD_MS=5000
WINDOW=300
USER_LIMIT=
GUILD_LIMIT=
QUEUE_NEW=false
WAIT=60
MIN_SAMPLES=5
RESTORE=no
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit "$EXIT_OK" ;;
        --url) need_value "$@"; BOT_API_URL=${2%/}; shift 2 ;;
        --threshold-ms) need_number "$@"; THRESHOLD_MS=$2; shift 2 ;;
        --window) need_number "$@"; WINDOW=$2; shift 2 ;;
        --user-per-minute) need_number "$@"; USER_LIMIT=${2%.*}; shift 2 ;;
        --guild-per-minute) need_number "$@"; GUILD_LIMIT=${2%.*}; shift 2 ;;
        --queue-new) QUEUE_NEW=true; shift ;;
        --wait) need_number "$@"; WAIT=$2; shift 2 ;;
        --min-samples) need_number "$@"; MIN_SAMPLES=${2%.*}; shift 2 ;;
        --restore) RESTORE=yes; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
require_token

# load_line: one line about the limits in force, from a load/shed or load/restore answer.
load_line() {
    json 'print("rate limits %s/user, %s/server a minute (configured %s, %s); new messages %s" % (
    d["user_per_minute"], d["guild_per_minute"], d["configured_user_per_minute"],
    d["configured_guild_per_minute"], "queued" if d["queue_new_messages"] else "answered live"))'
}

if [[ $RESTORE == yes ]]; then
    api_ok POST /api/admin/load/restore || die "$EXIT_FAILING" "POST /api/admin/load/restore: HTTP $API_CODE $(error_text)"
    note "OK: load restored: $(load_line)"
    exit "$EXIT_OK"
fi

# recent_p95 QUERY: the messages handled (window=SECONDS: started in the last SECONDS; since=TIME:
# started at or after the bot's wall-clock TIME) into SAMPLES and P95_MS ("" if none).
recent_p95() {
    API_AUTH=1 api_ok GET "/api/traces?route=message&limit=0&$1" ||
        die "$EXIT_FAILING" "GET /api/traces: HTTP $API_CODE $(error_text)"
    IFS=$'\x1f' read -r SAMPLES P95_MS < <(json 'l = d["latency"]
rec(l["count"], "" if l["p95"] is None else round(l["p95"] * 1000))')
}

# under MS: whether MS is at most the threshold.
under() {
    "$PY" -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) else 1)' "$1" "$THRESHOLD_MS"
}

# -- check ------------------------------------------------------------------------------------
api_ok GET /api/health/performance || die "$EXIT_FAILING" "GET /api/health/performance: HTTP $API_CODE $(error_text)"
IFS=$'\x1f' read -r LAST_P95 LAST_COUNT GEMINI_P95 < <(json 'm, g = d["message_latency"], d["gemini_latency"]
ms = lambda v: "" if v is None else round(v * 1000)
rec(ms(m.get("p95")), m.get("count"), ms(g.get("p95")))')
recent_p95 "window=$WINDOW"
note "check: message p95 ${P95_MS:-?} ms over the last ${WINDOW} s (${SAMPLES} messages), ${LAST_P95:-?} ms over the last ${LAST_COUNT:-0}; threshold ${THRESHOLD_MS} ms"
if ((SAMPLES >= MIN_SAMPLES)); then
    CURRENT=$P95_MS
else
    CURRENT=$LAST_P95  # too few recent messages: the longer record speaks
fi
if [[ -z $CURRENT ]]; then
    die "$EXIT_FAILING" "no messages handled yet: no p95 to judge"
fi
if under "$CURRENT"; then
    note "OK: message p95 ${CURRENT} ms is under ${THRESHOLD_MS} ms; nothing to do"
    exit "$EXIT_OK"
fi

# -- cause ------------------------------------------------------------------------------------
load_circuits
OPEN=$(awk -F '\t' '$2 != "closed" { printf "%s%s=%s", sep, $1, $2; sep=", " }' <<<"$CIRCUITS")
note "cause: breakers ${OPEN:-all closed}"
note "cause: Gemini p95 ${GEMINI_P95:-?} ms (of message p95 ${CURRENT} ms)"
# Where the time goes in the slowest recent messages: their steps, summed by name.
API_AUTH=1 api_ok GET "/api/traces?route=message&limit=200&window=$WINDOW" ||
    die "$EXIT_FAILING" "GET /api/traces: HTTP $API_CODE $(error_text)"
SLOWEST=$(json 'for t in sorted(d["traces"], key=lambda t: -t["duration"])[:3]: print(t["trace_id"])')
STEPS=()
for id in $SLOWEST; do
    API_AUTH=1 api_ok GET "/api/traces/$id" && STEPS+=("$API_BODY")
done
if ((${#STEPS[@]})); then
    note "cause: $(printf '%s\n' "${STEPS[@]}" | "$PY" -c 'import json, sys
from collections import Counter
traces = [json.loads(line) for line in sys.stdin if line.strip()]
took = Counter()
for t in traces:
    for s in t["spans"]:
        took[s["name"]] += s["duration"]
total = sum(t["duration"] for t in traces) or 1
print("time in the %d slowest messages: %s" % (len(traces), ", ".join(
    "%s %d%%" % (name, round(100 * seconds / total)) for name, seconds in took.most_common(3))))')"
fi
if API_AUTH=1 api_ok GET "/api/traces?slow=1&limit=0&window=$WINDOW"; then
    note "cause: $(json 'print("%d slow traces (over %s s) in the last %s s" % (d["latency"]["count"], d["slow_threshold"], sys.argv[1]))' "$WINDOW")"
fi
if api_ok GET "/api/health/errors?limit=1"; then
    note "cause: $(json 'g = (d.get("groups") or [None])[0]
print("busiest failure: none recorded" if g is None else "busiest failure: %s %s in %s (%s): %s in 5 min, %s in 1 h" % (
    g["category"], g["error"], g["dependency"], g["route"], g["windows"]["5m"], g["windows"]["1h"]))')"
fi

# -- act --------------------------------------------------------------------------------------
API_AUTH=1 api_ok GET /api/admin/load || die "$EXIT_FAILING" "GET /api/admin/load: HTTP $API_CODE $(error_text)"
BODY=$("$PY" -c 'import json, sys
now = json.loads(sys.argv[1])
def limit(given, current):
    return int(given) if given else max(1, current // 2)
print(json.dumps({"user_per_minute": limit(sys.argv[2], now["user_per_minute"]),
                  "guild_per_minute": limit(sys.argv[3], now["guild_per_minute"]),
                  "queue_new_messages": sys.argv[4] == "true" or now["queue_new_messages"]}))' \
    "$API_BODY" "$USER_LIMIT" "$GUILD_LIMIT" "$QUEUE_NEW")
api_ok POST /api/admin/load/shed "$BODY" || die "$EXIT_FAILING" "POST /api/admin/load/shed: HTTP $API_CODE $(error_text)"
note "act: load shed: $(load_line)"
SINCE=$(json 'print(d["changed_at"])')  # the bot's clock: only messages that arrived after the shedding

# -- validate ---------------------------------------------------------------------------------
shed_enough() {
    recent_p95 "since=$SINCE"
    ((SAMPLES >= MIN_SAMPLES))
}
if ! wait_until "$WAIT" shed_enough; then
    die "$EXIT_FAILING" "only ${SAMPLES} messages in ${WAIT} s since shedding (need ${MIN_SAMPLES}): cannot tell yet; rerun, or undo with --restore"
fi
note "validate: message p95 ${P95_MS} ms over ${SAMPLES} messages since shedding"
under "$P95_MS" ||
    die "$EXIT_FAILING" "message p95 still ${P95_MS} ms (threshold ${THRESHOLD_MS} ms) after shedding; see the cause above (undo with --restore)"
note "OK: message p95 ${P95_MS} ms is under ${THRESHOLD_MS} ms with load shed (undo with --restore)"
