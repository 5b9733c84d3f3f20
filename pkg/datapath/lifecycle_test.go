//go:build linux

package datapath

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// The test binary doubles as the helper processes these tests need: an
// attaching process that exits (restart test) and an app inside a pod's
// cgroup that tries to set the proxy mark (spoofing test).
const helperEnv = "AMBPF_DATAPATH_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		code := m.Run()
		cleanupMarkApps()
		os.Exit(code)
	case "attach":
		os.Exit(helperAttach())
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
		os.Exit(2)
	}
}

// helperAttach attaches one pod and exits, leaving only the pins behind.
func helperAttach() int {
	if os.Getenv("AMBPF_RO_PROC_SYS") == "1" {
		// As runc mounts it in a non-privileged container. The process
		// runs in a mount namespace of its own (Unshareflags).
		if err := readOnlyProcSys(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	ns, err := netns.Open(os.Getenv("AMBPF_NETNS"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	l, err := New(Config{Root: os.Getenv("AMBPF_ROOT")})
	if err == nil {
		_, err = l.Attach(Pod{UID: os.Getenv("AMBPF_UID"), Netns: ns})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// readOnlyProcSys makes /proc/sys a read-only bind mount of itself in
// the process's (private) mount namespace.
func readOnlyProcSys() error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Mount("/proc/sys", "/proc/sys", "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind /proc/sys: %w", err)
	}
	if err := unix.Mount("", "/proc/sys", "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("remount /proc/sys read-only: %w", err)
	}
	return nil
}

// podState is what a pod's netns looks like from the outside: used to show
// that detach restores exactly the state before attach.
func podState(t *testing.T, p *nettest.Pod) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "-4", "rule"}, {"ip", "-6", "rule"},
		{"ip", "-4", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
		{"sysctl", "net.ipv4.conf.eth0.accept_local", "net.ipv4.conf.eth0.rp_filter", "net.ipv4.conf.all.rp_filter",
			"net.ipv4.conf.lo.accept_local", "net.ipv4.conf.lo.route_localnet", "net.ipv4.conf.lo.rp_filter"},
		{"tc", "qdisc", "show"},
	} {
		out, err := p.Exec(context.Background(), args[0], args[1:]...)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		b.Write(out)
	}
	return b.String()
}

// loaderFDs counts this process's open fds of the kinds the loader opens
// and could leak: BPF objects (programs, maps, links) and namespace
// handles. Sockets, pipes and epoll fds are left out on purpose: the
// in-process test proxy and app servers open and close those concurrently,
// which made a plain fd count flaky.
func loaderFDs(t *testing.T) map[string]int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err != nil {
			continue // closed between ReadDir and Readlink
		}
		switch {
		case strings.HasPrefix(target, "anon_inode:bpf"):
			kinds[target]++
		case strings.HasPrefix(target, "net:["), strings.HasPrefix(target, "mnt:["):
			kinds[target[:strings.IndexByte(target, ':')]]++
		}
	}
	return kinds
}

// checkNoFDLeak fails the test if any kind of loader fd grew since before
// and stays grown. A leak stays; a namespace fd can also be open for a
// moment, since every netns.NS.Do holds one for the calling thread's own
// namespace while the in-process proxy and apps work in their pods. So the
// count is read again until it is back (bounded: 2 s).
func checkNoFDLeak(t *testing.T, before map[string]int, during string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		var grown []string
		for kind, n := range loaderFDs(t) {
			if n > before[kind] {
				grown = append(grown, fmt.Sprintf("%s fds: %d before %s, %d after", kind, before[kind], during, n))
			}
		}
		if len(grown) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, g := range grown {
				t.Error(g)
			}
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startProxyAndApps starts a testproxy in pod A and app servers on 8080 in
// A and R.
func startProxyAndApps(t *testing.T, topo *nettest.Topology) (a, r *nettest.Pod, proxy *testproxy.Proxy, appA, appR *nettest.App) {
	t.Helper()
	a, r = topo.Pod(0), topo.Pod(1)
	var err error
	proxy, err = testproxy.Start(a.NS, testproxy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	if appA, err = nettest.StartApp(&a.Netns, "A", []uint16{8080}, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { appA.Close() })
	if appR, err = nettest.StartApp(&r.Netns, "R", []uint16{8080}, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { appR.Close() })
	return a, r, proxy, appA, appR
}

// captured dials from one pod to another and reports whether the proxy
// accepted the connection on the given listener.
func captured(t *testing.T, proxy *testproxy.Proxy, from *nettest.Pod, to netip.AddrPort, listener int) (bool, *nettest.TCPConn) {
	t.Helper()
	tc, err := nettest.OpenTCP(nettest.Dialer(&from.Netns, netip.Addr{}, to))
	if err != nil {
		t.Fatalf("connect %s -> %s: %v", from.Name, to, err)
	}
	for _, o := range proxy.Observations() {
		if o.Listener == listener && o.Peer.Port() == tc.Local.Port() {
			return true, tc
		}
	}
	return false, tc
}

// TestRestartThroughPins: a separate process attaches and exits; traffic is
// still captured through the pins; a new process verifies, keeps an open
// captured connection working, and detaches, restoring the pod exactly and
// leaking no pins or fds.
func TestRestartThroughPins(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 2)
	a, r, proxy, _, _ := startProxyAndApps(t, topo)
	l := testLoader(t, 0)
	before := podState(t, a)

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=attach", "AMBPF_ROOT="+l.Root(), "AMBPF_NETNS="+a.NSPath, "AMBPF_UID=restart-pod")
	out, err := cmd.CombinedOutput()
	// Detach whatever the helper left, even if the test fails below.
	t.Cleanup(func() { l.Detach("restart-pod") })
	if err != nil {
		t.Fatalf("attaching process: %v\n%s", err, out)
	}
	// The attaching process is gone; only the pins hold the datapath.
	ok, long := captured(t, proxy, r, netip.AddrPortFrom(a.IPv4, 8080), meshconst.InboundPlaintextPort)
	if !ok {
		t.Fatal("inbound connection not captured after the attaching process exited")
	}
	defer long.Close()
	if err := long.Echo("before restart"); err != nil {
		t.Fatal(err)
	}

	// A Loader keeps the node's map handles open from its first operation
	// on (nodeCache), by design: the baseline is taken after one.
	if _, err := l.Get("restart-pod"); err != nil {
		t.Fatal(err)
	}
	fds := loaderFDs(t)
	res, err := l.Verify()
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 1 || res[0].UID != "restart-pod" || res[0].Action != "ok" {
		t.Fatalf("verify = %+v, want restart-pod ok", res)
	}
	st, err := l.Get("restart-pod")
	if err != nil || !st.Attached() || !st.NetnsAlive || st.Counters.CapturedIn < 1 {
		t.Fatalf("status after restart: %+v, %v", st, err)
	}
	// Attaching again (the agent re-enrolling after its restart) keeps it.
	if _, err := l.Attach(Pod{UID: "restart-pod", Netns: a.NS}); err != nil {
		t.Fatalf("re-attach: %v", err)
	}
	checkNoFDLeak(t, fds, "verify/get/attach")
	if err := long.Echo("after restart"); err != nil {
		t.Fatalf("captured connection broken by restart: %v", err)
	}
	if ok, tc := captured(t, proxy, a, netip.AddrPortFrom(r.IPv4, 8080), meshconst.OutboundPort); !ok {
		t.Error("new outbound connection not captured after restart")
	} else {
		tc.Close()
	}

	fds = loaderFDs(t)
	if err := l.Detach("restart-pod"); err != nil {
		t.Fatal(err)
	}
	checkNoFDLeak(t, fds, "detach")
	if after := podState(t, a); after != before {
		t.Errorf("detach did not restore the pod:\nbefore\n%s\nafter\n%s", before, after)
	}
	// The node's pins stay (the shared programs, the node-wide maps and
	// the proxy cgroup set); nothing of the pod's does.
	for _, pin := range bpffstest.Pins(l.Root()) {
		rel, _ := filepath.Rel(l.Root(), pin)
		if rel != captureMapProxyCgroups && !strings.HasPrefix(rel, nodeDir+"/") {
			t.Errorf("pin left after detach: %s", rel)
		}
	}
	if n := podEntries(t, l); n != 0 {
		t.Errorf("node maps hold %d entries of detached pods", n)
	}
	ok, tc := captured(t, proxy, r, netip.AddrPortFrom(a.IPv4, 8080), meshconst.InboundPlaintextPort)
	tc.Close()
	if ok {
		t.Error("still captured after detach")
	} else if !strings.HasPrefix(tc.Greeting, "app A") {
		t.Errorf("after detach the app should answer directly, got %q", tc.Greeting)
	}
	if err := l.Detach("restart-pod"); !errors.Is(err, ErrNotAttached) {
		t.Errorf("second detach: %v, want ErrNotAttached", err)
	}
}

// TestNoRulesInPod: with the eBPF datapath attached the pod has no
// iptables, ip6tables or nft rules at all.
func TestNoRulesInPod(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 1)
	p := topo.Pod(0)
	l := testLoader(t, 0)
	if _, err := l.Attach(Pod{UID: "norules", Netns: p.NS, Options: Options{DNSCapture: true}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Detach("norules") })
	for _, args := range [][]string{{"iptables-save"}, {"ip6tables-save"}, {"nft", "list", "ruleset"}} {
		out, err := p.Exec(context.Background(), args[0], args[1:]...)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		for _, line := range strings.Split(string(out), "\n") {
			line = strings.TrimSpace(line)
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			t.Errorf("%s in the pod shows %q", args[0], line)
		}
	}
}

// TestMarkSpoofing: an app holding CAP_NET_ADMIN (root in the pod) marks its
// socket 0x539, the proxy's mark, to leave the mesh. Under Istio's iptables
// rules that works; with the datapath's mark guard on the pod's cgroup the
// setsockopt is refused and the connection is captured.
func TestMarkSpoofing(t *testing.T) {
	requireRoot(t)
	run := func(t *testing.T, p *nettest.Pod, target netip.AddrPort) markRun {
		return runMarkApp(t, p, markApp(t, "amd64"), nil, "-target", target.String())
	}

	t.Run("iptables", func(t *testing.T) {
		topo := nettest.NewTopology(t, 2)
		a, r, proxy, _, _ := startProxyAndApps(t, topo)
		if err := (nettest.IPTables{}).Enroll(a, nettest.CaptureOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { (nettest.IPTables{}).Unenroll(a) })
		got := run(t, a, netip.AddrPortFrom(r.IPv4, 8080))
		if got.mark != "ok" || !strings.HasPrefix(got.answer, "app R") || len(proxy.Observations()) != 0 {
			t.Errorf("expected the spoofing app to bypass iptables capture: %+v observations=%d", got, len(proxy.Observations()))
		}
	})
	t.Run("ebpf", func(t *testing.T) {
		topo := nettest.NewTopology(t, 2)
		a, r, proxy, _, _ := startProxyAndApps(t, topo)
		cg, err := a.Cgroup()
		if err != nil {
			t.Fatal(err)
		}
		l := testLoader(t, 0)
		if _, err := l.Attach(Pod{UID: "spoof", Netns: a.NS, Cgroup: cg}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Detach("spoof") })
		got := run(t, a, netip.AddrPortFrom(r.IPv4, 8080))
		if !strings.Contains(got.mark, "operation not permitted") {
			t.Errorf("setsockopt(SO_MARK 0x539) in the pod: %s, want EPERM", got.mark)
		}
		// Still captured: the proxy relays it, the server sees A.
		obs := proxy.Observations()
		if len(obs) != 1 || obs[0].Listener != meshconst.OutboundPort || !strings.HasPrefix(got.answer, "app R") {
			t.Errorf("connection not captured: answer %q, observations %+v", got.answer, obs)
		}
		st, err := l.Get("spoof")
		if err != nil {
			t.Fatal(err)
		}
		if st.Counters.MarkRefused != 1 {
			t.Errorf("mark_refused = %d, want 1", st.Counters.MarkRefused)
		}
		// The guard sits on the pod's cgroup only: the test process
		// (another cgroup, like the proxy) may still set the mark.
		s, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(s)
		if err := unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_MARK, int(meshconst.ProxyMark)); err != nil {
			t.Errorf("setting the mark outside the pod's cgroup: %v", err)
		}
	})
}

// TestAttachFailureLeavesNothing: attaches that fail at different steps
// leave no pins, links, rules, routes or sysctls, and other pods keep
// their datapath.
func TestAttachFailureLeavesNothing(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 2)
	good, bad := topo.Pod(0), topo.Pod(1)
	l := testLoader(t, 0)
	if _, err := l.Attach(Pod{UID: "good", Netns: good.NS}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Detach("good") })
	before := podState(t, bad)
	for _, tc := range []struct {
		name string
		pod  Pod
		want string
	}{
		{"bad uid", Pod{UID: "../escape", Netns: bad.NS}, "invalid pod UID"},
		{"dots refused by bpffs", Pod{UID: "a.b", Netns: bad.NS}, "invalid pod UID"},
		{"no netns", Pod{UID: "nons"}, "no network namespace"},
		{"missing interface", Pod{UID: "noif", Netns: bad.NS, Interface: "nope0"}, "nope0"},
		{"bad cgroup", Pod{UID: "nocg", Netns: bad.NS, Cgroup: filepath.Join(t.TempDir(), "not-a-cgroup")}, "cgroup"},
		{"same uid other netns", Pod{UID: "good", Netns: bad.NS}, "already attached"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := l.Attach(tc.pod)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("attach: %v, want an error mentioning %q", err, tc.want)
			}
			if after := podState(t, bad); after != before {
				t.Errorf("failed attach changed the pod:\nbefore\n%s\nafter\n%s", before, after)
			}
			pods, err := l.List()
			if err != nil {
				t.Fatal(err)
			}
			if len(pods) != 1 || pods[0].UID != "good" || !pods[0].Attached() {
				t.Errorf("pods after failed attach: %+v", pods)
			}
			if left, _ := os.ReadDir(filepath.Join(l.Root(), tmpDir)); len(left) != 0 {
				t.Errorf("temporary pins left: %v", left)
			}
		})
	}
}

// TestUpgradeKeepsFlows: a pod attached by an older build is upgraded by
// Verify in place: an established captured connection keeps working, the
// counters survive, and the links now run this build's programs.
func TestUpgradeKeepsFlows(t *testing.T) {
	requireRoot(t)
	for _, mode := range []Mode{ModeTCX, ModeClsact} {
		t.Run(mode.String(), func(t *testing.T) {
			requireMode(t, mode)
			topo := nettest.NewTopology(t, 2)
			a, r, proxy, _, _ := startProxyAndApps(t, topo)
			l := testLoader(t, mode)
			if _, err := l.Attach(Pod{UID: "upgrade", Netns: a.NS}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Detach("upgrade") })
			ok, tc := captured(t, proxy, a, netip.AddrPortFrom(r.IPv4, 8080), meshconst.OutboundPort)
			if !ok {
				t.Fatal("not captured")
			}
			defer tc.Close()
			// Pretend an older build attached this pod and loaded the
			// node's programs.
			pretendOlderBuild(t, l, "upgrade")
			oldIDs := programIDs(t, l, "upgrade")
			oldBody := bodyProgramIDs(t, l)
			res, err := l.Verify()
			if err != nil || len(res) != 1 || res[0].Action != "upgraded" {
				t.Fatalf("verify: %+v %v, want upgraded", res, err)
			}
			if err := tc.Echo("across the upgrade"); err != nil {
				t.Fatalf("established captured connection broken by the upgrade: %v", err)
			}
			st, err := l.Get("upgrade")
			if err != nil || !st.Current || !st.Attached() || st.Counters.CapturedOut != 1 {
				t.Fatalf("after upgrade: %+v %v", st, err)
			}
			newIDs := programIDs(t, l, "upgrade")
			for hook, id := range newIDs {
				if id == oldIDs[hook] {
					t.Errorf("%s still runs program %d", hook, id)
				}
			}
			for slot, id := range bodyProgramIDs(t, l) {
				if id == oldBody[slot] {
					t.Errorf("capture_progs[%d] still holds program %d", slot, id)
				}
			}
			if ok, tc2 := captured(t, proxy, a, netip.AddrPortFrom(r.IPv4, 8080), meshconst.OutboundPort); !ok {
				t.Error("new connection not captured after upgrade")
			} else {
				tc2.Close()
			}
		})
	}
}

// pretendOlderBuild makes uid and the node's programs look attached by
// another build, so Verify upgrades them.
func pretendOlderBuild(t *testing.T, l *Loader, uid string) {
	t.Helper()
	st, err := l.Get(uid)
	if err != nil {
		t.Fatal(err)
	}
	meta := filepath.Join(l.nodeDir(), captureMapPodMeta)
	var info capturePodInfo
	if err := bpffs.ReadIndex(meta, st.Index, &info); err != nil {
		t.Fatal(err)
	}
	info.ProgramTag = [8]byte{1, 2, 3}
	if err := bpffs.WriteIndex(meta, st.Index, info); err != nil {
		t.Fatal(err)
	}
	node := filepath.Join(l.nodeDir(), captureMapNodeMeta)
	var ni captureNodeInfo
	if err := bpffs.ReadIndex(node, 0, &ni); err != nil {
		t.Fatal(err)
	}
	ni.ProgramTag = [8]byte{1, 2, 3}
	if err := bpffs.WriteIndex(node, 0, ni); err != nil {
		t.Fatal(err)
	}
}

// bodyProgramIDs are the programs in the node's capture_progs, by slot.
func bodyProgramIDs(t *testing.T, l *Loader) map[uint32]uint32 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(l.nodeDir(), pinProgArray), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	out := map[uint32]uint32{}
	for slot := uint32(0); slot < 3; slot++ {
		var id uint32
		if err := m.Lookup(slot, &id); err != nil {
			t.Fatalf("capture_progs[%d]: %v", slot, err)
		}
		out[slot] = id
	}
	return out
}

// podEntries counts what the node's maps hold for pods: meta entries in
// use and flow and DNS entries.
func podEntries(t *testing.T, l *Loader) int {
	t.Helper()
	n, err := l.openNode()
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	count := 0
	var info capturePodInfo
	for i := uint32(0); i < n.meta.MaxEntries(); i++ {
		if err := n.meta.Lookup(i, &info); err != nil {
			t.Fatal(err)
		}
		if info.Uid[0] != 0 {
			count++
		}
	}
	for _, m := range []*ebpf.Map{n.flows, n.pending, n.dns} {
		k := make([]byte, m.KeySize())
		v := make([]byte, m.ValueSize())
		it := m.Iterate()
		for it.Next(k, v) {
			count++
		}
	}
	return count
}

func programIDs(t *testing.T, l *Loader, uid string) map[string]uint32 {
	t.Helper()
	st, err := l.Get(uid)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint32{}
	for _, a := range st.Attachments {
		if a.ProgramID == 0 {
			t.Fatalf("%s: no program id", a.Hook)
		}
		out[a.Hook] = a.ProgramID
	}
	return out
}

// TestAttachWithReadOnlyProcSys attaches from a process whose /proc/sys
// is read-only, as the chart's non-privileged agent container has it:
// the per-device sysctls go through netlink, so the attach succeeds, sets
// them, and a detach restores the pod. With conf/all/rp_filter needing a
// change (it has no netlink setter) the attach fails naming the read-only
// /proc/sys, and leaves the pod as it was.
func TestAttachWithReadOnlyProcSys(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 1)
	a := topo.Pod(0)
	l := testLoader(t, 0)
	sysctl := func(kv ...string) string {
		t.Helper()
		out, err := a.Exec(context.Background(), "sysctl", kv...)
		if err != nil {
			t.Fatalf("sysctl %v: %v\n%s", kv, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	attach := func(uid string) ([]byte, error) {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), helperEnv+"=attach", "AMBPF_RO_PROC_SYS=1", "AMBPF_ROOT="+l.Root(), "AMBPF_NETNS="+a.NSPath, "AMBPF_UID="+uid)
		cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: unix.CLONE_NEWNS}
		t.Cleanup(func() { l.Detach(uid) })
		return cmd.CombinedOutput()
	}
	// A fresh netns: the devices' values are the defaults, conf/all
	// already wants nothing.
	sysctl("-qw", "net.ipv4.conf.eth0.accept_local=0", "net.ipv4.conf.lo.accept_local=0", "net.ipv4.conf.lo.route_localnet=0", "net.ipv4.conf.all.rp_filter=0")
	before := podState(t, a)
	if out, err := attach("ro-pod"); err != nil {
		t.Fatalf("attach with a read-only /proc/sys: %v\n%s", err, out)
	}
	want := "net.ipv4.conf.eth0.accept_local = 1\nnet.ipv4.conf.eth0.rp_filter = 0\nnet.ipv4.conf.lo.accept_local = 1\nnet.ipv4.conf.lo.route_localnet = 1"
	if got := sysctl("net.ipv4.conf.eth0.accept_local", "net.ipv4.conf.eth0.rp_filter", "net.ipv4.conf.lo.accept_local", "net.ipv4.conf.lo.route_localnet"); got != want {
		t.Errorf("after the attach:\n%s\nwant\n%s", got, want)
	}
	if err := l.Detach("ro-pod"); err != nil {
		t.Fatal(err)
	}
	if after := podState(t, a); after != before {
		t.Errorf("detach did not restore the pod:\nbefore\n%s\nafter\n%s", before, after)
	}

	sysctl("-qw", "net.ipv4.conf.all.rp_filter=1")
	before = podState(t, a)
	out, err := attach("ro-pod-2")
	if err == nil {
		t.Fatal("attach succeeded although conf.all.rp_filter=1 cannot be changed through a read-only /proc/sys")
	}
	if !strings.Contains(string(out), "net/ipv4/conf/all/rp_filter") || !strings.Contains(string(out), "read-only") {
		t.Errorf("the error does not name the sysctl and the read-only /proc/sys:\n%s", out)
	}
	if _, err := l.Get("ro-pod-2"); err == nil {
		t.Error("the failed attach left the pod attached")
	}
	if after := podState(t, a); after != before {
		t.Errorf("the failed attach changed the pod:\nbefore\n%s\nafter\n%s", before, after)
	}
}

// TestEnrolAnnouncesNoLinkChange: enrolling and removing a pod must not
// announce its devices as changed (RTM_NEWLINK, the kernel's
// NETDEV_CHANGE), as setting their sysctls through RTM_SETLINK does:
// IPv6 answers every such announcement by sending the device's MLD
// reports again, which a bridge floods to every pod on it, a cost that
// grew with the pods of a burst (docs/BENCHMARKS.md). Where /proc/sys is
// writable the values go there. The pod's link notifications are read up
// to a marker change made after the removal, so no waiting is needed to
// see that none came before it.
func TestEnrolAnnouncesNoLinkChange(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 1)
	a := topo.Pod(0)
	l := testLoader(t, 0)
	ns := vnetns.NsHandle(a.NS.Fd())
	updates, done := make(chan netlink.LinkUpdate, 64), make(chan struct{})
	defer close(done)
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{Namespace: &ns}); err != nil {
		t.Fatal(err)
	}
	// Values that differ from what the datapath wants, so it must write.
	if out, err := a.Exec(context.Background(), "sysctl", "-qw", "net.ipv4.conf.eth0.accept_local=0", "net.ipv4.conf.lo.accept_local=0", "net.ipv4.conf.lo.route_localnet=0"); err != nil {
		t.Fatalf("sysctl: %v\n%s", err, out)
	}
	if _, err := l.Attach(Pod{UID: "nolinkchange", Netns: a.NS}); err != nil {
		t.Fatal(err)
	}
	if out, err := a.Exec(context.Background(), "sysctl", "-n", "net.ipv4.conf.eth0.accept_local", "net.ipv4.conf.lo.route_localnet"); err != nil || strings.Fields(string(out))[0] != "1" || strings.Fields(string(out))[1] != "1" {
		t.Fatalf("the attach did not set the sysctls: %v %q", err, out)
	}
	if err := l.Detach("nolinkchange"); err != nil {
		t.Fatal(err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	eth0, err := h.LinkByName(DefaultInterface)
	if err != nil {
		t.Fatal(err)
	}
	const marker = "ambpf-test-marker"
	if err := h.LinkSetAlias(eth0, marker); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(10 * time.Second)
	for {
		select {
		case u := <-updates:
			if u.Attrs().Alias == marker {
				return
			}
			t.Errorf("the pod's %s was announced as changed during enrolment or removal (flags %v): IPv6 re-sends its MLD reports for that",
				u.Attrs().Name, u.Attrs().Flags)
		case <-timeout:
			t.Fatal("the marker change was not announced within 10s: the subscription proves nothing")
		}
	}
}
