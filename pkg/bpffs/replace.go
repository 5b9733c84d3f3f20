//go:build linux

package bpffs

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// PinReplacing pins obj at path, atomically replacing what is there: it is
// pinned beside it and renamed over it, so the pin is never missing.
func PinReplacing(obj interface{ Pin(string) error }, path string) error {
	if err := obj.Pin(path + "_new"); err != nil {
		return fmt.Errorf("pin %s: %w", filepath.Base(path), err)
	}
	if err := os.Rename(path+"_new", path); err != nil {
		os.Remove(path + "_new")
		return fmt.Errorf("pin %s: %w", filepath.Base(path), err)
	}
	return nil
}

// UpdatePinnedLink makes the link pinned at path run prog, atomically
// (link.Update: packets see either program, never none).
func UpdatePinnedLink(path string, prog *ebpf.Program) error {
	lk, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return fmt.Errorf("open link %s: %w", filepath.Base(path), err)
	}
	defer lk.Close()
	if err := lk.Update(prog); err != nil {
		return fmt.Errorf("update link %s: %w", filepath.Base(path), err)
	}
	return nil
}
