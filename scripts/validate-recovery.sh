#!/usr/bin/env bash
# Runbook step "after any recovery: is the bot healthy?": check only, with a summary table.
# shellcheck source=scripts/_lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--url URL] [--sample SECONDS]

Check that the bot has recovered, and print a summary table:
  status    GET /api/health/status reports healthy
  breakers  every breaker in GET /api/health/circuits is closed
  queue     GET /api/health/degradation: nothing pending, or fewer pending after
            --sample seconds (the queue is draining)
  mode      not in maintenance mode
It changes nothing and needs no admin token.

Options:
  --url URL          the bot's HTTP API (default: \$BOT_API_URL or http://127.0.0.1:3000)
  --sample SECONDS   how long to watch a non-empty queue for progress (default 5)
  -h, --help         this text

Environment: BOT_API_URL, BOT_HTTP_TIMEOUT (seconds per request, default 30), BOT_PYTHON.

Exit codes:
  0  every check passed
  1  a check failed (the table says which; a one-line summary on stderr)
  2  the bot's HTTP API is unreachable
  4  bad usage
EOF
}

SAMPLE=5
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit "$EXIT_OK" ;;
        --url) need_value "$@"; BOT_API_URL=${2%/}; shift 2 ;;
        --sample) need_number "$@"; SAMPLE=$2; shift 2 ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done

ROWS=()
FAILED=()
# row CHECK PASS|FAIL DETAIL
row() {
    ROWS+=("$(printf '%-10s %-5s %s' "$1" "$2" "$3")")
    [[ $2 == PASS ]] || FAILED+=("$1: $3")
}

# load_queue: GET /api/health/degradation into PENDING and MODE.
load_queue() {
    api_ok GET /api/health/degradation || die "$EXIT_FAILING" "GET /api/health/degradation: HTTP $API_CODE $(error_text)"
    IFS=$'\x1f' read -r MODE PENDING < <(json 'rec(find("mode"), find("pending"))')
}

# -- status -----------------------------------------------------------------------------------
api GET /api/health/status || die "$EXIT_UNREACHABLE" "bot unreachable at $BOT_API_URL ($API_ERROR)"
if [[ $API_CODE == 2?? || $API_CODE == 503 ]]; then
    IFS=$'\x1f' read -r STATUS REASONS < <(json 'r = find("reasons") or []
rec(find("status") or find("overall") or "unknown", "; ".join(map(str, r)) if isinstance(r, list) else r)')
    if [[ $STATUS == healthy ]]; then row status PASS healthy; else row status FAIL "$STATUS${REASONS:+: $REASONS}"; fi
else
    row status FAIL "GET /api/health/status: HTTP $API_CODE"
fi

# -- breakers ---------------------------------------------------------------------------------
load_circuits
NOT_CLOSED=$(awk -F '\t' '$2 != "closed" { printf "%s%s=%s", sep, $1, $2; sep = ", " }' <<<"$CIRCUITS")
TOTAL=$(grep -c . <<<"$CIRCUITS")
if [[ -z $NOT_CLOSED ]]; then row breakers PASS "all $TOTAL closed"; else row breakers FAIL "$NOT_CLOSED"; fi

# -- queue and mode ---------------------------------------------------------------------------
load_queue
FIRST=${PENDING:-0}
if [[ $FIRST == 0 ]]; then
    row queue PASS "empty"
else
    sleep "$SAMPLE"
    load_queue
    if ((${PENDING:-0} < FIRST)); then
        row queue PASS "draining: $FIRST -> ${PENDING:-0} pending in ${SAMPLE} s"
    else
        row queue FAIL "not draining: $FIRST -> ${PENDING:-0} pending in ${SAMPLE} s"
    fi
fi
if [[ $MODE == maintenance ]]; then row mode FAIL maintenance; else row mode PASS "${MODE:-unknown}"; fi

printf '%-10s %-5s %s\n' CHECK RESULT DETAIL
printf '%s\n' "${ROWS[@]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    die "$EXIT_FAILING" "not recovered: $(printf '%s; ' "${FAILED[@]}" | sed 's/; $//')"
fi
note "OK: the bot has recovered"
