//go:build linux

package datapath

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestUpgradeMigratesMaps: a pod attached by a build with the older map
// layouts (direct_flows an LRU of value 1, counters without the parse and
// direct_full fields, no inbound_pending) is upgraded in place: the maps
// are recreated in this build's layout with their content carried over,
// pinned where the old ones were, and used by the new programs.
func TestUpgradeMigratesMaps(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 1)
	p := topo.Pod(0)
	l := testLoader(t, 0)
	if _, err := l.Attach(Pod{UID: "migrate", Netns: p.NS}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Detach("migrate") })
	dir := l.PodDir("migrate")

	// The older build's maps, pinned in place of this build's.
	flow := flowKey(p.IPv4, 40000, nettest.BridgeV4, 80)
	oldFlows, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.LRUHash, KeySize: 40, ValueSize: 8, MaxEntries: 16384})
	if err != nil {
		t.Fatal(err)
	}
	defer oldFlows.Close()
	if err := oldFlows.Put(flow, uint64(1)); err != nil {
		t.Fatal(err)
	}
	oldCounters, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 80, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer oldCounters.Close()
	counters := make([]byte, 80)
	binary.NativeEndian.PutUint64(counters[8:], 5) // captured_out
	if err := oldCounters.Put(uint32(0), counters); err != nil {
		t.Fatal(err)
	}
	for name, m := range map[string]*ebpf.Map{captureMapDirectFlows: oldFlows, captureMapPodCounters: oldCounters} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
		if err := m.Pin(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Remove(filepath.Join(dir, captureMapInboundPending)); err != nil {
		t.Fatal(err)
	}
	info, err := readMeta(dir)
	if err != nil {
		t.Fatal(err)
	}
	info.ProgramTag = [8]byte{1, 2, 3}
	if err := putPinned(dir, captureMapPodMeta, info); err != nil {
		t.Fatal(err)
	}

	res, err := l.Verify()
	if err != nil || len(res) != 1 || res[0].Action != "upgraded" {
		t.Fatalf("verify: %+v %v, want upgraded", res, err)
	}
	st, err := l.Get("migrate")
	if err != nil || !st.Current || !st.Attached() || st.Counters.CapturedOut != 5 {
		t.Fatalf("after upgrade: %+v %v, want current, attached, captured_out 5 kept", st, err)
	}
	flows, err := ebpf.LoadPinnedMap(filepath.Join(dir, captureMapDirectFlows), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer flows.Close()
	if flows.Type() != ebpf.Hash || flows.ValueSize() != 16 {
		t.Errorf("direct_flows after upgrade: %v, value size %d; want this build's HASH", flows.Type(), flows.ValueSize())
	}
	if v, ok := directEntry(t, flows, flow); !ok || v.Origin != directAttached || v.ExpiresNs < monotonicNow() {
		t.Errorf("migrated flow: %+v (present %t), want an attach-time flow with a future expiry", v, ok)
	}
	if _, err := os.Stat(filepath.Join(dir, captureMapInboundPending)); err != nil {
		t.Errorf("inbound_pending not pinned by the upgrade: %v", err)
	}
	// The egress program now runs on the pinned maps.
	fi, err := flows.Info()
	if err != nil {
		t.Fatal(err)
	}
	flowsID, _ := fi.ID()
	for _, a := range st.Attachments {
		if a.Program != captureProgCaptureEgress {
			continue
		}
		prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(a.ProgramID))
		if err != nil {
			t.Fatal(err)
		}
		pi, err := prog.Info()
		prog.Close()
		if err != nil {
			t.Fatal(err)
		}
		ids, _ := pi.MapIDs()
		found := false
		for _, id := range ids {
			found = found || id == flowsID
		}
		if !found {
			t.Errorf("capture_egress uses maps %v, not the pinned direct_flows %d", ids, flowsID)
		}
	}
}
