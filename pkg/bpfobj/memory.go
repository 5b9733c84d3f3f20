//go:build linux

package bpfobj

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// PinnedMemory sums the kernel memory (memlock, what is charged to the
// memory cgroup of whoever created them) of every object pinned directly
// in dir: maps, programs (pins named prog_*), and the programs links
// (pins named link_*) run. Subdirectories are not counted. A missing dir
// gives an error satisfying errors.Is(err, os.ErrNotExist).
func PinnedMemory(dir string) (uint64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var sum uint64
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		b, err := PinnedObjectMemory(filepath.Join(dir, e.Name()))
		if err != nil {
			return 0, err
		}
		sum += b
	}
	return sum, nil
}

// PinnedObjectMemory is the memlock of one pinned object, told apart by
// its name as PinnedMemory does. A link whose program is gone counts 0.
func PinnedObjectMemory(path string) (uint64, error) {
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
		return ProgramMemory(prog)
	case strings.HasPrefix(name, "prog_"):
		prog, err := ebpf.LoadPinnedProgram(path, nil)
		if err != nil {
			return 0, fmt.Errorf("memory of %s: %w", path, err)
		}
		defer prog.Close()
		return ProgramMemory(prog)
	default:
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			return 0, fmt.Errorf("memory of %s: %w", path, err)
		}
		defer m.Close()
		return MapMemory(m)
	}
}

// ProgramMemory is a program's memlock.
func ProgramMemory(p *ebpf.Program) (uint64, error) {
	info, err := p.Info()
	if err != nil {
		return 0, fmt.Errorf("program info: %w", err)
	}
	b, _ := info.Memlock()
	return b, nil
}

// MapMemory is a map's memlock.
func MapMemory(m *ebpf.Map) (uint64, error) {
	info, err := m.Info()
	if err != nil {
		return 0, fmt.Errorf("map info: %w", err)
	}
	b, _ := info.Memlock()
	return b, nil
}
