//go:build linux

package probesnat

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// addVeths creates n veth pairs pfx0/pfx0p ... in the node namespace with
// one batch of ip commands, and returns the names of the first ends.
func addVeths(t *testing.T, node *nettest.Netns, pfx string, n int) []string {
	t.Helper()
	var b strings.Builder
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s%d", pfx, i)
		fmt.Fprintf(&b, "link add %s type veth peer name %sp\nlink set %s up\nlink set %sp up\n", names[i], names[i], names[i], names[i])
	}
	batch := filepath.Join(t.TempDir(), "veths")
	if err := os.WriteFile(batch, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := node.Exec(context.Background(), "ip", "-batch", batch); err != nil {
		t.Fatalf("create veths: %v: %s", err, out)
	}
	return names
}

// nodePrograms are the IDs of the node's pinned programs (snat, unsnat).
func nodePrograms(t *testing.T, l *Loader) [2]uint32 {
	t.Helper()
	var out [2]uint32
	for i, name := range []string{hostprobeProgProbeSnat, hostprobeProgProbeUnsnat} {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(l.NodeDir(), "prog_"+name), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		out[i] = uint32(id)
	}
	return out
}

// pinnedMapID is the ID of the map pinned at path.
func pinnedMapID(t *testing.T, path string) ebpf.MapID {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

// programMaps are the IDs of the maps the program with id uses.
func programMaps(t *testing.T, id uint32) []ebpf.MapID {
	t.Helper()
	p, err := ebpf.NewProgramFromID(ebpf.ProgramID(id))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	ids, _ := info.MapIDs()
	return ids
}

// hookPrograms are the IDs of the programs a device's egress and ingress
// hooks run, read from the kernel (tcx link pins or clsact filters).
func hookPrograms(t *testing.T, l *Loader, node *nettest.Netns, ifname string, ifindex uint32) [2]uint32 {
	t.Helper()
	var out [2]uint32
	if l.Mode() == tcattach.ModeTCX {
		for i, pin := range hooks.LinkPins(l.Dir(ifname)) {
			st := tcattach.PinnedLinkState(pin)
			if !st.Attached {
				t.Errorf("%s: link %s not attached", ifname, pin)
			}
			out[i] = st.ProgramID
		}
		return out
	}
	tc := hooks.TC(int(ifindex), nil)
	var present map[string]uint32
	if err := node.Do(func() (err error) { present, err = hooks.Filters.Present(tc); return err }); err != nil {
		t.Fatal(err)
	}
	for i, h := range tc {
		out[i] = present[h.Name]
	}
	return out
}

// nodeEntries reads a device's entries in the node's meta and stats.
func nodeEntries(t *testing.T, l *Loader, ifindex uint32) (meta, stats bool) {
	t.Helper()
	var info hostprobeProbeInfo
	var c hostprobeProbeCounters
	meta = bpffs.ReadIndex(filepath.Join(l.NodeDir(), hostprobeMapProbeMeta), ifindex, &info) == nil
	stats = bpffs.ReadIndex(filepath.Join(l.NodeDir(), hostprobeMapProbeStats), ifindex, &c) == nil
	return meta, stats
}

// TestManyInterfaces: 50 devices attached at once all run the same two
// programs, which use the one node-wide probe_nat; each device adds only
// its entries (well under the 64 KiB a pod may cost); detaching one
// leaves no pin or entry of it and the others attached. tcx and clsact.
func TestManyInterfaces(t *testing.T) {
	const count = 50
	for _, mode := range []datapath.Mode{datapath.ModeTCX, datapath.ModeClsact} {
		t.Run(mode.String(), func(t *testing.T) {
			root := testRoot(t)
			node := nettest.NewTopology(t, 0).Node
			l, err := New(Config{Root: root, Netns: node.NS, Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			names := addVeths(t, node, "mi", count)
			t.Cleanup(func() {
				for _, name := range names {
					if err := l.Detach(name); err != nil && !errors.Is(err, ErrNotAttached) {
						t.Errorf("cleanup: detach %s: %v", name, err)
					}
				}
			})

			ifindex := map[string]uint32{}
			var first Memory
			for i, name := range names {
				st, err := l.Attach(name)
				if err != nil {
					t.Fatalf("attach %s: %v", name, err)
				}
				if !st.Attached || !st.DevicePresent {
					t.Fatalf("attach %s: status %+v", name, st)
				}
				ifindex[name] = st.Ifindex
				if i == 0 {
					if first, err = l.Memory(); err != nil {
						t.Fatal(err)
					}
				}
			}
			mem, err := l.Memory()
			if err != nil {
				t.Fatal(err)
			}
			perIface := (mem.Total() - first.Total()) / (count - 1)
			t.Logf("memory: one device %d bytes (node %d); %d devices %d bytes (node %d, per-interface part %d): %d bytes per added device, %d per device with the node's share",
				first.Total(), first.Node, count, mem.Total(), mem.Node, mem.Interfaces, perIface, mem.PerInterface())
			if mem.Attached != count || mem.Interfaces != 0 {
				t.Errorf("memory: %+v, want %d attached and no per-interface objects", mem, count)
			}
			if perIface > 64<<10 {
				t.Errorf("each added device costs %d bytes of kernel memory, want at most 64 KiB", perIface)
			}

			progs := nodePrograms(t, l)
			nat := pinnedMapID(t, filepath.Join(l.NodeDir(), hostprobeMapProbeNat))
			for i, id := range progs {
				found := false
				for _, m := range programMaps(t, id) {
					found = found || m == nat
				}
				if !found {
					t.Errorf("node program %d does not use the node's probe_nat (map %d)", i, nat)
				}
			}
			for _, name := range names {
				if got := hookPrograms(t, l, node, name, ifindex[name]); got != progs {
					t.Errorf("%s runs programs %v, want the node's %v", name, got, progs)
				}
			}
			list, err := l.List()
			if err != nil || len(list) != count {
				t.Fatalf("list: %d devices, %v", len(list), err)
			}

			gone := names[7]
			if err := l.Detach(gone); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(l.Dir(gone)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("detach left %s: %v", l.Dir(gone), err)
			}
			if meta, stats := nodeEntries(t, l, ifindex[gone]); meta || stats {
				t.Errorf("detach left node entries of %s: meta %t stats %t", gone, meta, stats)
			}
			if mode == datapath.ModeClsact {
				if got := hookPrograms(t, l, node, gone, ifindex[gone]); got != [2]uint32{} {
					t.Errorf("detach left filters on %s: %v", gone, got)
				}
			}
			if _, err := l.Get(gone); !errors.Is(err, ErrNotAttached) {
				t.Errorf("get after detach: %v, want ErrNotAttached", err)
			}
			other := names[8]
			if st, err := l.Get(other); err != nil || !st.Attached {
				t.Errorf("%s after detaching %s: %+v, %v", other, gone, st, err)
			}
			if got := hookPrograms(t, l, node, other, ifindex[other]); got != progs {
				t.Errorf("%s runs programs %v after a detach, want %v", other, got, progs)
			}
		})
	}
}

// TestNodeUpgrade: a build with another tag swaps the programs on every
// attached device and keeps the maps (same map IDs, counters and
// translations kept); a build with another probe_nat size migrates that
// map (its entries carried over, the devices' programs using the new one).
func TestNodeUpgrade(t *testing.T) {
	for _, mode := range []datapath.Mode{datapath.ModeTCX, datapath.ModeClsact} {
		t.Run(mode.String(), func(t *testing.T) {
			root := testRoot(t)
			node := nettest.NewTopology(t, 0).Node
			names := addVeths(t, node, "up", 3)
			l, err := New(Config{Root: root, Netns: node.NS, Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			ifindex := map[string]uint32{}
			for _, name := range names {
				st, err := l.Attach(name)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { l.Detach(name) })
				ifindex[name] = st.Ifindex
			}
			natPin := filepath.Join(l.NodeDir(), hostprobeMapProbeNat)
			key := hostprobeProbeKey{PodPort: 80, HostPort: 4242, Family: 2}
			orig := hostprobeProbeOrig{Host: hostprobeAddr{B: [16]uint8{10, 0, 0, 1}}}
			nat, err := ebpf.LoadPinnedMap(natPin, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := nat.Put(key, orig); err != nil {
				t.Fatal(err)
			}
			nat.Close()
			statsPin := filepath.Join(l.NodeDir(), hostprobeMapProbeStats)
			if err := bpffs.WriteIndex(statsPin, ifindex[names[0]], hostprobeProbeCounters{Translated: 5}); err != nil {
				t.Fatal(err)
			}
			oldProgs, oldNat := nodePrograms(t, l), pinnedMapID(t, natPin)

			// Another build: what probe_node records is all that tells.
			if err := bpffs.WriteIndex(filepath.Join(l.NodeDir(), hostprobeMapProbeNode), 0, hostprobeProbeNodeInfo{
				ProgramTag: [8]byte{1}, NatEntries: DefaultNATEntries, MaxInterfaces: DefaultMaxInterfaces}); err != nil {
				t.Fatal(err)
			}
			if _, err := l.Verify(); err != nil {
				t.Fatal(err)
			}
			progs := nodePrograms(t, l)
			if progs == oldProgs {
				t.Fatal("verify with another build recorded did not load the programs again")
			}
			if id := pinnedMapID(t, natPin); id != oldNat {
				t.Errorf("probe_nat replaced (%d -> %d) though its layout did not change", oldNat, id)
			}
			for _, name := range names {
				if got := hookPrograms(t, l, node, name, ifindex[name]); got != progs {
					t.Errorf("%s runs %v after the upgrade, want %v", name, got, progs)
				}
			}
			if st, err := l.Get(names[0]); err != nil || st.Counters.Translated != 5 || !st.Attached {
				t.Errorf("%s after the upgrade: %+v, %v", names[0], st, err)
			}

			// Other sizes: probe_nat is migrated.
			l2, err := New(Config{Root: root, Netns: node.NS, Mode: mode, NATEntries: 4096})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l2.Close() })
			if _, err := l2.Verify(); err != nil {
				t.Fatal(err)
			}
			nat, err = ebpf.LoadPinnedMap(natPin, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer nat.Close()
			var got hostprobeProbeOrig
			if nat.MaxEntries() != 4096 {
				t.Errorf("probe_nat has %d entries after the resize, want 4096", nat.MaxEntries())
			}
			if err := nat.Lookup(key, &got); err != nil || got != orig {
				t.Errorf("translation after the migration: %+v, %v", got, err)
			}
			newNat := pinnedMapID(t, natPin)
			progs = nodePrograms(t, l2)
			for _, name := range names {
				hp := hookPrograms(t, l2, node, name, ifindex[name])
				if hp != progs {
					t.Errorf("%s runs %v after the resize, want %v", name, hp, progs)
				}
				found := false
				for _, m := range programMaps(t, hp[0]) {
					found = found || m == newNat
				}
				if !found {
					t.Errorf("%s's program does not use the migrated probe_nat", name)
				}
			}
		})
	}
}

// perPodObject is the hostprobe object of the last per-pod build (each
// device its own programs and maps), kept to test the migration from it.
const perPodObject = "testdata/perpod/hostprobe.o"

// attachPerPod attaches the per-pod build to ifname the way that build
// did: its own instance of the programs and maps, pinned in the device's
// directory, with a translation and some counts in its maps.
func attachPerPod(t *testing.T, l *Loader, node *nettest.Netns, ifname string, key hostprobeProbeKey, orig hostprobeProbeOrig) {
	t.Helper()
	spec, err := ebpf.LoadCollectionSpec(perPodObject)
	if err != nil {
		t.Fatal(err)
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	dir := l.Dir(ifname)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{hostprobeMapProbeNat, hostprobeMapProbeStats, hostprobeMapProbeMeta} {
		if err := coll.Maps[name].Pin(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	nsid, err := node.NS.ID()
	if err != nil {
		t.Fatal(err)
	}
	var info hostprobeProbeInfo
	bpffs.CopyCString(info.Ifname[:], ifname)
	info.NetnsDev, info.NetnsIno, info.Mode = nsid.Dev, nsid.Ino, hostprobeTcMode(l.Mode())
	info.ProgramTag = [8]byte{0xde, 0xad}
	old := programs(coll.Programs)
	err = node.Do(func() error {
		ifindex, err := tcattach.InterfaceIndex(ifname)
		if err != nil {
			return err
		}
		info.Ifindex = uint32(ifindex)
		if l.Mode() == tcattach.ModeClsact {
			return clsactAttach(&info, ifindex, old)
		}
		links, err := hooks.Attach(tcattach.On(nil), tcattach.ModeTCX, ifindex, old.get)
		if err == nil {
			err = hooks.PinLinks(dir, links)
		}
		for _, lk := range links {
			lk.Close()
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if l.Mode() == tcattach.ModeClsact {
		if err := hooks.PinPrograms(dir, old.get); err != nil {
			t.Fatal(err)
		}
	}
	if err := coll.Maps[hostprobeMapProbeNat].Put(key, orig); err != nil {
		t.Fatal(err)
	}
	if err := coll.Maps[hostprobeMapProbeStats].Put(uint32(0), hostprobeProbeCounters{Translated: 3, Restored: 2}); err != nil {
		t.Fatal(err)
	}
	if err := coll.Maps[hostprobeMapProbeMeta].Put(uint32(0), info); err != nil {
		t.Fatal(err)
	}
}

// TestUpgradeFromPerPodBuild: devices the per-pod build attached (own
// programs and maps in their directory) are read as they are, and Verify
// moves them onto the node's programs in place: their hooks run the
// node's programs, their counters and translations are in the node maps,
// their old pins are gone, and Detach then removes them entirely. A
// device attached by this build next to them shares the same programs.
// tcx and clsact.
func TestUpgradeFromPerPodBuild(t *testing.T) {
	for _, mode := range []datapath.Mode{datapath.ModeTCX, datapath.ModeClsact} {
		t.Run(mode.String(), func(t *testing.T) {
			root := testRoot(t)
			node := nettest.NewTopology(t, 0).Node
			names := addVeths(t, node, "pp", 3)
			l, err := New(Config{Root: root, Netns: node.NS, Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			t.Cleanup(func() {
				for _, name := range names {
					l.Detach(name)
				}
			})
			keys := map[string]hostprobeProbeKey{}
			orig := hostprobeProbeOrig{Host: hostprobeAddr{B: [16]uint8{10, 0, 0, 1}}}
			for i, name := range names[:2] {
				keys[name] = hostprobeProbeKey{Pod: hostprobeAddr{B: [16]uint8{10, 1, byte(i), 2}}, PodPort: 80, HostPort: 4242, Family: 2}
				attachPerPod(t, l, node, name, keys[name], orig)
			}
			st, err := l.Get(names[0])
			if err != nil || !st.Attached || st.Counters.Translated != 3 {
				t.Fatalf("per-pod device before the migration: %+v, %v", st, err)
			}
			before, err := l.Memory()
			if err != nil {
				t.Fatal(err)
			}
			// A new device attached by this build: the node's programs get
			// loaded (and the per-pod devices stay as they are until Verify).
			third, err := l.Attach(names[2])
			if err != nil {
				t.Fatal(err)
			}
			migrated, err := l.Verify()
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(migrated) != fmt.Sprint(names[:2]) {
				t.Errorf("verify migrated %v, want %v", migrated, names[:2])
			}
			after, err := l.Memory()
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("memory: 2 per-pod devices %+v; after the migration, 3 devices %+v", before, after)
			if after.Interfaces != 0 || before.Interfaces == 0 {
				t.Errorf("per-interface memory %d before, %d after the migration", before.Interfaces, after.Interfaces)
			}
			progs := nodePrograms(t, l)
			nat, err := ebpf.LoadPinnedMap(filepath.Join(l.NodeDir(), hostprobeMapProbeNat), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer nat.Close()
			for _, name := range names[:2] {
				left := bpffstest.Pins(l.Dir(name))
				for _, p := range left {
					if !strings.Contains(p, "link_tc_") {
						t.Errorf("%s: per-pod pin left: %s", name, p)
					}
				}
				st, err := l.Get(name)
				if err != nil || !st.Attached || st.Counters.Translated != 3 || st.Counters.Restored != 2 {
					t.Errorf("%s after the migration: %+v, %v", name, st, err)
				}
				if got := hookPrograms(t, l, node, name, st.Ifindex); got != progs {
					t.Errorf("%s runs %v after the migration, want the node's %v", name, got, progs)
				}
				var got hostprobeProbeOrig
				if err := nat.Lookup(keys[name], &got); err != nil || got != orig {
					t.Errorf("%s's translation in the node's probe_nat: %+v, %v", name, got, err)
				}
			}
			if got := hookPrograms(t, l, node, names[2], third.Ifindex); got != progs {
				t.Errorf("%s runs %v, want %v", names[2], got, progs)
			}
			if again, err := l.Verify(); err != nil || len(again) != 0 {
				t.Errorf("second verify: %v, %v", again, err)
			}
			if err := l.Detach(names[0]); err != nil {
				t.Fatal(err)
			}
			if meta, stats := nodeEntries(t, l, st.Ifindex); meta || stats {
				t.Errorf("detach of a migrated device left entries: meta %t stats %t", meta, stats)
			}
			if _, err := os.Stat(l.Dir(names[0])); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("detach of a migrated device left its directory: %v", err)
			}
		})
	}
}
