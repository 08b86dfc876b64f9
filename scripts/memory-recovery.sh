#!/usr/bin/env bash
# Runbook step "memory keeps growing": check, act, validate.
# shellcheck source=scripts/_lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/_lib.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [--url URL] [--max-rss-mb MB]

Free what the bot's Python heap can give back, and report resident memory before and after.
  check     GET /api/health/memory: resident memory, the Python heap, the largest caches
  act       POST /api/admin/gc: a full garbage collection
  validate  GET /api/health/memory again; with --max-rss-mb, resident memory is at most MB

A collection frees unreachable objects; it cannot shrink a cache that is still referenced.
If memory stays high, collect the metrics (collect-recovery-metrics.sh) and restart the bot.

Options:
  --url URL          the bot's HTTP API (default: \$BOT_API_URL or http://127.0.0.1:3000)
  --max-rss-mb MB    fail if resident memory is still above MB megabytes (MiB) afterwards
  -h, --help         this text

Environment: BOT_API_URL, BOT_ADMIN_TOKEN (the bot's ADMIN_API_TOKEN; required),
BOT_HTTP_TIMEOUT (seconds per request, default 30), BOT_PYTHON.

Exit codes:
  0  collected; resident memory within --max-rss-mb (when given)
  1  resident memory still above --max-rss-mb, or memory unreadable
  2  the bot's HTTP API is unreachable
  3  BOT_ADMIN_TOKEN missing or refused
  4  bad usage
EOF
}

MAX_MB=
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit "$EXIT_OK" ;;
        --url) need_value "$@"; BOT_API_URL=${2%/}; shift 2 ;;
        --max-rss-mb) need_number "$@"; MAX_MB=$2; shift 2 ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
require_token

# read_memory LABEL: GET /api/health/memory; print a summary line; RSS into RSS (bytes, "" if unknown).
read_memory() {
    api_ok GET /api/health/memory || die "$EXIT_FAILING" "GET /api/health/memory: HTTP $API_CODE $(error_text)"
    RSS=$(json 'out(find("rss_bytes"))')
    json 'rss = find("rss_bytes")
py = ", ".join("%s %s" % (k.replace("_", " "), v) for k, v in (get("python") or {}).items() if v is not None)
caches = ", ".join("%s=%s" % (c.get("name"), c.get("size")) for c in (get("caches") or [])[:5])
print("%s: rss %s%s%s" % (sys.argv[1], "unknown" if rss is None else "%.1f MiB" % (rss / 1048576),
    "; python: " + py if py else "", "; caches: " + caches if caches else ""))' "$1"
}

read_memory check
BEFORE=$RSS
api_ok POST /api/admin/gc || die "$EXIT_FAILING" "POST /api/admin/gc: HTTP $API_CODE $(error_text)"
json 'print("act: gc collected %s unreachable objects (%s uncollectable)" % (d.get("collected"), d.get("garbage")))'
read_memory validate
if [[ -n $BEFORE && -n $RSS ]]; then
    note "memory: rss $((BEFORE / 1048576)) MiB -> $((RSS / 1048576)) MiB"
fi
if [[ -n $MAX_MB ]]; then
    [[ -n $RSS ]] || die "$EXIT_FAILING" "resident memory is unknown on this system: cannot check --max-rss-mb"
    "$PY" -c 'import sys; sys.exit(0 if int(sys.argv[1]) <= float(sys.argv[2]) * 1048576 else 1)' "$RSS" "$MAX_MB" ||
        die "$EXIT_FAILING" "memory still high: rss $((RSS / 1048576)) MiB > $MAX_MB MiB after gc; collect metrics and restart the bot"
fi
note "OK: garbage collected${MAX_MB:+; rss within $MAX_MB MiB}"
