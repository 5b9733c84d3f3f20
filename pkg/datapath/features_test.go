//go:build linux

package datapath

import (
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/kernfeat"
)

// TestDetectFeaturesProbes: the tcx and SO_REUSEPORT steering probes
// agree, on the kernels of the kernel matrix (5.10 to the newest), with
// the version both came in, 6.6 (Debian backports neither; a kernel that
// did would fail here, and the probe, not the version, would be right).
// The SO_REUSEPORT probe must answer, not fail. The default attach mode
// is clsact whatever the probe says.
func TestDetectFeaturesProbes(t *testing.T) {
	requireRoot(t)
	f, err := DetectFeatures()
	if err != nil {
		t.Fatal(err)
	}
	k, err := kernfeat.ParseRelease(f.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	if f.ReusePortErr != nil {
		t.Errorf("kernel %s: SO_REUSEPORT steering probe failed: %v", f.Kernel, f.ReusePortErr)
	}
	want := k.AtLeast(6, 6)
	if f.TCX != want || f.ReusePortAssign != want {
		t.Errorf("kernel %s: probed tcx %t, SO_REUSEPORT assign %t; the version says %t for both", f.Kernel, f.TCX, f.ReusePortAssign, want)
	}
	if f.Mode != ModeClsact {
		t.Errorf("default mode %s, want clsact", f.Mode)
	}
	t.Logf("features: %s", f)
}

// TestReusePortAssignProbe runs the SO_REUSEPORT steering probe afresh
// (not the process's cached answer) with its control, a listener without
// SO_REUSEPORT, which bpf_sk_assign takes on every kernel the datapath
// runs on (5.7+): the control passing where the probe says false (5.10,
// 6.1) shows that the false is the kernel refusing reuseport listeners,
// not a probe that cannot steer at all. The answer must be the version's
// (6.6, see TestDetectFeaturesProbes), and the probe must leave nothing
// behind in the caller's namespace: no open descriptor, no device, no
// filter on lo.
func TestReusePortAssignProbe(t *testing.T) {
	requireRoot(t)
	k, err := kernfeat.DetectKernel()
	if err != nil {
		t.Fatal(err)
	}
	links := linkNames(t)
	fds := openFDs(t)
	control, err := probeAssign(false)
	if err != nil || !control {
		t.Fatalf("kernel %s: the control (a listener without SO_REUSEPORT): %t, %v; want true", k.Release, control, err)
	}
	got, err := probeAssign(true)
	if err != nil {
		t.Fatalf("kernel %s: %v", k.Release, err)
	}
	if want := k.AtLeast(6, 6); got != want {
		t.Errorf("kernel %s: the probe says bpf_sk_assign takes SO_REUSEPORT listeners: %t; the version says %t", k.Release, got, want)
	}
	if cached, err := ProbeReusePortAssign(); err != nil || cached != got {
		t.Errorf("ProbeReusePortAssign: %t, %v; the fresh probe says %t", cached, err, got)
	}
	if after := openFDs(t); after != fds {
		t.Errorf("open descriptors: %d before the probes, %d after", fds, after)
	}
	if after := linkNames(t); after != links {
		t.Errorf("devices of the caller's namespace: %q before the probes, %q after", links, after)
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	filters, err := netlink.FilterList(lo, netlink.HANDLE_MIN_INGRESS)
	if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: no clsact on lo
		t.Fatal(err)
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && strings.Contains(bf.Name, "reuseport_probe") {
			t.Errorf("probe filter left on the caller's lo: %+v", bf)
		}
	}
	t.Logf("kernel %s: bpf_sk_assign takes SO_REUSEPORT listeners: %t", k.Release, got)
}

// linkNames lists the devices of the calling thread's namespace.
func linkNames(t *testing.T) string {
	t.Helper()
	ls, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range ls {
		names = append(names, l.Attrs().Name)
	}
	return strings.Join(names, ",")
}

// openFDs counts the process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestReusePortProbeVerdict: what the probe answers for each outcome,
// those this kernel cannot show included: -ESOCKTNOSUPPORT is false; 0
// is true only with the connection accepted on the listener; no SYN, no
// listener or another error is an error naming what happened.
func TestReusePortProbeVerdict(t *testing.T) {
	assigned := func(ret int64) reuseprobeProbeResult {
		return reuseprobeProbeResult{Stage: reuseprobeProbeStagePROBE_ASSIGNED, Ret: ret, Syns: 1}
	}
	refused := syscall.ECONNREFUSED
	for _, c := range []struct {
		name    string
		o       probeOutcome
		want    bool
		wantErr string // "" when the probe answers
	}{
		{"supported", probeOutcome{res: assigned(0), accepted: true}, true, ""},
		{"refused", probeOutcome{res: assigned(-int64(unix.ESOCKTNOSUPPORT)), dialErr: refused}, false, ""},
		{"no syn", probeOutcome{targetPort: 2, dialErr: refused}, false, "no SYN to 127.0.0.1:2"},
		{"no listener", probeOutcome{listenPort: 1, res: reuseprobeProbeResult{Stage: reuseprobeProbeStagePROBE_NO_LISTENER}}, false, "no listener on 127.0.0.1:1"},
		{"other errno", probeOutcome{res: assigned(-int64(unix.ENETUNREACH))}, false, "returned -101"},
		{"assigned, connect failed", probeOutcome{res: assigned(0), dialErr: refused}, false, "connect to 127.0.0.1:0 failed"},
		{"assigned, nothing accepted", probeOutcome{res: assigned(0), acceptErr: refused}, false, "accepted nothing"},
		{"assigned, another accepted", probeOutcome{res: assigned(0)}, false, "accepted another connection"},
		{"unknown stage", probeOutcome{res: reuseprobeProbeResult{Stage: 7}}, false, "unknown stage 7"},
	} {
		got, err := c.o.verdict()
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%s: %v, want %t", c.name, err, c.want)
		case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("%s: %t, %v; want an error with %q", c.name, got, err, c.wantErr)
		case got != c.want:
			t.Errorf("%s: %t, want %t", c.name, got, c.want)
		}
	}
	if _, err := (probeOutcome{res: assigned(-int64(unix.ENETUNREACH))}).verdict(); !errors.Is(err, syscall.ENETUNREACH) {
		t.Errorf("an errno from bpf_sk_assign is not wrapped: %v", err)
	}
}
