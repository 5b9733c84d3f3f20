//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/ambpf/ambpf/pkg/bpfobj"
)

// Memory is the kernel memory the datapath's BPF objects hold, as the
// kernel accounts it (the memlock of each map and program, which is what
// is charged to the memory cgroup of whoever created them).
type Memory struct {
	// Node is the shared part: the capture programs and every node-wide
	// map, including the proxy cgroup set.
	Node uint64 `json:"node_bytes"`
	// Pods is the per-pod part, summed: each pod's entry programs and
	// its pod_index map.
	Pods uint64 `json:"pods_bytes"`
	// Enrolled is how many pods the figures cover.
	Enrolled int `json:"enrolled"`
}

// Total is Node + Pods.
func (m Memory) Total() uint64 { return m.Node + m.Pods }

// PerPod is Total divided by the pods enrolled (the node's share
// included); 0 with no pod.
func (m Memory) PerPod() uint64 {
	if m.Enrolled == 0 {
		return 0
	}
	return m.Total() / uint64(m.Enrolled)
}

// Memory reads what the node's and every pod's BPF objects hold now.
func (l *Loader) Memory() (Memory, error) {
	var out Memory
	node, err := bpfobj.PinnedMemory(l.nodeDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return out, err
	}
	cg, err := bpfobj.PinnedObjectMemory(l.proxyCgroupsPin())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return out, err
	}
	out.Node = node + cg
	pods, err := os.ReadDir(filepath.Join(l.root, podsDir))
	if err != nil {
		return out, fmt.Errorf("memory: %w", err)
	}
	for _, p := range pods {
		b, err := bpfobj.PinnedMemory(filepath.Join(l.root, podsDir, p.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue // detached meanwhile
		}
		if err != nil {
			return out, err
		}
		out.Pods += b
		out.Enrolled++
	}
	return out, nil
}
