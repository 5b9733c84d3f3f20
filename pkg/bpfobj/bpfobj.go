//go:build linux

// Package bpfobj handles ambpf's embedded BPF objects the same way for every
// program family: loading a fresh instance with the verifier's log in the
// error, and naming the build an object file is.
package bpfobj

import (
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// Load loads a fresh instance of spec's programs and maps into to (a
// bpf2go objects struct), with opts (map replacements for an upgrade; may
// be nil). what names the program family in errors; a verifier rejection
// includes the verifier's full log.
func Load(spec *ebpf.CollectionSpec, to any, opts *ebpf.CollectionOptions, what string) error {
	if err := spec.Copy().LoadAndAssign(to, opts); err != nil {
		return loadError(err, what)
	}
	return nil
}

// LoadCollection is Load for a whole collection: every program and map of
// spec, with the same errors.
func LoadCollection(spec *ebpf.CollectionSpec, opts *ebpf.CollectionOptions, what string) (*ebpf.Collection, error) {
	if opts == nil {
		opts = &ebpf.CollectionOptions{}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, *opts)
	if err != nil {
		return nil, loadError(err, what)
	}
	return coll, nil
}

func loadError(err error, what string) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("verifier rejected the %s programs: %+v", what, ve)
	}
	return fmt.Errorf("load %s programs: %w", what, err)
}

// Tag identifies a build of an object file: the first 8 bytes of its
// SHA-256. Loaders record it at attach, so a later build can tell what it
// has to upgrade.
func Tag(object []byte) [8]byte {
	sum := sha256.Sum256(object)
	return [8]byte(sum[:8])
}
