#!/usr/bin/env bash
# Runs every benchmark once, side by side, and leaves the tables in
# target/bench-results/. Installs Debian's nginx first when missing (it is
# the baseline of the HTTP benchmark). Loopback only; every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null || apt-get install -y -qq nginx >/dev/null
    else
        echo "nginx is not installed and this is not root: the nginx baseline is skipped" >&2
    fi
fi
# nginx's packaged service is not wanted; the benchmark starts its own.
(service nginx stop || true) >/dev/null 2>&1
cargo bench --bench http_load --bench smtp_load --bench token_scale --bench footprint
cargo bench --bench hot_path -- --warm-up-time 1 --measurement-time 3
echo
echo "Results: target/bench-results/*.md"
