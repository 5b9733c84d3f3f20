//go:build linux

package datapath

import (
	"context"
	"encoding/json"
	"net/netip"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// bpftoolDump runs `bpftool -j map dump pinned path` and returns the
// BTF-formatted entries.
func bpftoolDump(t *testing.T, path string) []map[string]any {
	t.Helper()
	if _, err := exec.LookPath("bpftool"); err != nil {
		t.Skip("bpftool not installed (make deps installs it)")
	}
	out, err := exec.CommandContext(context.Background(), "bpftool", "-j", "map", "dump", "pinned", path).Output()
	if err != nil {
		t.Fatalf("bpftool map dump %s: %v", path, err)
	}
	var entries []struct {
		Formatted map[string]any `json:"formatted"`
	}
	if err := json.Unmarshal(out, &entries); err != nil {
		t.Fatalf("parse bpftool output: %v\n%s", err, out)
	}
	var res []map[string]any
	for _, e := range entries {
		if e.Formatted == nil {
			t.Fatalf("bpftool printed no BTF-formatted entry (maps lack BTF?):\n%s", out)
		}
		res = append(res, e.Formatted)
	}
	return res
}

// TestBpftoolReadsPins: an operator's `bpftool map dump pinned` on a real
// attached pod prints named fields with the values the datapath wrote.
func TestBpftoolReadsPins(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 2)
	a, r, proxy, _, _ := startProxyAndApps(t, topo)
	l := testLoader(t, 0)
	if _, err := l.Attach(Pod{UID: "bpftool-pod", Netns: a.NS, Options: Options{DNSCapture: true}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Detach("bpftool-pod") })
	ok, tc := captured(t, proxy, a, netip.AddrPortFrom(r.IPv4, 8080), meshconst.OutboundPort)
	if !ok {
		t.Fatal("not captured")
	}
	tc.Close()
	dir := l.PodDir("bpftool-pod")

	counters := bpftoolDump(t, filepath.Join(dir, "pod_counters"))
	if len(counters) != 1 {
		t.Fatalf("pod_counters entries: %d", len(counters))
	}
	v := counters[0]["value"].(map[string]any)
	if got := v["captured_out"]; got != float64(1) {
		t.Errorf("captured_out = %v, want 1 (entry %v)", got, v)
	}
	for _, field := range []string{"captured_in", "captured_dns", "hbone_in", "bypassed", "direct", "dropped_no_listener", "dropped_no_flow", "assign_failed", "mark_refused", "dropped_unparsed", "direct_full", "mark_untrusted"} {
		if _, ok := v[field]; !ok {
			t.Errorf("pod_counters has no field %q: %v", field, v)
		}
	}

	cfg := bpftoolDump(t, filepath.Join(dir, "pod_config"))
	if got := cfg[0]["value"].(map[string]any)["flags"]; got != float64(cfgDNSCapture) {
		t.Errorf("pod_config flags = %v, want %d (dns capture)", got, cfgDNSCapture)
	}

	meta := bpftoolDump(t, filepath.Join(dir, "pod_meta"))[0]["value"].(map[string]any)
	if meta["uid"] != "bpftool-pod" || meta["ifname"] != "eth0" || meta["mode"] != float64(ModeTCX) {
		t.Errorf("pod_meta = %v, want uid bpftool-pod, ifname eth0, mode %d", meta, ModeTCX)
	}
}
