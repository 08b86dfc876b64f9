#!/usr/bin/env bash
# Runbook step "the bot will not start / a setting is wrong": check the configuration.
# shellcheck source=scripts/_lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--env-file FILE] [--restore-example]

Check the bot's configuration (the environment, then the env file) with python -m bot check.
It works whether the bot runs or not, and prints secrets redacted.
  check     python -m bot [--env-file FILE] check
  act       on a bad configuration: print every problem; with --restore-example, point at
            .env.example (every setting, documented, with its default) and list the settings
            the env file sets that .env.example does not know
  validate  the exit code of python -m bot check

Options:
  --env-file FILE      the settings file (default: .env in the current directory)
  --restore-example    on failure, say how to start again from .env.example
  -h, --help           this text

Environment: every bot setting (the environment wins over the env file), BOT_PYTHON.

Exit codes:
  0  the configuration is valid (warnings, if any, printed)
  1  the configuration is invalid (the problems on stderr)
  4  bad usage (including an unreadable --env-file)
EOF
}

ENV_FILE=
RESTORE=no
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit "$EXIT_OK" ;;
        --env-file) need_value "$@"; ENV_FILE=$2; shift 2 ;;
        --restore-example) RESTORE=yes; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
[[ -z $ENV_FILE || -r $ENV_FILE ]] || usage_error "cannot read the env file '$ENV_FILE'"

EXAMPLE=$REPO_ROOT/.env.example
ARGS=()
[[ -n $ENV_FILE ]] && ARGS=(--env-file "$ENV_FILE")
RC=0
PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m bot "${ARGS[@]}" check 2>"$_WORK/check.err" || RC=$?
if [[ $RC == 0 ]]; then
    cat "$_WORK/check.err" >&2
    note "OK: the configuration is valid"
    exit "$EXIT_OK"
fi
cat "$_WORK/check.err" >&2
if [[ $RESTORE == yes ]]; then
    FILE=${ENV_FILE:-.env}
    note ""
    note "To start again from the documented example: cp $EXAMPLE $FILE"
    note "(keep your old file first: cp $FILE $FILE.broken), then fill in your tokens."
    if [[ -r $FILE && -r $EXAMPLE ]]; then
        UNKNOWN=$("$PY" - "$FILE" "$EXAMPLE" <<'EOF'
import re, sys
names = lambda path: {m.group(1) for line in open(path, encoding="utf-8", errors="replace")
                      if (m := re.match(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", line))}
print(" ".join(sorted(names(sys.argv[1]) - names(sys.argv[2]))))
EOF
        )
        [[ -z $UNKNOWN ]] || note "Settings in $FILE that .env.example does not know (typos?): $UNKNOWN"
    fi
fi
FIRST=$(sed -n 's/^ *- //p' "$_WORK/check.err" | head -n 1)
COUNT=$(grep -c '^ *- ' "$_WORK/check.err")
[[ -n $FIRST ]] || FIRST=$(grep -v '^\s*$' "$_WORK/check.err" | head -n 1)
die "$EXIT_FAILING" "bad configuration: $FIRST$( ((COUNT > 1)) && echo " (and $((COUNT - 1)) more)")"
