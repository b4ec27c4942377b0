#!/usr/bin/env bash
# Regenerate qaclims/ from the notebooks and fail if that changed anything:
# the committed package must be exactly what the notebooks export.
set -euo pipefail
bin=${1:-.venv/bin}
digest() { find qaclims -name '*.py' -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum; }
before=$(digest)
"$bin/nbdev-export"
after=$(digest)
if [ "$before" != "$after" ]; then
  echo "ERROR: qaclims/ did not match the notebooks in nbs/." >&2
  echo "       nbdev-export has now regenerated it; review and commit qaclims/ (never edit it by hand)." >&2
  git status --short -- qaclims 2>/dev/null >&2 || true
  exit 1
fi
echo "qaclims/ matches the notebooks."
