#!/bin/sh
# Compares plain TCP, sockredir and (for redis) AF_UNIX with iperf3, sockperf,
# redis-benchmark and wrk through haproxy in front of nginx: `make bench-apps`.
# Installs the Debian packages it needs, then runs test/apps (root).
# Arguments go to test/apps: -rounds N, -duration D, -tools LIST, -json.
set -eu
cd "$(dirname "$0")/../.."
need="iperf3 sockperf redis-server redis-tools haproxy nginx-light wrk"
missing=""
for p in $need; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
	echo "installing:$missing" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
fi
exec ${GO:-go} run ./test/apps "$@"
