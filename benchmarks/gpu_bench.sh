#!/usr/bin/env bash
# Kept for old notes: issue 8's device check (`cfmae bench` eager and compiled at batch 256, the masks, the data
# path) is now four phases of gpu_check.sh, time-boxed and in its table. Options pass through (--out, --work, ...).
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_check.sh" --only setup,step_eager,step_compiled,data,masks "$@"
