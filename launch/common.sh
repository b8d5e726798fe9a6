# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): dry runs, quoting, errors.
#
# `run CMD ARGS...` prints `+ CMD ARGS...` (shell-quoted, one command per line) and runs it, unless
# DRY_RUN=1, when it only prints. Tests read these lines back with `shlex.split`.

DRY_RUN="${DRY_RUN:-0}"
SCRIPT_NAME="${SCRIPT_NAME:-$(basename "$0")}"

die() {
  echo "$SCRIPT_NAME: $*" >&2
  exit 2
}

# Words joined by spaces, each single-quoted unless it is plainly safe; `bash -c` and shlex read it back.
quote() {
  local words=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

run() {
  echo "+ $(quote "$@")"
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  "$@"
}

# `need_value "$@"` while parsing options: fails unless the option in $1 is followed by a value.
need_value() {
  [[ $# -ge 2 ]] || die "$1 needs a value"
}

# `require_command NAME HINT`: fails with HINT unless NAME is on PATH (skipped in dry runs).
require_command() {
  [[ "$DRY_RUN" == 1 ]] && return 0
  command -v "$1" >/dev/null || die "$1 not found; $2"
}
