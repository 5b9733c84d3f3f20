//go:build !linux

// Command ambpf-demo runs only on Linux: it needs network namespaces and
// eBPF.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "ambpf-demo: Linux only (network namespaces, eBPF)")
	os.Exit(1)
}
