#!/usr/bin/env bash
# Runbook step "DataStore file corrupt / settings lost": check, act, validate.
# shellcheck source=scripts/_lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--url URL] [--offline] [--data-dir DIR] [--env-file FILE] [NAME]

Find invalid DataStore files (the JSON files under DATA_DIR) and restore each from its
best valid source: the file, its .bak, then the newest valid backup, else the defaults.
NAME limits it to one file (e.g. maintenance, breakers); default: every file.

Online (the bot answers at --url):
  check     POST /api/admin/datastore/validate[/NAME]
  act       POST /api/admin/datastore/recover/NAME for each invalid file (the running bot
            applies the recovered state at once)
  validate  POST /api/admin/datastore/validate[/NAME] again: every file valid
Offline (--offline, only when asked: a bot that does not answer at --url may still be
running): the same through
  python -m bot datastore validate|recover NAME
which refuses to touch DATA_DIR while a running bot holds its lock (DATA_DIR/.bot.lock).

Options:
  --url URL         the bot's HTTP API (default: \$BOT_API_URL or http://127.0.0.1:3000)
  --offline         the bot is stopped: work on the files directly, without the HTTP API
  --data-dir DIR    offline: the data directory (default: \$DATA_DIR, then DATA_DIR in the
                    env file, then ./data)
  --env-file FILE   offline: the bot's settings file (default: .env)
  -h, --help        this text

Environment: BOT_API_URL, BOT_ADMIN_TOKEN (the bot's ADMIN_API_TOKEN; online only),
BOT_HTTP_TIMEOUT, BOT_PYTHON, DATA_DIR (offline).

Exit codes:
  0  every file is valid (after recovery from a file, .bak or backup if needed)
  1  a file is still invalid, or recovery failed
  2  the bot's HTTP API did not answer (if the bot is stopped, run again with --offline)
  3  BOT_ADMIN_TOKEN missing or refused
  4  bad usage (including an unknown NAME)
  5  every file is valid, but one came back as the defaults: its data is lost
  6  --offline: a running bot holds DATA_DIR, nothing was touched (recover online instead)
EOF
}

OFFLINE=no
NAME=
CLI_OPTS=()
DS_OPTS=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit "$EXIT_OK" ;;
        --url) need_value "$@"; BOT_API_URL=${2%/}; shift 2 ;;
        --offline) OFFLINE=yes; shift ;;
        --data-dir) need_value "$@"; DS_OPTS+=(--data-dir "$2"); shift 2 ;;
        --env-file) need_value "$@"; CLI_OPTS+=(--env-file "$2"); shift 2 ;;
        -*) usage_error "unknown argument '$1'" ;;
        *)
            [[ -z $NAME ]] || usage_error "one NAME at most"
            [[ $1 =~ ^[A-Za-z0-9_.-]+$ ]] || usage_error "bad file name '$1'"
            NAME=$1
            shift
            ;;
    esac
done

# -- offline: python -m bot datastore ---------------------------------------------------------

# bot_cli ARGS...: python -m bot with the repo importable; output into CLI_OUT, status into CLI_RC.
bot_cli() {
    CLI_RC=0
    CLI_OUT=$(PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m bot "${CLI_OPTS[@]}" "$@" 2>&1) ||
        CLI_RC=$?
}

# in_use_exit: the CLI's exit 3 (a running bot holds DATA_DIR) ends the script with its sentence.
in_use_exit() {
    [[ $CLI_RC == 3 ]] && die "$EXIT_IN_USE" "$(printf '%s\n' "$CLI_OUT" | tail -n 1)"
    return 0
}

offline() {
    note "DataStore recovery offline (python -m bot datastore); the bot must be stopped"
    bot_cli datastore validate ${NAME:+"$NAME"} "${DS_OPTS[@]}"
    in_use_exit
    printf '%s\n' "$CLI_OUT" | sed 's/^/check: /'
    case $CLI_RC in
        0) note "OK: every DataStore file is valid; nothing to do"; exit "$EXIT_OK" ;;
        1) ;;
        2) die "$EXIT_USAGE" "$(printf '%s\n' "$CLI_OUT" | tail -n 1)" ;;
        *) die "$EXIT_FAILING" "python -m bot datastore validate failed (exit $CLI_RC)" ;;
    esac
    local bad defaults=no name
    bad=$(printf '%s\n' "$CLI_OUT" | awk '$2 == "INVALID" { print $1 }')
    [[ -n $bad ]] || die "$EXIT_FAILING" "validate reported a problem but named no invalid file"
    for name in $bad; do
        bot_cli datastore recover "$name" "${DS_OPTS[@]}"
        in_use_exit
        printf '%s\n' "$CLI_OUT" | sed 's/^/act: /'
        case $CLI_RC in
            0) ;;
            2) defaults=yes ;;
            *) die "$EXIT_FAILING" "python -m bot datastore recover $name failed (exit $CLI_RC)" ;;
        esac
    done
    bot_cli datastore validate ${NAME:+"$NAME"} "${DS_OPTS[@]}"
    in_use_exit
    printf '%s\n' "$CLI_OUT" | sed 's/^/validate: /'
    [[ $CLI_RC == 0 ]] || die "$EXIT_FAILING" "DataStore still invalid after recovery: $(printf '%s\n' "$CLI_OUT" | awk '$2 == "INVALID" { print $1 }' | paste -sd ' ' -)"
    if [[ $defaults == yes ]]; then
        die "$EXIT_DEFAULTS" "recovered ${bad//$'\n'/ } to the defaults: no valid file, .bak or backup was left"
    fi
    note "OK: every DataStore file is valid (recovered: ${bad//$'\n'/ })"
    exit "$EXIT_OK"
}

if [[ $OFFLINE == yes ]]; then
    offline
fi

# -- online: the HTTP admin API ---------------------------------------------------------------

# validate_online: POST datastore/validate into BAD (invalid names) and print each file's verdict.
validate_online() {
    local stage=$1
    api_ok POST "/api/admin/datastore/validate${NAME:+/$NAME}" || {
        [[ $API_CODE == 404 ]] && die "$EXIT_USAGE" "$(error_text)"
        die "$EXIT_FAILING" "datastore validate: HTTP $API_CODE $(error_text)"
    }
    json 'for f in d.get("files", []):
    print("%s: %-16s %s" % (sys.argv[1], f.get("name"), "OK" if f.get("ok") else "INVALID"))
    for p in f.get("problems") or []:
        print("%s:     - %s" % (sys.argv[1], p))' "$stage"
    BAD=$(json 'for f in d.get("files", []):
    if not f.get("ok"): out(f.get("name"))')
}

if ! api GET /live; then
    # Never fall back to the files on our own: a wrong URL does not mean the bot is stopped.
    die "$EXIT_UNREACHABLE" "bot unreachable at $BOT_API_URL ($API_ERROR); if the bot is stopped, run again with --offline"
fi
require_token
validate_online check
if [[ -z $BAD ]]; then
    note "OK: every DataStore file is valid; nothing to do"
    exit "$EXIT_OK"
fi
RECOVERED=$BAD
DEFAULTED=()
for name in $BAD; do
    api_ok POST "/api/admin/datastore/recover/$name" || die "$EXIT_FAILING" "recover $name: HTTP $API_CODE $(error_text)"
    json 'print("act: %s served from %s%s" % (d.get("name"), d.get("source"), "  ALERT: nothing valid was left" if d.get("alert") else ""))
for q in d.get("quarantined") or []:
    print("act:     moved aside to %s" % q)'
    [[ $(json 'out(str(bool(d.get("alert"))).lower())') == true ]] && DEFAULTED+=("$name")
done
validate_online validate
[[ -z $BAD ]] || die "$EXIT_FAILING" "DataStore still invalid after recovery: ${BAD//$'\n'/ }"
if [[ ${#DEFAULTED[@]} -gt 0 ]]; then
    die "$EXIT_DEFAULTS" "recovered ${DEFAULTED[*]} to the defaults: no valid file, .bak or backup was left"
fi
note "OK: every DataStore file is valid (recovered: ${RECOVERED//$'\n'/ })"
