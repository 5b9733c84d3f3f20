//go:build linux

package datapath

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// requireMode skips a test of an attach mode the kernel lacks (tcx before
// 6.6), saying so; kernels that have it run the test.
func requireMode(t testing.TB, mode Mode) {
	t.Helper()
	if mode != ModeTCX {
		return
	}
	feat, err := DetectFeatures()
	if err != nil {
		t.Fatal(err)
	}
	if !feat.TCX {
		t.Skipf("kernel %s has no tcx (6.6+); the clsact variant covers it", feat.Kernel)
	}
}

// testLoader returns a Loader whose pins live on a private bpffs mounted
// for this test only, so nothing is left on the machine's /sys/fs/bpf and
// a leak check can look at the whole mount.
func testLoader(t testing.TB, mode Mode) *Loader {
	t.Helper()
	requireRoot(t)
	mnt := bpffstest.Mount(t)
	t.Cleanup(func() {
		// Anything still pinned here is a leak (the unmount then cleans it).
		if left := bpffstest.Pins(filepath.Join(mnt, "ambpf", podsDir)); len(left) > 0 {
			t.Errorf("pins left behind: %v", left)
		}
	})
	l, err := New(Config{Root: filepath.Join(mnt, "ambpf"), Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	trustSelf(t, l)
	return l
}

// ebpfCapture plugs the datapath into the nettest scenario table.
type ebpfCapture struct {
	l *Loader
}

func (c ebpfCapture) Name() string { return "ebpf-" + c.l.Features().Mode.String() }

func (c ebpfCapture) Enroll(p *nettest.Pod, o nettest.CaptureOptions) error {
	_, err := c.l.Attach(Pod{UID: p.NSName, Netns: p.NS, Options: Options{DNSCapture: o.DNS, BypassInbound: o.BypassInbound}})
	return err
}

func (c ebpfCapture) Unenroll(p *nettest.Pod) error {
	err := c.l.Detach(p.NSName)
	if errors.Is(err, ErrNotAttached) {
		return nil
	}
	return err
}

// KnownDeviations implements nettest.Deviator. Captured TCP DNS is
// translated to the resolver's loopback address in the programs (so the
// resolver may be a plain, non-transparent socket, as ztunnel's is), so the
// resolver sees 127.0.0.1:15053 as its local address and SO_ORIGINAL_DST,
// a conntrack lookup, has nothing to answer. DNS proxies do not route by
// the original destination; UDP DNS never had it under iptables either.
func (ebpfCapture) KnownDeviations() map[string]string {
	return map[string]string{
		"08-dns-tcp-captured": "TCP DNS: the resolver cannot read the original destination (no conntrack)",
	}
}

// TestBehaviours runs the spec's behaviours 1-12 (pkg/nettest's scenario
// table, IPv4 and IPv6) against the eBPF datapath, in tcx mode and in the
// clsact fallback.
func TestBehaviours(t *testing.T) {
	for _, mode := range []Mode{ModeTCX, ModeClsact} {
		t.Run(mode.String(), func(t *testing.T) {
			requireMode(t, mode)
			nettest.Run(t, ebpfCapture{testLoader(t, mode)})
		})
	}
}

// TestDifferential runs the same scenario table under Istio's iptables rules
// and under the eBPF datapath and requires identical observations.
func TestDifferential(t *testing.T) {
	requireRoot(t)
	ipt := nettest.Collect(t, nettest.IPTables{})
	ebpf := nettest.Collect(t, ebpfCapture{testLoader(t, 0)})
	if len(ipt) == 0 || len(ipt) != len(ebpf) {
		t.Fatalf("scenario counts differ: iptables %d, ebpf %d", len(ipt), len(ebpf))
	}
	known := map[string]string{}
	for _, c := range []nettest.Deviator{nettest.IPTables{}, ebpfCapture{}} {
		for name, why := range c.KnownDeviations() {
			known[name] = why
		}
	}
	for _, d := range nettest.Diff(ipt, ebpf) {
		name, _, _ := strings.Cut(d, "/")
		if why, ok := known[name]; ok {
			t.Logf("known difference (%s): %s", why, d)
			continue
		}
		t.Error(d)
	}
}
