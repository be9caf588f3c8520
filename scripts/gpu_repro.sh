#!/usr/bin/env bash
# Run `dvc repro` on the GPU machine, detached, so that it outlives the command that starts it.
#
#   scripts/gpu_repro.sh [DVC REPRO ARGS...]      # from the repository root, after `cepe use-profile gpu`
#
# Starts `dvc repro ARGS` in its own session (setsid nohup) and returns at once. Every line of its
# output goes to reports/repro.log prefixed with the Unix time it was written (`cepe results`
# reads the stage wall times from it); reports/repro.pid holds the session's process id and
# reports/repro.rc the exit status once it ends. Poll with `tail reports/repro.log` and
# `cat reports/repro.rc`. Run it again after a lost machine: finished stages are cached, a
# training stage resumes from its newest checkpoint (`--resume auto`), the rest re-run.
# Without a `cepe` command on PATH (the project not installed), it puts one there that runs this
# checkout's `python -m cepe_cli.main`; outside a git checkout it sets DVC's core.no_scm locally.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
if [ -e reports/repro.pid ] && kill -0 "$(cat reports/repro.pid)" 2>/dev/null; then
    echo "dvc repro is still running (pid $(cat reports/repro.pid)); see reports/repro.log" >&2
    exit 1
fi
command -v dvc >/dev/null || { echo "dvc is not installed (pip install dvc)" >&2; exit 2; }
# a copy of the tree without .git: DVC runs without an SCM (.dvc/config.local, not committed)
git rev-parse --git-dir >/dev/null 2>&1 || dvc config --local core.no_scm true
if ! command -v cepe >/dev/null; then
    mkdir -p .gpu/bin
    py=$(command -v python3 || command -v python)
    printf '#!/usr/bin/env bash\nexec env PYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" "%s" -m cepe_cli.main "$@"\n' "$PWD" "$py" > .gpu/bin/cepe
    chmod +x .gpu/bin/cepe
    export PATH="$PWD/.gpu/bin:$PATH"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
rm -f reports/repro.rc
{ echo "$(date +%s) \$ dvc repro $*"; } > reports/repro.log
setsid nohup bash -c '
    set -o pipefail
    dvc repro "$@" 2>&1 | while IFS= read -r line; do printf "%s %s\n" "$(date +%s)" "$line"; done >> reports/repro.log
    echo $? > reports/repro.rc
' gpu_repro "$@" < /dev/null > /dev/null 2>&1 &
echo $! > reports/repro.pid
echo "dvc repro started (pid $(cat reports/repro.pid)); log: reports/repro.log, exit status: reports/repro.rc"
