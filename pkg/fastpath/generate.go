package fastpath

// The compiled programs and their Go bindings are committed so that `go build`
// needs no clang; `make generate` reproduces them byte for byte (CI checks).
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v2" -target bpfel -tags linux -type fp_key -type fp_sock -type fp_counters fastpath ../../bpf/fastpath.c -- -nostdinc -I../../bpf/include
