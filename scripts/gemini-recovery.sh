#!/usr/bin/env bash
# Runbook step "Gemini breaker open / Gemini answers failing": check, act, validate.
# shellcheck source=scripts/_lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--url URL] [--wait SECONDS] [--reopen-seconds SECONDS]

Recover the bot's use of Gemini.
  check     the gemini breaker (GET /api/health/circuits) and GET /api/health/external/gemini
  act       test Gemini (POST /api/test/gemini); when the breaker refuses the test, reset it
            (POST /api/admin/circuit/reset/gemini) and test again; when Gemini answers, process
            the queue (POST /api/admin/queue/process)
  validate  the gemini breaker is closed and a last test answers

If Gemini still fails after a reset, the breaker is opened again for --reopen-seconds
(default 60; 0 leaves it to the breaker) so the bot keeps queueing instead of calling it.

Options:
  --url URL               the bot's HTTP API (default: \$BOT_API_URL or http://127.0.0.1:3000)
  --wait SECONDS          how long to wait for the breaker to close (default 30)
  --reopen-seconds N      see above (default 60)
  -h, --help              this text

Environment: BOT_API_URL, BOT_ADMIN_TOKEN (the bot's ADMIN_API_TOKEN; required),
BOT_HTTP_TIMEOUT (seconds per request, default 30), BOT_PYTHON.

Exit codes:
  0  Gemini answers and its breaker is closed
  1  Gemini still failing (the reason, with its category, on stderr)
  2  the bot's HTTP API is unreachable
  3  BOT_ADMIN_TOKEN missing or refused
  4  bad usage
EOF
}

WAIT=30
REOPEN=60
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit "$EXIT_OK" ;;
        --url) need_value "$@"; BOT_API_URL=${2%/}; shift 2 ;;
        --wait) need_number "$@"; WAIT=$2; shift 2 ;;
        --reopen-seconds) need_number "$@"; REOPEN=$2; shift 2 ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
require_token

# gemini_test: POST /api/test/gemini into TEST_OK (true|false), TEST_CATEGORY, TEST_LATENCY, TEST_MESSAGE.
gemini_test() {
    api_ok POST /api/test/gemini
    if ! json 'sys.exit(0 if isinstance(d, dict) and "ok" in d else 1)'; then
        die "$EXIT_FAILING" "POST /api/test/gemini: HTTP $API_CODE $(error_text)"
    fi
    IFS=$'\x1f' read -r TEST_OK TEST_CATEGORY TEST_LATENCY TEST_MESSAGE < <(
        json 'rec(str(bool(d["ok"])).lower(), d.get("category") or "", d.get("latency_ms"), d.get("message") or "")'
    )
    note "act: Gemini test: ok=$TEST_OK${TEST_CATEGORY:+ category=$TEST_CATEGORY} latency=${TEST_LATENCY} ms"
}

gemini_closed() {
    load_circuits
    [[ $(circuit_state gemini) == closed ]]
}

# -- check ------------------------------------------------------------------------------------
load_circuits
BEFORE=$(circuit_state gemini)
[[ -n $BEFORE ]] || die "$EXIT_FAILING" "no breaker named gemini in GET /api/health/circuits"
note "check: gemini breaker is $BEFORE"
if api GET /api/health/external/gemini && [[ $API_CODE == 2?? ]]; then
    note "check: external/gemini: $(json 'out(", ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list))))')"
fi

# -- act --------------------------------------------------------------------------------------
gemini_test
RESET=no
if [[ $TEST_OK != true && ($TEST_CATEGORY == circuit_open || $BEFORE != closed) ]]; then
    # The test runs through the breaker: while it is open the test proves nothing, so close it.
    api_ok POST /api/admin/circuit/reset/gemini || die "$EXIT_FAILING" "circuit reset: HTTP $API_CODE $(error_text)"
    note "act: gemini breaker reset"
    RESET=yes
    gemini_test
fi
if [[ $TEST_OK != true ]]; then
    if [[ $RESET == yes && $REOPEN != 0 ]]; then
        api_ok POST /api/admin/circuit/open/gemini "{\"duration\": $REOPEN}" &&
            note "act: gemini breaker opened again for $REOPEN s (the bot keeps queueing)"
    fi
    die "$EXIT_FAILING" "Gemini still failing: ${TEST_CATEGORY:-no answer}${TEST_MESSAGE:+ ($TEST_MESSAGE)}"
fi
if api_ok POST /api/admin/queue/process; then
    note "act: queue processing woken: $(json 'print("%s pending, blocked by %s" % (d.get("pending"), ", ".join(d.get("blocked_by") or []) or "nothing"))')"
else
    note "act: queue processing not started: HTTP $API_CODE $(error_text)"
fi

# -- validate ---------------------------------------------------------------------------------
wait_until "$WAIT" gemini_closed ||
    die "$EXIT_FAILING" "Gemini still failing: breaker is $(circuit_state gemini) after ${WAIT} s"
gemini_test
[[ $TEST_OK == true ]] || die "$EXIT_FAILING" "Gemini still failing: ${TEST_CATEGORY:-no answer}"
note "OK: Gemini answers (${TEST_LATENCY} ms) and its breaker is closed"
