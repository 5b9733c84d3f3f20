//go:build linux

package probesnat

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestLifecycle: a failed attach leaves nothing; invalid names are refused;
// a device re-created under the same name gets a fresh attachment; Prune
// removes what belongs to devices that are gone and unfinished attaches
// (a temporary directory, node entries without a directory). tcx and clsact.
func TestLifecycle(t *testing.T) {
	for _, mode := range []datapath.Mode{datapath.ModeTCX, datapath.ModeClsact} {
		t.Run(mode.String(), func(t *testing.T) {
			root := testRoot(t)
			topo := nettest.NewTopology(t, 0)
			node := topo.Node
			l, err := New(Config{Root: root, Netns: node.NS, Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })

			for _, bad := range []string{"", "a.b", "../x", "a/b", "sixteen-chars-xx"} {
				if _, err := l.Attach(bad); !errors.Is(err, ErrBadName) {
					t.Errorf("attach %q: %v, want ErrBadName", bad, err)
				}
			}
			if _, err := l.Attach("nosuchdev0"); err == nil {
				t.Error("attach to a missing device succeeded")
			}
			if left := bpffstest.Pins(root); len(left) > 0 {
				t.Errorf("failed attach left pins: %v", left)
			}
			if err := l.Detach("nosuchdev0"); !errors.Is(err, ErrNotAttached) {
				t.Errorf("detach of a device never attached: %v, want ErrNotAttached", err)
			}

			// A veth pair of our own in the (throwaway) node namespace.
			addVeth := func() {
				t.Helper()
				if _, err := node.Exec(context.Background(), "ip", "link", "add", "hp0", "type", "veth", "peer", "name", "hp1"); err != nil {
					t.Fatal(err)
				}
			}
			delVeth := func() {
				t.Helper()
				if _, err := node.Exec(context.Background(), "ip", "link", "del", "hp0"); err != nil {
					t.Fatal(err)
				}
			}
			addVeth()
			first, err := l.Attach("hp0")
			if err != nil {
				t.Fatal(err)
			}
			delVeth()
			st, err := l.Get("hp0")
			if err != nil || st.DevicePresent || st.Attached {
				t.Errorf("status of a deleted device: %+v, %v", st, err)
			}
			addVeth()
			second, err := l.Attach("hp0")
			if err != nil {
				t.Fatalf("attach to the re-created device: %v", err)
			}
			if second.Ifindex == first.Ifindex || !second.Attached {
				t.Errorf("re-created device: status %+v (first ifindex %d)", second, first.Ifindex)
			}
			delVeth()

			// An attach that died half-way: pins in the temporary directory.
			stale := filepath.Join(root, tmpSubDir, "hp9-123")
			if err := os.Mkdir(stale, 0o700); err != nil {
				t.Fatal(err)
			}
			// One that died after recording the device in the node maps.
			nsid, err := node.NS.ID()
			if err != nil {
				t.Fatal(err)
			}
			orphan := hostprobeProbeInfo{Ifindex: 999, NetnsDev: nsid.Dev, NetnsIno: nsid.Ino, Mode: hostprobeTcMode(l.Mode())}
			bpffs.CopyCString(orphan.Ifname[:], "hp9")
			if err := bpffs.WriteIndex(filepath.Join(l.NodeDir(), hostprobeMapProbeMeta), 999, orphan); err != nil {
				t.Fatal(err)
			}
			if err := bpffs.WriteIndex(filepath.Join(l.NodeDir(), hostprobeMapProbeStats), 999, hostprobeProbeCounters{}); err != nil {
				t.Fatal(err)
			}
			removed, err := l.Prune()
			if err != nil {
				t.Fatalf("prune: %v", err)
			}
			if fmt.Sprint(removed) != "[hp0]" {
				t.Errorf("prune removed %v, want [hp0]", removed)
			}
			if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("prune left the unfinished attach: %v", err)
			}
			if meta, stats := nodeEntries(t, l, 999); meta || stats {
				t.Errorf("prune left the entries of the unfinished attach: meta %t stats %t", meta, stats)
			}
			if list, err := l.List(); err != nil || len(list) != 0 {
				t.Errorf("list after prune: %+v, %v", list, err)
			}
		})
	}
}
