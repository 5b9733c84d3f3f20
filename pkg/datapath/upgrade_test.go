//go:build linux

package datapath

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// perPodObject is the capture object of the last per-pod build (each pod
// its own programs and maps), kept to test the migration from it.
const perPodObject = "testdata/perpod/capture.o"

// attachPerPod enrols p the way the per-pod build did, in the loader's
// mode: its own instance of that build's programs and maps, pinned in the
// pod's directory, with the pod's routing and sysctls set up. It returns
// the pod's direct_flows map.
func attachPerPod(t *testing.T, l *Loader, uid string, p *nettest.Pod) *ebpf.Map {
	t.Helper()
	spec, err := ebpf.LoadCollectionSpec(perPodObject)
	if err != nil {
		t.Fatal(err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: l.Root()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { coll.Close() })
	dir := l.PodDir(uid)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range legacyMaps {
		if err := coll.Maps[name].Pin(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	nsid, err := p.NS.ID()
	if err != nil {
		t.Fatal(err)
	}
	var info capturePodInfo
	bpffs.CopyCString(info.Uid[:], uid)
	bpffs.CopyCString(info.Ifname[:], "eth0")
	mode := l.Features().Mode
	info.NetnsDev, info.NetnsIno, info.Mode = nsid.Dev, nsid.Ino, captureTcMode(mode)
	info.ProgramTag = bpfobjTag(t)
	var links []link.Link
	err = p.NS.Do(func() error {
		ifindex, err := tcattach.InterfaceIndex("eth0")
		if err != nil {
			return err
		}
		info.Ifindex = uint32(ifindex)
		if err := setupNetns(&netlink.Handle{}, &info, "eth0"); err != nil {
			return err
		}
		old := []tcattach.Hook{
			{Ifindex: ifindex, Dir: tcattach.Ingress, Program: coll.Programs[captureProgCaptureIngress], Name: "old_ingress"},
			{Ifindex: ifindex, Dir: tcattach.Egress, Program: coll.Programs[captureProgCaptureEgress], Name: "old_egress"},
			{Ifindex: loopbackIndex, Dir: tcattach.Egress, Program: coll.Programs[captureProgDnsReply], Name: "old_lo"},
		}
		if mode == ModeClsact {
			for _, q := range ownedQdiscs(ifindex) {
				created, err := tcattach.EnsureQdisc(q.ifindex)
				if err != nil {
					return err
				}
				if created {
					info.Setup |= q.bit
				}
			}
			return hooks.Filters.Replace(old)
		}
		links, err = tcattach.AttachTCX(old)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if mode == ModeTCX {
		if err := hooks.PinLinks(dir, links); err != nil {
			t.Fatal(err)
		}
		for _, lk := range links {
			lk.Close()
		}
	}
	if mode == ModeClsact {
		for _, name := range legacyProgramNames {
			if err := coll.Programs[name].Pin(filepath.Join(dir, "prog_"+name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := coll.Maps[captureMapPodMeta].Put(uint32(0), info); err != nil {
		t.Fatal(err)
	}
	return coll.Maps[captureMapDirectFlows]
}

func bpfobjTag(t *testing.T) [8]byte {
	t.Helper()
	b, err := os.ReadFile(perPodObject)
	if err != nil {
		t.Fatal(err)
	}
	var tag [8]byte
	copy(tag[:], b[len(b)-8:]) // any value other than this build's
	return tag
}

// TestUpgradeFromPerPodBuild: a pod enrolled by the per-pod build (its own
// programs and maps pinned in its directory) is moved onto the node's
// shared programs by Verify, in place: an established captured connection
// keeps working, a flow open before its enrolment keeps leaving directly,
// its counters and options are carried into the node's maps under its new
// index, and its per-pod pins are gone.
func TestUpgradeFromPerPodBuild(t *testing.T) {
	requireRoot(t)
	for _, mode := range []Mode{ModeTCX, ModeClsact} {
		t.Run(mode.String(), func(t *testing.T) {
			requireMode(t, mode)
			testUpgradeFromPerPodBuild(t, mode)
		})
	}
}

func testUpgradeFromPerPodBuild(t *testing.T, mode Mode) {
	topo := nettest.NewTopology(t, 3)
	a, r, proxy, _, _ := startProxyAndApps(t, topo)
	l := testLoader(t, mode)
	// Another pod on the node's programs already, so the migrated one
	// gets an index other than 0.
	if _, err := l.Attach(Pod{UID: "neighbour", Netns: topo.Pod(2).NS}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Detach("neighbour") })
	t.Cleanup(func() { l.Detach("perpod") })
	oldFlows := attachPerPod(t, l, "perpod", a)

	ok, tc := captured(t, proxy, a, netip.AddrPortFrom(r.IPv4, 8080), meshconst.OutboundPort)
	if !ok {
		t.Fatal("the per-pod build does not capture")
	}
	defer tc.Close()
	// A flow the per-pod build recorded as open before its enrolment.
	flow := flowKey(a.IPv4, 40000, r.IPv4, 80)
	oldKey := make([]byte, oldFlows.KeySize())
	copy(oldKey, mustBinary(t, flow)[:len(oldKey)])
	if err := oldFlows.Put(oldKey, captureDirectFlow{ExpiresNs: monotonicNow() + uint64(time.Hour), Origin: directAttached}); err != nil {
		t.Fatal(err)
	}

	st, err := l.Get("perpod")
	if err != nil || st.Current {
		t.Fatalf("before: %+v %v, want a pod of another build", st, err)
	}
	res, err := l.Verify()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.UID == "perpod" && r.Action != "upgraded" {
			t.Fatalf("verify perpod: %+v, want upgraded", r)
		}
	}
	if err := tc.Echo("across the migration"); err != nil {
		t.Fatalf("established captured connection broken by the migration: %v", err)
	}
	st, err = l.Get("perpod")
	if err != nil || !st.Current || !st.Attached() || st.Counters.CapturedOut != 1 || st.Index == 0 {
		t.Fatalf("after: %+v %v, want current, attached, captured_out 1 kept, index > 0", st, err)
	}
	for _, name := range legacyMaps {
		if _, err := os.Stat(filepath.Join(l.PodDir("perpod"), name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("per-pod pin %s still there (%v)", name, err)
		}
	}
	for _, name := range legacyProgramNames {
		if _, err := os.Stat(filepath.Join(l.PodDir("perpod"), "prog_"+name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("per-pod program pin %s still there (%v)", name, err)
		}
	}
	n, err := l.openNode()
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	flow.Pod = st.Index
	if v, ok := directEntry(t, n.flows, flow); !ok || v.Origin != directAttached {
		t.Errorf("migrated flow: %+v (present %t), want the attach-time flow under index %d", v, ok, st.Index)
	}
	if ok, tc2 := captured(t, proxy, a, netip.AddrPortFrom(r.IPv4, 8080), meshconst.OutboundPort); !ok {
		t.Error("new connection not captured after the migration")
	} else {
		tc2.Close()
	}
}

func mustBinary(t *testing.T, v any) []byte {
	t.Helper()
	b, err := binary.Append(nil, binary.NativeEndian, v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestNodeMapsResized: a loader configured with other map sizes than the
// node's maps have migrates them when it loads the node's programs, keeping
// the pods' state.
func TestNodeMapsResized(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 1)
	l := testLoader(t, 0)
	if _, err := l.Attach(Pod{UID: "resize", Netns: topo.Pod(0).NS, Options: Options{DNSCapture: true}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Detach("resize") })
	l2, err := New(Config{Root: l.Root(), Mode: l.Features().Mode, Sizes: MapSizes{MaxPods: 64, DirectFlows: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l2.Verify(); err != nil {
		t.Fatal(err)
	}
	if err := l2.Upgrade("resize"); err != nil {
		t.Fatal(err)
	}
	st, err := l2.Get("resize")
	if err != nil || !st.Options.DNSCapture || !st.Attached() {
		t.Fatalf("after resize: %+v %v, want the pod attached with its options", st, err)
	}
	for name, want := range map[string]uint32{captureMapPodMeta: 64, captureMapDirectFlows: 1024} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(l.nodeDir(), name), nil)
		if err != nil {
			t.Fatal(err)
		}
		if m.MaxEntries() != want {
			t.Errorf("%s: %d entries, want %d", name, m.MaxEntries(), want)
		}
		m.Close()
	}
}
