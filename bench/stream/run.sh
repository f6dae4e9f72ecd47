#!/bin/sh
# bench/stream: relayd's stream data plane vs direct, HAProxy (TCP mode) and stunnel (TLS).
#   sh bench/stream/run.sh [--rounds 3] [--seconds 10] [--out results.json]
# Installs the Debian tools it compares against (haproxy, stunnel4, iperf3) if missing. A tool
# that cannot be installed is reported and its paths skipped (iperf3 is needed for all).
set -eu
cd "$(dirname "$0")/../.."
missing=""
for tool in haproxy stunnel4 iperf3; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
if [ -n "$missing" ]; then
    # the packages' services are not wanted: policy-rc.d 101 keeps them from starting
    ours=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && ours=1
    fi
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; } ||
        echo "bench/stream: could not install$missing; the paths that need them will be skipped" >&2
    [ -z "$ours" ] || rm -f /usr/sbin/policy-rc.d
fi
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" bench/stream/run.py "$@"
