# shellcheck shell=bash disable=SC2034 # the exit codes are used by the scripts that source this file
# Helpers shared by the recovery scripts: sourced, never run.
#
# The scripts need only bash, curl and Python (the project's venv, else python3). JSON is
# read with Python, never jq. The admin token is handed to curl on stdin as a header file,
# so it never appears in a process listing, a log or the output.

set -uo pipefail

# Exit codes, the same in every script (each script's --help lists the ones it uses).
readonly EXIT_OK=0          # healthy for this concern afterwards
readonly EXIT_FAILING=1     # still failing after the action
readonly EXIT_UNREACHABLE=2 # the bot's HTTP API did not answer
readonly EXIT_AUTH=3        # the admin token is missing or was refused
readonly EXIT_USAGE=4       # bad command line
readonly EXIT_DEFAULTS=5    # datastore only: a file came back as defaults (its data is lost)
readonly EXIT_IN_USE=6      # datastore --offline only: a running bot holds DATA_DIR's lock

SCRIPT_NAME=$(basename -- "$0")
REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
BOT_API_URL=${BOT_API_URL:-http://127.0.0.1:3000}
BOT_API_URL=${BOT_API_URL%/}
BOT_HTTP_TIMEOUT=${BOT_HTTP_TIMEOUT:-30}

# The project's Python: $BOT_PYTHON (relative paths from the repo root), else the venv, else python3.
_find_python() {
    local candidate=${BOT_PYTHON:-.venv/bin/python}
    [[ $candidate == /* ]] || candidate=$REPO_ROOT/$candidate
    if [[ -x $candidate ]]; then
        PY=$candidate
    elif command -v python3 >/dev/null 2>&1; then
        PY=$(command -v python3)
    else
        echo "$SCRIPT_NAME: no Python found (set BOT_PYTHON or create .venv)" >&2
        exit "$EXIT_USAGE"
    fi
}
_find_python

_WORK=$(mktemp -d "${TMPDIR:-/tmp}/bot-recovery.XXXXXX")
trap 'rm -rf -- "$_WORK"' EXIT

# die CODE MESSAGE: one line on stderr, then exit CODE.
die() {
    local code=$1
    shift
    echo "$SCRIPT_NAME: $*" >&2
    exit "$code"
}

# note MESSAGE: progress for the operator (stdout keeps the report).
note() {
    echo "$*"
}

# usage_error MESSAGE: a bad command line.
usage_error() {
    die "$EXIT_USAGE" "$* (see --help)"
}

# need_value OPTION VALUE: the option's value is present.
need_value() {
    [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"
}

# need_number OPTION VALUE: the value is a non-negative number.
need_number() {
    need_value "$@"
    [[ $2 =~ ^[0-9]+([.][0-9]+)?$ ]] || usage_error "$1 needs a number, got '$2'"
}

# api METHOD PATH [JSON]: call the bot's HTTP API; POSTs carry the admin token (GETs too when
# API_AUTH=1: `API_AUTH=1 api_ok GET /api/traces`).
# Sets API_CODE (HTTP status, 000 when nothing answered) and API_BODY (the response text).
# Returns 0 when the bot answered (whatever the status), 1 when it did not.
api() {
    local method=$1 path=$2 body=${3-} rc=0
    local args=(-sS -o "$_WORK/body" -w '%{http_code}' -X "$method"
        --max-time "$BOT_HTTP_TIMEOUT" --connect-timeout 5)
    if [[ $method == POST ]]; then
        [[ -n $body ]] || body='{}'
        args+=(-H 'Content-Type: application/json' --data-binary "$body")
    fi
    : >"$_WORK/body"
    if [[ ($method == POST || ${API_AUTH:-0} == 1) && -n ${BOT_ADMIN_TOKEN:-} ]]; then
        # printf is a builtin: the token goes through a pipe, never an argument list.
        API_CODE=$(printf 'Authorization: Bearer %s\n' "$BOT_ADMIN_TOKEN" |
            curl "${args[@]}" -H @- -- "$BOT_API_URL$path" 2>"$_WORK/curl.err") || rc=$?
    else
        API_CODE=$(curl "${args[@]}" -- "$BOT_API_URL$path" 2>"$_WORK/curl.err" </dev/null) || rc=$?
    fi
    API_BODY=$(cat "$_WORK/body")
    if [[ $rc -ne 0 || $API_CODE == 000 ]]; then
        API_CODE=000
        API_ERROR=$(head -n 1 "$_WORK/curl.err")
        return 1
    fi
    return 0
}

# api_ok METHOD PATH [JSON]: like api, but exits 2 when the bot does not answer and 3 when the
# token is refused, and fails (returns 1) on any other status that is not 2xx.
api_ok() {
    if ! api "$@"; then
        die "$EXIT_UNREACHABLE" "bot unreachable at $BOT_API_URL ($API_ERROR)"
    fi
    case $API_CODE in
        2??) return 0 ;;
        401 | 403)
            if [[ -z ${BOT_ADMIN_TOKEN:-} ]]; then
                die "$EXIT_AUTH" "$1 $2 refused (HTTP $API_CODE): BOT_ADMIN_TOKEN is not set"
            fi
            die "$EXIT_AUTH" "$1 $2 refused (HTTP $API_CODE): the admin token was not accepted"
            ;;
    esac
    return 1
}

# require_token: admin actions need BOT_ADMIN_TOKEN (checked before doing anything).
require_token() {
    [[ -n ${BOT_ADMIN_TOKEN:-} ]] ||
        die "$EXIT_AUTH" "BOT_ADMIN_TOKEN is not set (the bot's ADMIN_API_TOKEN); admin actions need it"
}

# json CODE [ARG...]: run Python CODE with the last response parsed as `d` (ARGs in sys.argv[1:]).
# Helpers for CODE: get("a.b.0.c", default), find(key) (first match at any depth), breakers(d),
# out(*values) (tab-separated, None as empty), rec(*values) (for `IFS=$'\x1f' read`).
json() {
    printf '%s' "$API_BODY" | "$PY" -c "$_PY_PRELUDE
$1" "${@:2}"
}

# error_text: the "error"/"message" of an error response, else its first 200 characters.
error_text() {
    json 'out(get("message") or get("error") or RAW[:200])' 2>/dev/null ||
        printf '%s' "${API_BODY:0:200}"
}

# wait_until SECONDS FUNCTION: call FUNCTION every 0.25 s until it succeeds or time runs out.
wait_until() {
    local deadline=$((SECONDS + ${1%.*} + 1)) fn=$2
    while true; do
        "$fn" && return 0
        ((SECONDS >= deadline)) && return 1
        sleep 0.25
    done
}

# load_circuits: GET /api/health/circuits into CIRCUITS, one "name<TAB>state" line per breaker.
# Call it at the top level, never inside $(...): its exits must end the script.
load_circuits() {
    api_ok GET /api/health/circuits || die "$EXIT_FAILING" "GET /api/health/circuits: HTTP $API_CODE $(error_text)"
    CIRCUITS=$(json 'for r in breakers(d): out(r.get("name"), r.get("state"))')
}

# circuit_state NAME: the state of breaker NAME in CIRCUITS ("" if there is none).
circuit_state() {
    awk -F '\t' -v name="$1" '$1 == name { print $2 }' <<<"$CIRCUITS"
}

# shellcheck disable=SC2016 # Python source, not shell
_PY_PRELUDE='import json, sys
RAW = sys.stdin.read()
try:
    d = json.loads(RAW)
except ValueError:
    d = None

def get(path, default=None, root=None):
    node = d if root is None else root
    for part in str(path).split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return default
    return node

def find(key, node=None):
    """The first value under ``key`` anywhere in the response, breadth first (None if absent)."""
    queue = [d if node is None else node]
    while queue:
        item = queue.pop(0)
        if isinstance(item, dict):
            if key in item:
                return item[key]
            queue.extend(item.values())
        elif isinstance(item, list):
            queue.extend(item)
    return None

def breakers(node):
    """The breaker rows of a circuits response: a list, or under "breakers"/"circuits"."""
    if isinstance(node, dict):
        for key in ("breakers", "circuits"):
            if key in node:
                return breakers(node[key])
        return [dict(v, name=k) if isinstance(v, dict) else {"name": k, "state": v} for k, v in node.items()]
    return [r for r in node or [] if isinstance(r, dict)]

def out(*values):
    print(*["" if v is None else v for v in values], sep="\t")

def rec(*values):
    """One record for `IFS=$'\\x1f' read -r A B ...`: unlike tabs, the separator keeps empty fields."""
    print(*["" if v is None else v for v in values], sep="\x1f")
'
