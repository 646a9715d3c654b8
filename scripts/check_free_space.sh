#!/usr/bin/env bash
# Warns (never fails) when the file systems that `make venv` writes to have less free space
# than a fresh install needs: the virtual environment (torch's CUDA build and its NVIDIA
# wheels, about 6.3 GB) plus pip's unpacked copies in TMPDIR while it installs.
#   usage: check_free_space.sh VENV_DIR NEEDED_GB
set -u
venv_dir="$1"
needed_gb="$2"
parent="$(dirname "$(realpath -m "$venv_dir")")"
tmp_dir="${TMPDIR:-/tmp}"
seen_mounts=""
for dir in "$parent" "$tmp_dir"; do
  [ -d "$dir" ] || continue
  read -r free_kb mount < <(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print $4, $6 }')
  [ -n "${free_kb:-}" ] || continue
  case " $seen_mounts " in *" $mount "*) continue ;; esac  # one warning per file system
  seen_mounts="$seen_mounts $mount"
  if [ "$free_kb" -lt $((needed_gb * 1024 * 1024)) ]; then
    echo "warning: $((free_kb / 1024 / 1024)) GB free on the file system of $dir ($mount); a fresh" \
         "'make venv' needs about $needed_gb GB there (.venv, and pip's temporary files in" \
         "TMPDIR); pip may stop with 'No space left on device'." >&2
  fi
done
exit 0
