package datapath

// The compiled programs and their Go bindings are committed so that `go build`
// needs no clang; `make generate` reproduces them byte for byte (CI checks).
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v2" -target bpfel -tags linux -type config -type cfg_flag -type tc_mode -type pod_setup -type counters -type flow -type dns_key -type dns_dest -type direct_flow -type addr -type pod_info -type node_info -type proxy_cgroup capture ../../bpf/capture.c -- -nostdinc -I../../bpf/include
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v2" -target bpfel -tags linux podentry ../../bpf/podentry.c -- -nostdinc -I../../bpf/include
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v2" -target bpfel -tags linux -type probe_result -type probe_stage reuseprobe ../../bpf/reuseprobe.c -- -nostdinc -I../../bpf/include
