//go:build linux

package probesnat

import (
	"errors"
	"fmt"
	"os"

	"github.com/ambpf/ambpf/pkg/bpfobj"
)

// Memory is the kernel memory the probe SNAT's BPF objects hold, as the
// kernel accounts it (the memlock of each map and program).
type Memory struct {
	// Node is the shared part: the programs and the node-wide maps,
	// including every device's entries in them (the hash maps are not
	// preallocated, so their memlock follows the entries).
	Node uint64 `json:"node_bytes"`
	// Interfaces is the per-device part, summed: the own programs and
	// maps of devices a per-pod build attached and not yet migrated. A
	// device attached by this build has only its links, which run the
	// node's programs and hold no memlock of their own.
	Interfaces uint64 `json:"interfaces_bytes"`
	// Attached is how many devices the figures cover.
	Attached int `json:"attached"`
}

// Total is Node + Interfaces.
func (m Memory) Total() uint64 { return m.Node + m.Interfaces }

// PerInterface is Total divided by the devices attached (the node's
// share included); 0 with none.
func (m Memory) PerInterface() uint64 {
	if m.Attached == 0 {
		return 0
	}
	return m.Total() / uint64(m.Attached)
}

// Memory reads what the node's and every device's BPF objects hold now.
func (l *Loader) Memory() (Memory, error) {
	var out Memory
	node, err := bpfobj.PinnedMemory(l.NodeDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return out, err
	}
	out.Node = node
	names, err := l.names()
	if err != nil {
		return out, fmt.Errorf("memory: %w", err)
	}
	for _, name := range names {
		dir := l.Dir(name)
		out.Attached++
		if !isLegacy(dir) {
			continue
		}
		b, err := bpfobj.PinnedMemory(dir)
		if errors.Is(err, os.ErrNotExist) {
			out.Attached-- // detached meanwhile
			continue
		}
		if err != nil {
			return out, err
		}
		out.Interfaces += b
	}
	return out, nil
}
