//go:build linux

// Package bpffstest gives a test its own bpf filesystem, so nothing is
// pinned on the machine's /sys/fs/bpf and a leak check can look at the
// whole mount.
package bpffstest

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// Mount mounts a private bpffs on a temporary directory and returns its
// path; it is unmounted in tb's cleanup (after cleanups registered later,
// such as a Pins leak check). It skips the test when not root.
func Mount(tb testing.TB) string {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("bpffstest: mounting a bpf filesystem needs root")
	}
	mnt := tb.TempDir()
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		tb.Fatalf("mount bpffs: %v", err)
	}
	tb.Cleanup(func() {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			tb.Errorf("unmount bpffs: %v", err)
		}
	})
	return mnt
}

// Pins lists the files (pins) below dir, for leak checks; a missing dir
// has none.
func Pins(dir string) []string {
	var out []string
	filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			out = append(out, path)
		}
		return nil
	})
	return out
}
