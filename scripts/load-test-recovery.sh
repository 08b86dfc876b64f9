#!/usr/bin/env bash
# Runbook step "is the bot fast enough under load?": a bounded synthetic load, then a report.
# shellcheck source=scripts/_lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--url URL] [--requests N] [--concurrency N] [--max-p95-ms MS]
       [--max-error-rate R] [--yes]

Send the running bot a bounded synthetic load and report how it held up.
  check     the gemini breaker (GET /api/health/circuits): a load against an open breaker
            only measures refusals
  act       POST /api/test/load: --requests Gemini test prompts, --concurrency at a time, through
            the same retry, breaker and timeout as messages (at most 500, 20 at a time, 60 s)
  report    p50/p95/p99/max latency, answered, errors by category, requests per second
  validate  the share of errors is at most --max-error-rate, p95 at most --max-p95-ms (if
            given), and the gemini breaker is still closed

On a live bot (Gemini or Discord beyond this machine) the bot refuses the load unless --yes is
given: each request costs Gemini quota, and failures count towards the breaker users share.

Options:
  --url URL               the bot's HTTP API (default: \$BOT_API_URL or http://127.0.0.1:3000)
  --requests N            how many requests (default 20, at most 500)
  --concurrency N         how many at a time (default 4, at most 20)
  --max-p95-ms MS         fail when p95 is above MS milliseconds
  --max-error-rate R      fail when more than this share of requests failed (default 0)
  --yes                   run on a live bot too
  -h, --help              this text

Environment: BOT_API_URL, BOT_ADMIN_TOKEN (the bot's ADMIN_API_TOKEN; required),
BOT_HTTP_TIMEOUT (seconds per request, default 30; the load test itself may take 75), BOT_PYTHON.

Exit codes:
  0  the load ran within the limits and the gemini breaker is closed
  1  too many errors, p95 too high, or the breaker opened (the reason on stderr)
  2  the bot's HTTP API is unreachable
  3  BOT_ADMIN_TOKEN missing or refused
  4  bad usage, or a live bot without --yes
EOF
}

REQUESTS=20
CONCURRENCY=4
MAX_P95=
MAX_ERROR_RATE=0
CONFIRM=false
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit "$EXIT_OK" ;;
        --url) need_value "$@"; BOT_API_URL=${2%/}; shift 2 ;;
        --requests) need_number "$@"; REQUESTS=${2%.*}; shift 2 ;;
        --concurrency) need_number "$@"; CONCURRENCY=${2%.*}; shift 2 ;;
        --max-p95-ms) need_number "$@"; MAX_P95=$2; shift 2 ;;
        --max-error-rate) need_number "$@"; MAX_ERROR_RATE=$2; shift 2 ;;
        --yes) CONFIRM=true; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
require_token
# The load runs up to 60 s on the bot, and its answer comes after.
((${BOT_HTTP_TIMEOUT%.*} >= 75)) || BOT_HTTP_TIMEOUT=75

# -- check ------------------------------------------------------------------------------------
load_circuits
BEFORE=$(circuit_state gemini)
note "check: gemini breaker is ${BEFORE:-unknown}"
[[ $BEFORE == closed ]] ||
    die "$EXIT_FAILING" "the gemini breaker is ${BEFORE:-missing}: a load now would only measure refusals (see gemini-recovery.sh)"

# -- act --------------------------------------------------------------------------------------
note "act: $REQUESTS requests, $CONCURRENCY at a time"
api_ok POST /api/test/load "{\"requests\": $REQUESTS, \"concurrency\": $CONCURRENCY, \"confirm\": $CONFIRM}"
case $API_CODE in
    2??) ;;
    409) die "$EXIT_USAGE" "refused: $(error_text) (rerun with --yes to load a live bot)" ;;
    400) die "$EXIT_USAGE" "POST /api/test/load: $(error_text)" ;;
    *) die "$EXIT_FAILING" "POST /api/test/load: HTTP $API_CODE $(error_text)" ;;
esac

# -- report -----------------------------------------------------------------------------------
json 'l = d["latency"]
ms = lambda v: "-" if v is None else "%.0f ms" % (v * 1000)
print("report: %d requests in %.1f s (%.1f/s), %d answered, %d errors, %d unfinished%s" % (
    d["requests"], d["duration"], d["per_second"], d["ok"], d["errors"], d["unfinished"], " (live bot)" if d["live"] else ""))
print("report: latency p50 %s, p95 %s, p99 %s, max %s" % (ms(l["p50"]), ms(l["p95"]), ms(l["p99"]), ms(l["max"])))
for category, n in sorted(d["errors_by_category"].items(), key=lambda kv: -kv[1]):
    print("report: errors %s: %d" % (category, n))'
IFS=$'\x1f' read -r FAILED P95_MS < <(json 'rec(d["errors"] + d["unfinished"], "" if d["latency"]["p95"] is None else round(d["latency"]["p95"] * 1000))')

# -- validate ---------------------------------------------------------------------------------
"$PY" -c 'import sys; sys.exit(0 if int(sys.argv[1]) <= float(sys.argv[2]) * int(sys.argv[3]) else 1)' \
    "$FAILED" "$MAX_ERROR_RATE" "$REQUESTS" ||
    die "$EXIT_FAILING" "$FAILED of $REQUESTS requests failed (allowed: a share of $MAX_ERROR_RATE)"
if [[ -n $MAX_P95 ]]; then
    "$PY" -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) else 1)' "${P95_MS:-0}" "$MAX_P95" ||
        die "$EXIT_FAILING" "p95 ${P95_MS} ms is above ${MAX_P95} ms"
fi
load_circuits
AFTER=$(circuit_state gemini)
[[ $AFTER == closed ]] || die "$EXIT_FAILING" "the gemini breaker is $AFTER after the load (see gemini-recovery.sh)"
note "OK: $REQUESTS requests, p95 ${P95_MS:-?} ms, $FAILED failed; gemini breaker closed"
