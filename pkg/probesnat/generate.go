package probesnat

// The compiled programs and their Go bindings are committed so that `go build`
// needs no clang; `go generate ./pkg/probesnat/` reproduces them byte for byte.
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v2" -target bpfel -tags linux -type probe_key -type probe_orig -type probe_counters -type probe_info -type tc_mode -type probe_setup -type probe_node_info -type addr hostprobe ../../bpf/hostprobe.c -- -nostdinc -I../../bpf/include
