#!/usr/bin/env bash
# Runbook step "Bot offline in Discord / sends failing": check, act, validate.
# shellcheck source=scripts/_lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--url URL] [--wait SECONDS] [--force]

Recover the bot's connection to Discord.
  check     GET /ready, GET /api/health/external/discord and the discord.* breakers
  act       when not ready (or with --force): reconnect the gateway
            (POST /api/admin/discord/reconnect: discord.py reconnects and resumes);
            reset every discord.* breaker that is not closed (POST /api/admin/circuit/reset/NAME)
  validate  GET /ready answers 200 and every discord.* breaker is closed, within --wait

Options:
  --url URL         the bot's HTTP API (default: \$BOT_API_URL or http://127.0.0.1:3000)
  --wait SECONDS    how long to wait for the bot to be ready again (default 30)
  --force           reconnect the gateway even when the bot reports ready
  -h, --help        this text

Environment: BOT_API_URL, BOT_ADMIN_TOKEN (the bot's ADMIN_API_TOKEN; required),
BOT_HTTP_TIMEOUT (seconds per request, default 30), BOT_PYTHON.

Exit codes:
  0  the bot is ready and every discord.* breaker is closed
  1  still not ready, or a discord.* breaker is still open (the reason on stderr)
  2  the bot's HTTP API is unreachable
  3  BOT_ADMIN_TOKEN missing or refused
  4  bad usage
EOF
}

WAIT=30
FORCE=no
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit "$EXIT_OK" ;;
        --url) need_value "$@"; BOT_API_URL=${2%/}; shift 2 ;;
        --wait) need_number "$@"; WAIT=$2; shift 2 ;;
        --force) FORCE=yes; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
require_token

# is_ready: GET /ready answers 2xx (sets READY_CODE).
is_ready() {
    api GET /ready || die "$EXIT_UNREACHABLE" "bot unreachable at $BOT_API_URL ($API_ERROR)"
    READY_CODE=$API_CODE
    [[ $API_CODE == 2?? ]]
}

# open_discord_breakers: the discord.* breakers that are not closed, one per line.
open_discord_breakers() {
    awk -F '\t' '$1 ~ /^discord[.]/ && $2 != "closed" { print $1 }' <<<"$CIRCUITS"
}

healthy() {
    is_ready || return 1
    load_circuits
    [[ -z $(open_discord_breakers) ]]
}

# -- check ------------------------------------------------------------------------------------
READY=no
is_ready && READY=yes
note "check: /ready answered HTTP $READY_CODE"
if api GET /api/health/external/discord && [[ $API_CODE == 2?? ]]; then
    note "check: external/discord: $(json 'out(", ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list))))')"
fi
load_circuits
OPEN=$(open_discord_breakers)
note "check: discord breakers not closed: ${OPEN:-none}"
if [[ $READY == yes && -z $OPEN && $FORCE == no ]]; then
    note "OK: the bot is connected to Discord and every discord.* breaker is closed; nothing to do"
    exit "$EXIT_OK"
fi

# -- act --------------------------------------------------------------------------------------
if [[ $READY == no || $FORCE == yes ]]; then
    if api_ok POST /api/admin/discord/reconnect; then
        note "act: gateway closed with a resumable code; discord.py reconnects"
        sleep 1 # let the bot notice the closed socket, so /ready below reflects the new connection
    else
        # 503: no gateway socket to close, i.e. discord.py is already reconnecting by itself.
        note "act: no reconnect (HTTP $API_CODE: $(error_text))"
    fi
fi
for name in $OPEN; do
    api_ok POST "/api/admin/circuit/reset/$name" || die "$EXIT_FAILING" "reset $name: HTTP $API_CODE $(error_text)"
    note "act: breaker $name reset"
done

# -- validate ---------------------------------------------------------------------------------
if ! wait_until "$WAIT" healthy; then
    if [[ $READY_CODE != 2?? ]]; then
        die "$EXIT_FAILING" "Discord still not ready after ${WAIT} s (/ready answers HTTP $READY_CODE)"
    fi
    die "$EXIT_FAILING" "Discord breakers still open after ${WAIT} s: $(open_discord_breakers | paste -sd ' ' -)"
fi
note "OK: the bot is ready and every discord.* breaker is closed"
