//go:build linux

package bpfobj

import (
	"errors"
	"fmt"

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
