#!/usr/bin/env bash
# Runbook step "before and after any recovery: keep the evidence".
# shellcheck source=scripts/_lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--url URL] [--out DIR] [--log FILE] [--lines N]

Write a snapshot of the bot's state to DIR/recovery-<UTC timestamp>/:
  status.json       GET /api/health/status
  circuits.json     GET /api/health/circuits
  degradation.json  GET /api/health/degradation
  services.json     GET /api/health/services
  memory.json       GET /api/health/memory
  performance.json  GET /api/health/performance
  gemini.json       GET /api/health/external/gemini
  discord.json      GET /api/health/external/discord
  incidents.json    GET /api/health/incidents (incidents, MTTR and MTBF per dependency)
  metrics.txt       GET /metrics
  log-tail.txt      the last N lines of --log FILE
  MISSING.txt       what could not be collected, and why
It works partially while the bot is down (the log tail is still collected) and says so.
It changes nothing and needs no admin token. The folder's path is the last line of stdout.

Options:
  --url URL      the bot's HTTP API (default: \$BOT_API_URL or http://127.0.0.1:3000)
  --out DIR      where to create the folder (default: .)
  --log FILE     the bot's log file (e.g. DATA_DIR/sandbox.log or your service's log)
  --lines N      how many log lines to keep (default 500)
  -h, --help     this text

Environment: BOT_API_URL, BOT_HTTP_TIMEOUT (seconds per request, default 30), BOT_PYTHON.

Exit codes:
  0  everything was collected
  1  some of it could not be collected (listed in MISSING.txt and on stderr)
  2  the bot's HTTP API is unreachable (only the log tail, if any, was collected)
  4  bad usage (including an unreadable --log FILE or an unwritable --out DIR)
EOF
}

OUT=.
LOG=
LINES=500
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit "$EXIT_OK" ;;
        --url) need_value "$@"; BOT_API_URL=${2%/}; shift 2 ;;
        --out) need_value "$@"; OUT=$2; shift 2 ;;
        --log) need_value "$@"; LOG=$2; shift 2 ;;
        --lines) need_value "$@"; [[ $2 =~ ^[0-9]+$ ]] || usage_error "--lines needs a whole number"; LINES=$2; shift 2 ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
[[ -z $LOG || -r $LOG ]] || usage_error "cannot read the log file '$LOG'"

DIR=$OUT/recovery-$(date -u +%Y%m%dT%H%M%SZ)
n=1
while [[ -e $DIR ]]; do # two runs in one second keep both snapshots
    DIR=$OUT/recovery-$(date -u +%Y%m%dT%H%M%SZ)-$n
    n=$((n + 1))
done
mkdir -p -- "$DIR" 2>/dev/null || usage_error "cannot create '$DIR'"

MISSING=()
UNREACHABLE=no
# fetch PATH FILE: save the response body (whatever its status: a 503 status is evidence too).
fetch() {
    if [[ $UNREACHABLE == yes ]]; then
        MISSING+=("$2: bot unreachable")
        return
    fi
    if ! api GET "$1"; then
        UNREACHABLE=yes
        MISSING+=("$2: bot unreachable at $BOT_API_URL ($API_ERROR)")
        return
    fi
    printf '%s\n' "$API_BODY" >"$DIR/$2"
    case $API_CODE in
        2?? | 503) ;;
        *) MISSING+=("$2: HTTP $API_CODE") ;;
    esac
}

fetch /api/health/status status.json
fetch /api/health/circuits circuits.json
fetch /api/health/degradation degradation.json
fetch /api/health/services services.json
fetch /api/health/memory memory.json
fetch /api/health/performance performance.json
fetch /api/health/external/gemini gemini.json
fetch /api/health/external/discord discord.json
fetch /api/health/incidents incidents.json
fetch /metrics metrics.txt
if [[ -n $LOG ]]; then
    tail -n "$LINES" -- "$LOG" >"$DIR/log-tail.txt"
fi
{
    echo "collected_at: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "api: $BOT_API_URL"
    echo "log: ${LOG:-none}"
} >"$DIR/README.txt"

if [[ ${#MISSING[@]} -gt 0 ]]; then
    printf '%s\n' "${MISSING[@]}" >"$DIR/MISSING.txt"
fi
note "Snapshot written to:"
note "$DIR"
if [[ $UNREACHABLE == yes && ${#MISSING[@]} -ge 10 ]]; then
    die "$EXIT_UNREACHABLE" "bot unreachable at $BOT_API_URL: collected only ${LOG:+the log tail and }README.txt in $DIR"
fi
if [[ ${#MISSING[@]} -gt 0 ]]; then
    die "$EXIT_FAILING" "partial snapshot in $DIR: ${#MISSING[@]} item(s) missing (see MISSING.txt)"
fi
