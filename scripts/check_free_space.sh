#!/usr/bin/env bash
# Warns (never fails) when the file systems that `make venv` writes to have less free space
# than a fresh install needs: the virtual environment (torch's CUDA build and its NVIDIA
# wheels, about 6.3 GB), pip's unpacked copies in TMPDIR while it installs, and pip's cache
# of downloaded wheels. With --df, prints `df -h` of those file systems instead (after pip failed).
#   usage: check_free_space.sh [--df] VENV_DIR [NEEDED_GB]
set -u
show_df=0
if [ "${1:-}" = "--df" ]; then show_df=1; shift; fi
venv_dir="${1:-.venv}"
needed_gb="${2:-8}"
[[ "$needed_gb" =~ ^[0-9]+$ ]] || { echo "check_free_space.sh: NEEDED_GB must be a whole number of GB, got '$needed_gb'; not checked" >&2; exit 0; }

# The nearest existing folder at or above a path (the venv or pip's cache may not exist yet).
existing() {
  local dir="$1"
  while [ ! -d "$dir" ] && [ "$dir" != "/" ] && [ "$dir" != "." ]; do dir="$(dirname "$dir")"; done
  echo "$dir"
}

dirs=("$(existing "$venv_dir")" "$(existing "${TMPDIR:-/tmp}")"
      "$(existing "${PIP_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/}/.cache}/pip}")")
if [ "$show_df" = 1 ]; then
  df -h "${dirs[@]}" 2>/dev/null | awk 'NR == 1 || !seen[$0]++'
  exit 0
fi
seen_mounts=""
for dir in "${dirs[@]}"; do
  read -r free_kb mount < <(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print $4, $6 }')
  [ -n "${free_kb:-}" ] || continue
  case " $seen_mounts " in *" $mount "*) continue ;; esac  # one warning per file system
  seen_mounts="$seen_mounts $mount"
  if [ "$free_kb" -lt $((needed_gb * 1024 * 1024)) ]; then
    echo "warning: $((free_kb / 1024 / 1024)) GB free on the file system of $dir ($mount); a fresh" \
         "'make venv' needs about $needed_gb GB in all for .venv, pip's temporary files (TMPDIR) and its" \
         "wheel cache (PIP_CACHE_DIR); pip may stop with 'No space left on device'." >&2
  fi
done
exit 0
