# sockredir: accelerate TCP between local sockets with sock_ops + sk_msg.
# `make help` lists the targets.

GO      ?= go
BUILD   := build
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
# Each direction of each end-to-end connection carries this much inside the
# emulated kernels and in test-kernels' host column, and the large-transfer
# test this much (test-host uses the tests' defaults: 128 MiB and 4 GiB).
VM_TEST_BYTES ?= 8388608
VM_LARGE_BYTES ?= 67108864

# Debian packages for building the BPF objects and for the tests.
DEPS := clang llvm libbpf-dev bpftool linux-libc-dev iproute2 \
	qemu-system-x86 busybox-static xz-utils \
	redis-server redis-tools nginx-light curl haproxy iperf3 socat sockperf wrk

.DEFAULT_GOAL := help
.PHONY: help deps build generate check-generate test test-host test-kernels up down status vet bench bench-apps

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## Install the Debian packages the build and tests need (root; skipped when present)
	@missing=$$(for p in $(DEPS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: ## Build build/sockredir (no clang needed: the BPF objects are committed)
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o $(BUILD)/sockredir ./cmd/sockredir

generate: ## Rebuild the BPF objects and their Go bindings from bpf/ (needs clang)
	$(GO) generate ./pkg/...

check-generate: generate ## Fail if the committed BPF objects don't match their sources
	@git diff --exit-code --stat -- '*.o' '*_bpfel.go' || \
		{ echo "the committed BPF objects differ from bpf/: run 'make generate' and commit"; exit 1; }

vet: ## Run go vet and check formatting
	$(GO) vet ./...
	@test -z "$$(gofmt -l .)" || { gofmt -l .; echo "run gofmt -w"; exit 1; }

test: deps vet test-host test-kernels ## Run the whole test suite: unit and end-to-end, on this kernel, 6.1 and 6.12 (root)

test-host: ## Unit tests and the end-to-end tests on this host's kernel, real applications included (root)
	SOCKREDIR_REQUIRE_APPS=1 $(GO) test -count=1 -timeout 20m ./...

test-kernels: ## The end-to-end tests on this kernel and inside Debian's 6.1 and 6.12 under qemu: one table (root)
	mkdir -p $(BUILD)
	CGO_ENABLED=0 $(GO) test -c -o $(BUILD)/e2e.test ./test
	$(MAKE) build
	$(GO) run ./test/kernels --host --timeout 25m --bin $(BUILD)/e2e.test --bin $(BUILD)/sockredir \
		--env SOCKREDIR_TEST_BYTES=$(VM_TEST_BYTES) --env SOCKREDIR_TEST_LARGE_BYTES=$(VM_LARGE_BYTES) \
		--json $(BUILD)/kernel-matrix.json --markdown $(BUILD)/kernel-matrix.md \
		-- /bin/e2e.test -test.v -test.timeout 20m -test.skip 'TestBench'

bench: build ## Compare TCP, sockredir, its hooks alone and AF_UNIX on this host (root; ~4 min, chart in build/)
	$(BUILD)/sockredir bench --chart $(BUILD)/benchmarks.svg

bench-apps: ## The same comparison with iperf3, sockperf, redis-benchmark and wrk via haproxy to nginx (root)
	GO=$(GO) sh test/apps/bench-apps.sh

up: build ## Build and accelerate the whole cgroup v2 hierarchy with the daemon, until Ctrl-C (root)
	$(BUILD)/sockredir daemon --down-on-exit

down: build ## Detach without losing queued bytes (root)
	$(BUILD)/sockredir down

status: build ## Show what is attached and its counters (root)
	$(BUILD)/sockredir status
