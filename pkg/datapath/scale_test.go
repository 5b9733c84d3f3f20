//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// scalePods is how many pods TestManyPods enrols at once.
const scalePods = 100

// parallel runs fn(i) for i in [0, n), all at once, and returns the
// errors by index.
func parallel(n int, fn func(i int) error) []error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(i)
		}()
	}
	wg.Wait()
	return errs
}

// TestManyPods enrols 100 pods at once on one node's programs, gives each
// a captured connection, upgrades them all (node programs and every pod's
// entry programs) while the connections carry traffic, and removes them
// all at once: every pod gets its own index, no connection breaks, and
// nothing of any pod is left in the node's maps or pins.
func TestManyPods(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, scalePods+1)
	r := topo.Pod(scalePods)
	appR, err := nettest.StartApp(&r.Netns, "R", []uint16{8080}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { appR.Close() })
	l := testLoader(t, 0)
	proxies := make([]*testproxy.Proxy, scalePods)
	for i := range proxies {
		if proxies[i], err = testproxy.Start(topo.Pod(i).NS, testproxy.Options{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { proxies[i].Close() })
	}
	uid := func(i int) string { return fmt.Sprintf("many-%d", i) }
	t.Cleanup(func() {
		for i := 0; i < scalePods; i++ {
			l.Detach(uid(i))
		}
	})

	failed := func(what string, errs []error) {
		t.Helper()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("%s pod %d: %v", what, i, err)
			}
		}
	}
	failed("attach", parallel(scalePods, func(i int) error {
		_, err := l.Attach(Pod{UID: uid(i), Netns: topo.Pod(i).NS, Options: Options{DNSCapture: i%2 == 0}})
		return err
	}))
	pods, err := l.List()
	if err != nil || len(pods) != scalePods {
		t.Fatalf("list: %d pods, %v", len(pods), err)
	}
	seen := map[uint32]string{}
	for _, st := range pods {
		if other, dup := seen[st.Index]; dup {
			t.Fatalf("pods %s and %s share index %d", st.UID, other, st.Index)
		}
		seen[st.Index] = st.UID
		if !st.Attached() || !st.Current {
			t.Errorf("%s: attached %t, current %t", st.UID, st.Attached(), st.Current)
		}
	}

	mem, err := l.Memory()
	if err != nil || mem.Enrolled != scalePods || mem.Node == 0 || mem.Pods == 0 {
		t.Fatalf("memory: %+v %v, want node and pod figures for %d pods", mem, err, scalePods)
	}
	t.Logf("kernel memory at %d pods: node %d KiB, pods %d KiB, %d KiB per pod", scalePods, mem.Node>>10, mem.Pods>>10, mem.PerPod()>>10)

	dst := netip.AddrPortFrom(r.IPv4, 8080)
	conns := make([]*nettest.TCPConn, scalePods)
	failed("connect", parallel(scalePods, func(i int) error {
		ok, tc := captured(t, proxies[i], topo.Pod(i), dst, meshconst.OutboundPort)
		conns[i] = tc
		if !ok {
			return fmt.Errorf("not captured by its own proxy")
		}
		return tc.Echo("before")
	}))
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	})

	for i := 0; i < scalePods; i++ {
		pretendOlderBuild(t, l, uid(i))
	}
	// Traffic on every connection while Verify upgrades them.
	stop := make(chan struct{})
	traffic := make(chan []error, 1)
	go func() {
		traffic <- parallel(scalePods, func(i int) error {
			for n := 0; ; n++ {
				select {
				case <-stop:
					if n == 0 {
						return fmt.Errorf("no exchange during the upgrade")
					}
					return nil
				default:
				}
				if err := conns[i].Echo(fmt.Sprintf("during %d", n)); err != nil {
					return fmt.Errorf("exchange %d: %w", n, err)
				}
			}
		})
	}()
	res, verr := l.Verify()
	close(stop)
	failed("traffic across the upgrade", <-traffic)
	if verr != nil {
		t.Fatal(verr)
	}
	upgraded := 0
	for _, r := range res {
		if r.Action == "upgraded" {
			upgraded++
		}
	}
	if upgraded != scalePods {
		t.Errorf("verify upgraded %d pods, want %d: %+v", upgraded, scalePods, res)
	}
	failed("after the upgrade", parallel(scalePods, func(i int) error {
		if err := conns[i].Echo("after"); err != nil {
			return err
		}
		st, err := l.Get(uid(i))
		if err != nil || !st.Current || st.Options.DNSCapture != (i%2 == 0) {
			return fmt.Errorf("status %+v %v: want current, its options kept", st, err)
		}
		return nil
	}))

	failed("detach", parallel(scalePods, func(i int) error { return l.Detach(uid(i)) }))
	if left, err := os.ReadDir(filepath.Join(l.Root(), locksDir)); err != nil || len(left) != 0 {
		t.Errorf("pod locks left after detach: %d (%v)", len(left), err)
	}
	if n := podEntries(t, l); n != 0 {
		t.Errorf("node maps hold %d entries of detached pods", n)
	}
	for _, pin := range bpffstest.Pins(l.Root()) {
		rel, _ := filepath.Rel(l.Root(), pin)
		if rel != captureMapProxyCgroups && !strings.HasPrefix(rel, nodeDir+"/") {
			t.Errorf("pin left after detach: %s", rel)
		}
	}
}

// TestNodeFull: a node whose pod indexes are all taken refuses the next
// pod with ErrFull and leaves no trace of it; a freed index is reused.
func TestNodeFull(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 3)
	mnt := bpffstest.Mount(t)
	l, err := New(Config{Root: filepath.Join(mnt, "ambpf"), Sizes: MapSizes{MaxPods: 2}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if _, err := l.Attach(Pod{UID: fmt.Sprintf("full-%d", i), Netns: topo.Pod(i).NS}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Detach(fmt.Sprintf("full-%d", i)) })
	}
	before := podState(t, topo.Pod(2))
	if _, err := l.Attach(Pod{UID: "full-2", Netns: topo.Pod(2).NS}); !errors.Is(err, ErrFull) {
		t.Fatalf("third attach: %v, want %v", err, ErrFull)
	}
	if after := podState(t, topo.Pod(2)); after != before {
		t.Errorf("refused attach changed the pod:\n%s\n%s", before, after)
	}
	if err := l.Detach("full-0"); err != nil {
		t.Fatal(err)
	}
	st, err := l.Attach(Pod{UID: "full-2", Netns: topo.Pod(2).NS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Detach("full-2") })
	if st.Index != 0 {
		t.Errorf("index %d, want the freed 0", st.Index)
	}
}

// TestNodeHandlesFollowSwap: a Loader keeps the node's map handles open
// between operations; when another build (here: other map sizes) swaps
// the node's programs and migrates a map, the next operation must work on
// the maps now pinned, not the old ones, and the old handles must be
// closed once no operation holds them, so the migrated-away map is freed.
// An uninstall (RemoveNodeState) lets them go too.
func TestNodeHandlesFollowSwap(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 3)
	mnt := bpffstest.Mount(t)
	root := filepath.Join(mnt, "ambpf")
	a, err := New(Config{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(Config{Root: root, Sizes: MapSizes{DNSNAT: DefaultDNSNAT / 2}})
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range []*Loader{a, b, a} {
		uid := fmt.Sprintf("swap-%d", i)
		t.Cleanup(func() { l.Detach(uid) })
	}
	pinnedID := func() uint32 {
		t.Helper()
		m, err := ebpf.LoadPinnedMap(filepath.Join(root, nodeDir, captureMapDnsNat), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		return mapID(t, m)
	}
	open := func(l *Loader) *nodeMaps {
		t.Helper()
		n, err := l.openNode()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if _, err := a.Attach(Pod{UID: "swap-0", Netns: topo.Pod(0).NS}); err != nil {
		t.Fatal(err)
	}
	held := open(a) // an operation of a in progress across the swap
	if got, want := mapID(t, held.dns), pinnedID(); got != want {
		t.Fatalf("a's dns_nat handle is map %d, the pinned one %d", got, want)
	}
	if _, err := b.Attach(Pod{UID: "swap-1", Netns: topo.Pod(1).NS}); err != nil {
		t.Fatal(err)
	}
	if mapID(t, held.dns) == pinnedID() {
		t.Fatal("b's load did not migrate dns_nat: the test proves nothing")
	}
	fresh := open(a)
	if got, want := mapID(t, fresh.dns), pinnedID(); got != want {
		t.Errorf("after b's swap a works on dns_nat map %d, the pinned one is %d", got, want)
	}
	fresh.Close()
	if held.dns.FD() < 0 {
		t.Fatal("handles closed while an operation still held them")
	}
	held.Close()
	if held.dns.FD() >= 0 {
		t.Error("replaced handles still open after the last operation gave them back")
	}
	// a's next enrolment swaps its own build back in, through its handles.
	if _, err := a.Attach(Pod{UID: "swap-2", Netns: topo.Pod(2).NS}); err != nil {
		t.Fatal(err)
	}
	n := open(a)
	if got, want := mapID(t, n.dns), pinnedID(); got != want {
		t.Errorf("after a's swap back a works on dns_nat map %d, the pinned one is %d", got, want)
	}
	n.Close()
	for i, l := range []*Loader{a, b, a} {
		if err := l.Detach(fmt.Sprintf("swap-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.RemoveNodeState(); err != nil {
		t.Fatal(err)
	}
	if n.dns.FD() >= 0 {
		t.Error("node map handles still open after RemoveNodeState")
	}
}

func mapID(t *testing.T, m *ebpf.Map) uint32 {
	t.Helper()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return uint32(id)
}
