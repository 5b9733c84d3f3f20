//go:build linux

package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/ambpf/ambpf/pkg/netns"
)

// TestNetnsGone: the errors of opening a recorded netns that mean the pod
// is gone (the path removed, unmounted to a plain file, or naming another
// namespace) and one that does not (the agent out of descriptors).
func TestNetnsGone(t *testing.T) {
	self, err := netns.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	id, err := self.ID()
	self.Close()
	if err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(t.TempDir(), "unmounted")
	if err := os.WriteFile(plain, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	open := func(path string, id netns.ID) error {
		ns, err := openNetnsAs(path, id)
		if err == nil {
			ns.Close()
		}
		return err
	}
	for _, c := range []struct {
		name string
		err  error
		gone bool
	}{
		{"path removed", open(filepath.Join(t.TempDir(), "missing"), id), true},
		{"bind mount gone, mount point left", open(plain, id), true},
		{"path names another namespace", open("/proc/self/ns/net", netns.ID{Dev: id.Dev, Ino: id.Ino + 1}), true},
		{"out of descriptors", fmt.Errorf("open netns x: %w", syscall.EMFILE), false},
	} {
		if c.err == nil {
			t.Errorf("%s: no error", c.name)
			continue
		}
		if got := netnsGone(c.err); got != c.gone {
			t.Errorf("%s: netnsGone(%v) = %v, want %v", c.name, c.err, got, c.gone)
		}
	}
	if err := open("/proc/self/ns/net", id); err != nil || netnsGone(err) {
		t.Errorf("the namespace itself: %v", err)
	}
}
