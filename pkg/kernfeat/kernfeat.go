//go:build linux

// Package kernfeat probes the running kernel for features ambpf depends on
// that no BPF program can be loaded to test, from what the kernel itself
// exposes rather than from its version number (a distribution kernel may
// carry a feature back to an older version, or build without it). It links
// no BPF library, so the proxy uses it without linking the datapath.
package kernfeat

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"sync"
)

// kallsyms lists the kernel's symbols; their names are readable without
// privileges (only the addresses are hidden).
const kallsyms = "/proc/kallsyms"

// reusePortSymbol came with bpf_sk_assign's support for SO_REUSEPORT
// listeners (Linux 6.6, "bpf, net: Support SO_REUSEPORT sockets with
// bpf_sk_assign"): the series exported the reuseport group lookup under
// this name so that a socket assigned by a TC program is sent through its
// group. Kernels before it refuse a reuseport listener with
// -ESOCKTNOSUPPORT, and there the lookup was a static function named
// lookup_reuseport.
const reusePortSymbol = "inet_lookup_reuseport"

var reusePort = sync.OnceValues(func() (bool, error) {
	f, err := os.Open(kallsyms)
	if err != nil {
		return false, err
	}
	defer f.Close()
	return hasSymbol(f, reusePortSymbol)
})

// ReusePortAssign reports whether bpf_sk_assign accepts SO_REUSEPORT
// listeners on the running kernel. Without it a proxy listening with
// SO_REUSEPORT has every captured connection dropped, so the answer is
// false when the kernel's symbols cannot be read: that only costs the
// proxy its SO_REUSEPORT upgrade handoff. The probe runs once per process.
func ReusePortAssign() bool {
	ok, err := reusePort()
	return err == nil && ok
}

// ReusePortAssignErr is ReusePortAssign with the reason the probe could
// not answer, for logs.
func ReusePortAssignErr() (bool, error) {
	ok, err := reusePort()
	if err != nil {
		return false, fmt.Errorf("probe SO_REUSEPORT with bpf_sk_assign: %w", err)
	}
	return ok, nil
}

// hasSymbol reports whether the kallsyms listing r names the kernel symbol
// name (in the kernel proper: module symbols carry a [module] suffix).
func hasSymbol(r io.Reader, name string) (bool, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	want := []byte(name)
	for sc.Scan() {
		// "<address> <type> <name>[\t[module]]"
		f := bytes.Fields(sc.Bytes())
		if len(f) == 3 && bytes.Equal(f[2], want) {
			return true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("read %s: %w", kallsyms, err)
	}
	return false, nil
}
