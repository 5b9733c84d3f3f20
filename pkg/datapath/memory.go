//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
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
	node, err := pinnedMemory(l.nodeDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return out, err
	}
	cg, err := pinnedObjectMemory(l.proxyCgroupsPin())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return out, err
	}
	out.Node = node + cg
	pods, err := os.ReadDir(filepath.Join(l.root, podsDir))
	if err != nil {
		return out, fmt.Errorf("memory: %w", err)
	}
	for _, p := range pods {
		b, err := pinnedMemory(filepath.Join(l.root, podsDir, p.Name()))
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

// pinnedMemory sums the memlock of every object pinned in dir: maps,
// programs, and the programs links run.
func pinnedMemory(dir string) (uint64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var sum uint64
	for _, e := range entries {
		b, err := pinnedObjectMemory(filepath.Join(dir, e.Name()))
		if err != nil {
			return 0, err
		}
		sum += b
	}
	return sum, nil
}

func pinnedObjectMemory(path string) (uint64, error) {
	name := filepath.Base(path)
	switch {
	case strings.HasPrefix(name, "link_"):
		lk, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			return 0, fmt.Errorf("memory of %s: %w", path, err)
		}
		defer lk.Close()
		info, err := lk.Info()
		if err != nil {
			return 0, fmt.Errorf("memory of %s: %w", path, err)
		}
		prog, err := ebpf.NewProgramFromID(info.Program)
		if err != nil {
			return 0, nil // detached: its program may be gone
		}
		defer prog.Close()
		return programMemory(prog)
	case strings.HasPrefix(name, "prog_"):
		prog, err := ebpf.LoadPinnedProgram(path, nil)
		if err != nil {
			return 0, fmt.Errorf("memory of %s: %w", path, err)
		}
		defer prog.Close()
		return programMemory(prog)
	default:
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			return 0, fmt.Errorf("memory of %s: %w", path, err)
		}
		defer m.Close()
		info, err := m.Info()
		if err != nil {
			return 0, fmt.Errorf("memory of %s: %w", path, err)
		}
		b, _ := info.Memlock()
		return b, nil
	}
}

func programMemory(p *ebpf.Program) (uint64, error) {
	info, err := p.Info()
	if err != nil {
		return 0, fmt.Errorf("program info: %w", err)
	}
	b, _ := info.Memlock()
	return b, nil
}
