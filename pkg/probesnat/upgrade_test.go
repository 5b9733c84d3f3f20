//go:build linux

package probesnat

import (
	"encoding/hex"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestUpgradeKeepsTranslating: a node connection to a pod is translated
// (the pod's app sees the probe source), and stays usable while a build
// with another tag replaces the programs (Verify, as the agent runs it
// on start): echoes run without a pause across the swap, both directions
// keep being translated (a reply that lost its translation would go to
// the probe address and never reach the node's socket), new connections
// get the probe source, the device's hooks run the new programs, and its
// status reports the new build. tcx and clsact.
func TestUpgradeKeepsTranslating(t *testing.T) {
	for _, mode := range []datapath.Mode{datapath.ModeTCX, datapath.ModeClsact} {
		t.Run(mode.String(), func(t *testing.T) {
			root := testRoot(t)
			topo := nettest.NewTopology(t, 1)
			node, a := topo.Node, topo.Pod(0)
			app, err := nettest.StartApp(&a.Netns, "A", []uint16{nettest.AppPort}, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { app.Close() })
			l, err := New(Config{Root: root, Netns: node.NS, Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			st, err := l.Attach(a.HostVeth)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Detach(a.HostVeth) })

			appAddr := netip.AddrPortFrom(a.Addr(false), nettest.AppPort)
			want := "app A peer=" + probeSource(false).String()
			tc := open(t, node, appAddr)
			if tc.Greeting != want {
				t.Fatalf("node -> A greeting %q, want %q", tc.Greeting, want)
			}
			oldProgs := nodePrograms(t, l)

			// Another build ran here: what probe_node and the device's
			// entry record is all that tells.
			old := [8]byte{1}
			if err := bpffs.WriteIndex(filepath.Join(l.NodeDir(), hostprobeMapProbeNode), 0, hostprobeProbeNodeInfo{
				ProgramTag: old, NatEntries: DefaultNATEntries, MaxInterfaces: DefaultMaxInterfaces}); err != nil {
				t.Fatal(err)
			}
			metaPin := filepath.Join(l.NodeDir(), hostprobeMapProbeMeta)
			var info hostprobeProbeInfo
			if err := bpffs.ReadIndex(metaPin, st.Ifindex, &info); err != nil {
				t.Fatal(err)
			}
			info.ProgramTag = old
			if err := bpffs.WriteIndex(metaPin, st.Ifindex, info); err != nil {
				t.Fatal(err)
			}

			// Echoes back to back on the open connection while Verify
			// swaps the programs.
			stop := make(chan struct{})
			var (
				wg      sync.WaitGroup
				echoes  atomic.Int64
				echoErr error // read after wg.Wait
			)
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					tc.Conn.SetDeadline(time.Now().Add(5 * time.Second))
					if err := tc.Echo(fmt.Sprintf("ping %d", echoes.Load())); err != nil {
						echoErr = err
						return
					}
					echoes.Add(1)
				}
			}()
			if _, err := l.Verify(); err != nil {
				t.Error(err)
			}
			// Some echoes after the swap too (the echo loop stops early
			// on an error, which the deadline then reports).
			after := echoes.Load()
			deadline := time.Now().Add(5 * time.Second)
			for echoes.Load() < after+20 && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			close(stop)
			wg.Wait()
			if n := echoes.Load(); echoErr != nil || n < after+20 {
				t.Fatalf("the open connection across the upgrade: %d echoes (%d after the swap), %v", n, n-after, echoErr)
			}
			if err := bulkEcho(tc, 1<<20); err != nil {
				t.Errorf("bulk echo after the upgrade: %v", err)
			}

			progs := nodePrograms(t, l)
			if progs == oldProgs {
				t.Fatal("verify with another build recorded did not load the programs again")
			}
			if got := hookPrograms(t, l, node, a.HostVeth, st.Ifindex); got != progs {
				t.Errorf("%s runs %v after the upgrade, want %v", a.HostVeth, got, progs)
			}
			tag := ProgramTag()
			if st, err := l.Get(a.HostVeth); err != nil || !st.Attached || st.ProgramTag != hex.EncodeToString(tag[:]) {
				t.Errorf("status after the upgrade: %+v, %v; want attached, program tag %x", st, err, tag)
			}
			if nc := open(t, node, appAddr); nc.Greeting != want {
				t.Errorf("new connection after the upgrade: greeting %q, want %q", nc.Greeting, want)
			}
		})
	}
}
