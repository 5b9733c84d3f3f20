//go:build linux

package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/bpfobj"
)

// The per-pod half of the datapath: the pod's entry programs
// (bpf/podentry.c), loaded with the pod's index as a constant. They are a
// few instructions each, so enrolling a pod costs the verifier almost
// nothing.

// pinPodIndex is the entry programs' read-only data, pinned in the pod's
// directory: it holds the pod's index (bpftool map dump shows pod_index).
const pinPodIndex = "pod_index"

// entry is one pod's loaded entry programs.
type entry struct {
	guard *ebpf.Program // nil without a pod cgroup
	index *ebpf.Map     // .rodata: pod_index
	coll  *ebpf.Collection
}

// loadEntry loads the entry programs for the pod at idx, bound to the
// node's maps; with guard, the mark guard too.
func (l *Loader) loadEntry(n *nodeMaps, idx uint32, guard bool) (*entry, error) {
	spec, err := l.entrySpecFor(idx, guard)
	if err != nil {
		return nil, err
	}
	coll, err := bpfobj.LoadCollection(spec, &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		podentryMapCaptureProgs: n.progs,
		podentryMapPodCounters:  n.counters,
	}}, "pod entry")
	if err != nil {
		return nil, err
	}
	e := &entry{
		guard: coll.Programs[podentryProgGuardMark],
		index: coll.Maps[".rodata"],
		coll:  coll,
	}
	if e.index == nil {
		coll.Close()
		return nil, errors.New("pod entry programs: no .rodata map for the pod index")
	}
	return e, nil
}

// entrySpecFor is the loader's entry spec with the pod index idx in its
// read-only data, without the guard unless asked for. It shares all but
// that data with the loader's spec, which it leaves unchanged: a deep
// copy (CollectionSpec.Copy) copies the object's BTF under one lock, on
// which a burst of enrolments queued (docs/BENCHMARKS.md, "Burst
// enrolment"). Loading does not change a spec (cilium/ebpf copies each
// program before it rewrites it).
func (l *Loader) entrySpecFor(idx uint32, guard bool) (*ebpf.CollectionSpec, error) {
	v := l.entrySpec.Variables[podentryVarPodIndex]
	if v == nil || v.Size() != 4 {
		return nil, errors.New("pod entry programs: no 4-byte pod_index")
	}
	pod := *v // Type shared, read only
	pod.Value = binary.NativeEndian.AppendUint32(nil, idx)
	spec := *l.entrySpec
	spec.Variables = maps.Clone(l.entrySpec.Variables)
	spec.Variables[podentryVarPodIndex] = &pod
	spec.Programs = maps.Clone(l.entrySpec.Programs)
	if !guard {
		delete(spec.Programs, podentryProgGuardMark)
	}
	return &spec, nil
}

// Close releases the handles; pins and links keep what is attached.
func (e *entry) Close() {
	if e != nil && e.coll != nil {
		e.coll.Close()
	}
}

// get finds one of the entry programs by its name in the object
// (pinset.Programs, for the hook table).
func (e *entry) get(name string) *ebpf.Program { return e.coll.Programs[name] }

// readPodIndex reads the pod index of the entry programs pinned in dir.
func (l *Loader) readPodIndex(dir string) (uint32, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, pinPodIndex), nil)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", pinPodIndex, err)
	}
	defer m.Close()
	raw := make([]byte, m.ValueSize())
	if err := m.Lookup(uint32(0), raw); err != nil {
		return 0, fmt.Errorf("read %s: %w", pinPodIndex, err)
	}
	off := uint64(l.entrySpec.Variables[podentryVarPodIndex].Offset)
	if uint64(len(raw)) < off+4 {
		return 0, fmt.Errorf("read %s: %d bytes, no index at offset %d", pinPodIndex, len(raw), off)
	}
	return binary.NativeEndian.Uint32(raw[off:]), nil
}
