# ambpf — eBPF traffic capture for sidecar-less service meshes.
# `make demo` runs the main job, `make test` passes the tests; both install
# what they need on a fresh Debian machine (as root).

SHELL := /bin/bash
.DEFAULT_GOAL := help

CLANG ?= clang-19
GO ?= go
BIN := bin
TOOLS := $(CURDIR)/.cache/tools
STATICCHECK_VERSION ?= v0.8.2
APT_PACKAGES := clang-19 llvm-19 bpftool iptables nftables iproute2 tcpdump iperf3
# The real node of make e2e-node: Debian's containerd (1.6, with ctr and
# the runc v2 shim) and runc.
NODE_APT_PACKAGES := containerd runc
GOTEST_FLAGS ?= -count=1 -timeout 20m
# SOAKTIME is how long make soak churns (SOAKMIN: its minutes, for the
# go test timeout).
SOAKTIME ?= 10m
SOAKMIN ?= $(patsubst %m,%,$(filter %m,$(SOAKTIME)))$(if $(filter %m,$(SOAKTIME)),,1)
# FUZZTIME is how long make fuzz runs each fuzz target (make fuzz-ci: 30s).
FUZZTIME ?= 5m

export PATH := $(TOOLS):$(PATH)
export GOFLAGS := -buildvcs=false

.PHONY: help deps test-deps generate check-generate build image e2e-node e2e-node-scale test fuzz-ci fuzz soak lint demo bench bench-scale bench-mesh bench-fastpath kernel-matrix clean

help: ## Show the targets.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## Install what is missing: Debian packages (clang-19, bpftool, iptables, ...) and Go tools.
	@hack/deps.sh $(APT_PACKAGES)
	@mkdir -p $(TOOLS)
	@test -x $(TOOLS)/staticcheck || { echo ">> installing staticcheck $(STATICCHECK_VERSION)"; GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION); }

BPF_PACKAGES := ./pkg/datapath ./pkg/probesnat ./pkg/fastpath

generate: ## Rebuild the BPF objects and Go bindings with bpf2go (needs clang-19).
	$(GO) generate $(BPF_PACKAGES)

check-generate: generate ## Fail if the committed bpf2go output differs from a fresh build.
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
		git diff --exit-code --stat -- $(BPF_PACKAGES) || { echo "generated BPF files are stale: run make generate and commit"; exit 1; }; \
	fi

build: ## Build the binaries into bin/.
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/...

image: ## Build the chart's image (ghcr.io/ambpf/ambpf:<appVersion>, TAG=... overrides), the e2e app and pause images as OCI tarballs in .cache/images (no Docker; reproducible).
	@hack/image/build.sh >/dev/null

e2e-node: deps ## Real node (kubelet+containerd+runc+bridge CNI, hack/node): helm install the chart and test it end to end (pkg/nodee2e; root).
	@hack/deps.sh $(NODE_APT_PACKAGES)
	@hack/tools.sh
	@AMBPF_KUBE_NODE=1 hack/kube/build.sh >/dev/null
	@hack/image/build.sh >/dev/null
	AMBPF_E2E_NODE=1 AMBPF_KUBE_NODE=1 $(GO) test -count=1 -v -timeout 30m ./pkg/nodee2e

e2e-node-scale: deps ## The real node filled to kubelet's 110 pods, all enrolled, the agent's memory cgroup measured (minutes; not in .ci/run).
	@hack/deps.sh $(NODE_APT_PACKAGES)
	@hack/tools.sh
	@AMBPF_KUBE_NODE=1 hack/kube/build.sh >/dev/null
	@hack/image/build.sh >/dev/null
	AMBPF_E2E_NODE=1 AMBPF_E2E_NODE_SCALE=1 AMBPF_KUBE_NODE=1 $(GO) test -count=1 -v -timeout 40m -run TestRealNodeMaxPods ./pkg/nodee2e

lint: deps ## gofmt, go vet, staticcheck.
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	staticcheck ./...
	cd hack/image && $(GO) vet ./... && staticcheck ./...

test-deps: deps ## Build what the tests run: CNI plugins and cnitool, etcd, kube-apiserver, kubectl, helm (cached in .cache/).
	@hack/tools.sh
	@hack/kube/build.sh >/dev/null

test: test-deps check-generate lint ## Run every test (privileged ones need root), then every fuzz target for 30 s.
	$(GO) test $(GOTEST_FLAGS) ./...
	cd hack/image && $(GO) test $(GOTEST_FLAGS) ./...
	@$(MAKE) --no-print-directory fuzz-ci

fuzz-ci: ## Run every Go fuzz target (found by hack/fuzz.sh) for 30 s each, as make test does.
	@GO=$(GO) FUZZTIME=30s hack/fuzz.sh

fuzz: ## Run every Go fuzz target for FUZZTIME each (default 5m; hack/fuzz.sh -l lists them).
	@GO=$(GO) FUZZTIME=$(FUZZTIME) hack/fuzz.sh

soak: deps ## Churn connections and pods through the real binaries for SOAKTIME (default 10m), then check for leaks (make test runs 3 s of it).
	$(GO) test -count=1 -timeout $$(( $(SOAKMIN) + 10 ))m -v -run '^TestSoak$$' ./pkg/proxy -args -soak=$(SOAKTIME)

demo: deps build ## Run the demo: two nodes, pods made by CNI, captured by the eBPF datapath, HBONE on one node and across nodes.
	@hack/demo.sh

bench: deps ## Measure eBPF vs iptables vs no capture, the node scale (bench-scale), then the whole mesh path (bench-mesh); updates docs/BENCHMARKS.md (~10 min).
	$(GO) run ./hack/bench/cmd/benchreport
	$(GO) run ./hack/bench/cmd/benchreport -suite scale
	$(GO) run ./hack/bench/cmd/benchreport -suite mesh

bench-scale: deps ## Measure node scale: enrolment with 1/100/250 pods enrolled, bursts of 100, BPF memory, RR at 1 vs 250 pods, agent and proxy RSS at 250 pods; updates docs/BENCHMARKS.md (~5 min).
	$(GO) run ./hack/bench/cmd/benchreport -suite scale

bench-mesh: deps ## Measure the mesh path through the real agent and proxy: none/pass/mesh-h2/mesh-h3; updates docs/BENCHMARKS.md (~3 min).
	$(GO) run ./hack/bench/cmd/benchreport -suite mesh

bench-fastpath: ## Measure capture + proxy without and with the in-pod fast path (off, to-proxy, both), interleaved; prints the docs/BENCHMARKS.md table (~2 min).
	$(GO) test -count=1 -run '^TestBenchFastPath$$' -v ./pkg/fastpath -fastpath-bench -fastpath-bench-rounds=$(or $(ROUNDS),5)

kernel-matrix: ## Run the datapath tests (and, on 5.10 and the newest, the netlink churn and proxy upgrade tests) inside Debian kernels 5.10, 6.1, 6.12 and the newest with virtme-ng (root; ~20-30 min under emulation).
	@hack/kernel-matrix/run.sh

clean: ## Remove build output.
	rm -rf $(BIN) .cache
