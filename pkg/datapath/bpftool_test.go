//go:build linux

package datapath

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
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
	st, err := l.Get("bpftool-pod")
	if err != nil {
		t.Fatal(err)
	}
	dir := l.nodeDir()
	// The pod's entry in a node-wide array map, by its index.
	entry := func(name string) map[string]any {
		t.Helper()
		for _, e := range bpftoolDump(t, filepath.Join(dir, name)) {
			if e["key"] == float64(st.Index) {
				return e["value"].(map[string]any)
			}
		}
		t.Fatalf("%s has no entry %d", name, st.Index)
		return nil
	}

	v := entry("pod_counters")
	if got := v["captured_out"]; got != float64(1) {
		t.Errorf("captured_out = %v, want 1 (entry %v)", got, v)
	}
	for _, field := range []string{"captured_in", "captured_dns", "hbone_in", "bypassed", "direct", "dropped_no_listener", "dropped_no_flow", "assign_failed", "mark_refused", "dropped_unparsed", "direct_full", "mark_untrusted"} {
		if _, ok := v[field]; !ok {
			t.Errorf("pod_counters has no field %q: %v", field, v)
		}
	}

	// The loader's values are C enums, so bpftool names them (a set of
	// several bits shows as its number).
	if got := entry("pod_config")["flags"]; got != "CFG_DNS_CAPTURE" {
		t.Errorf("pod_config flags = %v, want CFG_DNS_CAPTURE", got)
	}

	meta := entry("pod_meta")
	wantMode := "MODE_" + strings.ToUpper(l.Features().Mode.String())
	if meta["uid"] != "bpftool-pod" || meta["ifname"] != "eth0" || meta["mode"] != wantMode {
		t.Errorf("pod_meta = %v, want uid bpftool-pod, ifname eth0, mode %s", meta, wantMode)
	}

	// The pod's directory names its index: the entry programs' constant.
	idx := bpftoolDump(t, filepath.Join(l.PodDir("bpftool-pod"), pinPodIndex))
	if len(idx) != 1 || !strings.Contains(fmt.Sprint(idx[0]), fmt.Sprintf("pod_index:%d", st.Index)) {
		t.Errorf("pod_index pin = %v, want pod_index %d", idx, st.Index)
	}
}
