//go:build linux

package bpfobj

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// MigrateMap creates the map of spec and carries old's entries over, for
// a map whose layout or size changed between builds. Keys must keep their
// size (else nothing is carried over); values are copied into the new
// value size (zero-extended or cut), or converted by value when it is not
// nil (it gets old's value bytes and returns what to store). Entries that
// do not fit are dropped. The caller owns the returned map.
func MigrateMap(spec *ebpf.MapSpec, old *ebpf.Map, value func(old []byte) any) (*ebpf.Map, error) {
	nm, err := ebpf.NewMap(spec.Copy())
	if err != nil {
		return nil, err
	}
	if old.KeySize() != spec.KeySize {
		return nm, nil // nothing to carry over
	}
	k, v := make([]byte, old.KeySize()), make([]byte, old.ValueSize())
	it := old.Iterate()
	for it.Next(k, v) {
		var nv any
		if value != nil {
			nv = value(v)
		} else {
			b := make([]byte, spec.ValueSize)
			copy(b, v)
			nv = b
		}
		err := nm.Update(k, nv, ebpf.UpdateAny)
		if err != nil && !errors.Is(err, unix.E2BIG) && !errors.Is(err, ebpf.ErrKeyNotExist) {
			nm.Close()
			return nil, fmt.Errorf("copy entry: %w", err)
		}
	}
	if err := it.Err(); err != nil {
		nm.Close()
		return nil, fmt.Errorf("read old entries: %w", err)
	}
	return nm, nil
}

// Reused are the pinned maps a new load of a collection takes over.
type Reused struct {
	// Maps are the maps to pass as MapReplacements, by name: the pinned
	// ones whose layout and size match, and migrated copies of the others.
	Maps map[string]*ebpf.Map
	// Repin names the maps to pin once the new programs run: the migrated
	// ones, and those not pinned yet (new to this build).
	Repin []string
}

// Close closes the maps (the pins, and the loaded collection, keep them).
func (r *Reused) Close() {
	for _, m := range r.Maps {
		m.Close()
	}
}

// ReusePinned opens the maps names of spec pinned in dir, for loading a
// new build of spec over them: each is reused when compatible with spec,
// else migrated by migrate (MigrateMap with no value conversion when nil).
// On error nothing stays open.
func ReusePinned(spec *ebpf.CollectionSpec, dir string, names []string,
	migrate func(*ebpf.MapSpec, *ebpf.Map) (*ebpf.Map, error)) (*Reused, error) {
	if migrate == nil {
		migrate = func(ms *ebpf.MapSpec, old *ebpf.Map) (*ebpf.Map, error) { return MigrateMap(ms, old, nil) }
	}
	r := &Reused{Maps: map[string]*ebpf.Map{}}
	for _, name := range names {
		ms := spec.Maps[name]
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			r.Repin = append(r.Repin, name)
			continue
		}
		if err != nil {
			r.Close()
			return nil, fmt.Errorf("open map %s: %w", name, err)
		}
		if ms.Compatible(m) != nil {
			nm, err := migrate(ms, m)
			m.Close()
			if err != nil {
				r.Close()
				return nil, fmt.Errorf("migrate map %s: %w", name, err)
			}
			m = nm
			r.Repin = append(r.Repin, name)
		}
		r.Maps[name] = m
	}
	return r, nil
}
