#!/usr/bin/env bash
# Wait up to $1 seconds (default 540) for /tmp/arms/all.done, then copy the arms' reports, logs and timeline to $OUT
# (one tarball: at most 8 files come back from a call). Run in every call after arms.sh started.
w=${WORK:-/tmp/arms}; limit=${1:-540}; start=$(date +%s)
while [ ! -e "$w/all.done" ] && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 15; done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader > "$w/gpu_now.txt" 2>&1
(cd "$w" && tar -czf "$OUT/arms.tgz" --exclude='*/models' --exclude='*/data' --exclude='*/.venv' --exclude='*/src' \
  --exclude='*/benchmarks' --exclude='*/stages' --exclude='*/wenyan' --exclude='*/tools' --exclude='*/tests' \
  $(ls -d */reports 2>/dev/null) *.log *.txt bench 2>/dev/null)
cat "$w/timeline.txt"; tail -3 "$w"/*.log | cut -c1-300; ls -la "$OUT"
