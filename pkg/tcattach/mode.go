//go:build linux

// Package tcattach attaches eBPF programs to a device's TC hooks, the same
// way for every ambpf program family: as tcx links on kernels that have
// them (>= 6.6), else as clsact filters with a private priority and handle.
// It also probes whether the running kernel has tcx (HaveTCX), detaches
// pinned links, and reads their state back.
//
// Functions that take an ifindex act in the network namespace of the
// calling thread: run them inside netns.NS.Do for another namespace.
package tcattach

import "fmt"

// Mode is how TC programs are attached to a device.
type Mode uint32

const (
	// ModeTCX attaches through tcx links (kernel >= 6.6): pinnable, chain
	// safely with other programs, replaced atomically.
	ModeTCX Mode = 1
	// ModeClsact attaches as clsact filters with a private priority and
	// handle, for kernels without tcx.
	ModeClsact Mode = 2
)

func (m Mode) String() string {
	switch m {
	case ModeTCX:
		return "tcx"
	case ModeClsact:
		return "clsact"
	}
	return fmt.Sprintf("mode(%d)", uint32(m))
}
