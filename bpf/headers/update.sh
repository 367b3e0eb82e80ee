#!/usr/bin/env bash
# Refreshes the vendored headers from Debian's libbpf-dev (libbpf's helper
# headers) and linux-libc-dev (the BPF UAPI). Vendoring them keeps
# `make generate` byte-for-byte reproducible whatever the build host has.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p bpf linux

for h in bpf_helpers.h bpf_helper_defs.h bpf_endian.h bpf_core_read.h bpf_tracing.h; do
	install -m 0644 "/usr/include/bpf/$h" "bpf/$h"
done
install -m 0644 /usr/include/linux/bpf.h /usr/include/linux/bpf_common.h linux/

dpkg-query -W -f='${Package} ${Version}\n' libbpf-dev linux-libc-dev >VERSIONS
