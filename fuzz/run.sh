#!/usr/bin/env bash
# Runs each fuzz target for a while: fuzz/run.sh [SECONDS] [TARGET...]
# (default 600 s each, every target). New interesting inputs go to fuzz/work/<target>
# (not committed); a crash stops the target and leaves its input in fuzz/artifacts/<target>.
# Copy a crash input into fuzz/regressions/<target>/ once fixed: the replay test keeps it.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(quic_frames codec apply wal config)
fi
status=0
for t in "${targets[@]}"; do
    mkdir -p "work/$t"
    echo "== $t for ${seconds}s"
    if ! cargo +nightly fuzz run "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1; then
        echo "== $t: FAILED (see fuzz/artifacts/$t)"
        status=1
    fi
done
exit $status
