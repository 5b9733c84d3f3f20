//go:build linux

package probesnat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// testRoot mounts a bpffs for this test only and returns the pin root on
// it, so nothing is left on the machine's /sys/fs/bpf and a leak check can
// look at the whole mount.
func testRoot(t *testing.T) string {
	t.Helper()
	requireRoot(t)
	mnt := bpffstest.Mount(t)
	root := filepath.Join(mnt, "ambpf")
	t.Cleanup(func() {
		// Anything still pinned is a leak (the unmount then cleans it).
		for _, dir := range []string{subDir, tmpSubDir, "pods"} {
			if left := bpffstest.Pins(filepath.Join(root, dir)); len(left) > 0 {
				t.Errorf("pins left behind: %v", left)
			}
		}
	})
	return root
}

// TestHostConnectionsBypassCapture is the end-to-end check on a node with
// pods on a bridge: pod A is enrolled (in-pod datapath and a ztunnel-like
// proxy), and the probe translation sits on A's and R's bridge ports.
// Connections from the node to A reach A's app directly with the probe
// source and their replies reach the node's socket; connections from pod
// R, forwarded by the bridge, keep their source and are captured; the
// node's answers to a pod that connected to it keep the node's address;
// after Detach the node's connections are captured again. IPv4 and IPv6,
// tcx and clsact.
func TestHostConnectionsBypassCapture(t *testing.T) {
	for _, mode := range []datapath.Mode{datapath.ModeTCX, datapath.ModeClsact} {
		t.Run(mode.String(), func(t *testing.T) { testHostConnections(t, mode) })
	}
}

func testHostConnections(t *testing.T, mode datapath.Mode) {
	root := testRoot(t)
	topo := nettest.NewTopology(t, 2)
	node, a, r := topo.Node, topo.Pod(0), topo.Pod(1)

	dp, err := datapath.New(datapath.Config{Root: root, Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	// The test proxy runs in this process.
	if _, _, err := dp.TrustProcess(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if _, err := dp.Attach(datapath.Pod{UID: a.NSName, Netns: a.NS}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dp.Detach(a.NSName); err != nil {
			t.Errorf("detach datapath: %v", err)
		}
	})
	proxy, err := testproxy.Start(a.NS, testproxy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	appA, err := nettest.StartApp(&a.Netns, "A", []uint16{nettest.AppPort}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { appA.Close() })
	const nodePort = 9090
	appNode, err := nettest.StartApp(node, "node", []uint16{nodePort}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { appNode.Close() })

	l, err := New(Config{Root: root, Netns: node.NS, Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	for _, p := range []*nettest.Pod{a, r} {
		st, err := l.Attach(p.HostVeth)
		if err != nil {
			t.Fatal(err)
		}
		if !st.Attached || !st.DevicePresent || st.Mode != mode.String() {
			t.Fatalf("status after attach: %+v", st)
		}
		ifname := p.HostVeth
		t.Cleanup(func() {
			if err := l.Detach(ifname); err != nil && !errors.Is(err, ErrNotAttached) {
				t.Errorf("detach %s: %v", ifname, err)
			}
		})
	}
	// Attaching again is a no-op.
	if st, err := l.Attach(a.HostVeth); err != nil || !st.Attached {
		t.Fatalf("second attach: %+v, %v", st, err)
	}

	for _, v6 := range []bool{false, true} {
		name := map[bool]string{false: "v4", true: "v6"}[v6]
		appAddr := netip.AddrPortFrom(a.Addr(v6), nettest.AppPort)
		nodeAddr := nettest.BridgeV4
		if v6 {
			nodeAddr = nettest.BridgeV6
		}
		t.Run(name, func(t *testing.T) {
			// The node's own connection: direct, from the probe address.
			tc := open(t, node, appAddr)
			if want := "app A peer=" + probeSource(v6).String(); tc.Greeting != want {
				t.Errorf("node -> A greeting %q, want %q", tc.Greeting, want)
			}
			if tc.Local.Addr() != nodeAddr {
				t.Errorf("node socket's local address %s, want %s", tc.Local.Addr(), nodeAddr)
			}
			if err := tc.Echo("probe"); err != nil {
				t.Errorf("node -> A echo: %v", err)
			}
			// Enough data for segmentation offload (GSO packets, partial
			// checksums) on both directions of the translated connection.
			if err := bulkEcho(tc, 1<<20); err != nil {
				t.Errorf("node -> A bulk echo: %v", err)
			}
			if proxied(proxy, tc.Local.Port()) {
				t.Errorf("node -> A went through the proxy")
			}
			if !appSaw(appA, netip.AddrPortFrom(probeSource(v6), tc.Local.Port())) {
				t.Errorf("A's app did not see %s:%d; saw %v", probeSource(v6), tc.Local.Port(), appA.Seen())
			}

			// Another pod's connection, forwarded by the bridge: captured,
			// with its real source.
			fwd := open(t, &r.Netns, appAddr)
			if want := "app A peer=" + r.Addr(v6).String(); fwd.Greeting != want {
				t.Errorf("R -> A greeting %q, want %q", fwd.Greeting, want)
			}
			if o, ok := proxyObservation(proxy, fwd.Local.Port()); !ok || o.Listener != meshconst.InboundPlaintextPort || o.Peer != fwd.Local {
				t.Errorf("R -> A: proxy observation %+v (found %t), want 15006 from %s", o, ok, fwd.Local)
			}

			// A pod connecting to the node: the node's answers keep its
			// address (nothing translated on R's port).
			back := open(t, &r.Netns, netip.AddrPortFrom(nodeAddr, nodePort))
			if want := "app node peer=" + r.Addr(v6).String(); back.Greeting != want {
				t.Errorf("R -> node greeting %q, want %q", back.Greeting, want)
			}
			if err := back.Echo("to node"); err != nil {
				t.Errorf("R -> node echo: %v", err)
			}
		})
	}

	stA, err := l.Get(a.HostVeth)
	if err != nil {
		t.Fatal(err)
	}
	c := stA.Counters
	// NotLocal counts the forwarded SYNs: at the bridge port they carry no
	// socket (the premise of telling them from the node's own packets).
	if c.Translated < 2 || c.Restored < 2 || c.NotLocal < 2 || c.Refused != 0 {
		t.Errorf("counters on A's port: %+v", c)
	}
	stR, err := l.Get(r.HostVeth)
	if err != nil {
		t.Fatal(err)
	}
	if stR.Counters.Translated != 0 || stR.Counters.Restored != 0 {
		t.Errorf("counters on R's port: %+v (the node's answers to R must not be translated)", stR.Counters)
	}
	if list, err := l.List(); err != nil || len(list) != 2 {
		t.Errorf("list: %+v, %v", list, err)
	}
	checkBpftoolDump(t, filepath.Join(l.NodeDir(), hostprobeMapProbeNat))

	// Detach: the node's new connections are captured again.
	if err := l.Detach(a.HostVeth); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Get(a.HostVeth); !errors.Is(err, ErrNotAttached) {
		t.Errorf("get after detach: %v, want ErrNotAttached", err)
	}
	if left := bpffstest.Pins(l.Dir(a.HostVeth)); len(left) > 0 {
		t.Errorf("pins left after detach: %v", left)
	}
	if mode == datapath.ModeClsact {
		out, err := node.Exec(context.Background(), "tc", "qdisc", "show", "dev", a.HostVeth)
		if err != nil || strings.Contains(string(out), "clsact") {
			t.Errorf("clsact qdisc left on %s after detach: %s %v", a.HostVeth, out, err)
		}
	}
	for _, v6 := range []bool{false, true} {
		tc := open(t, node, netip.AddrPortFrom(a.Addr(v6), nettest.AppPort))
		if o, ok := proxyObservation(proxy, tc.Local.Port()); !ok || o.Listener != meshconst.InboundPlaintextPort || o.Peer != tc.Local {
			t.Errorf("after detach, node -> A (%s): proxy observation %+v (found %t), want 15006 from %s", a.Addr(v6), o, ok, tc.Local)
		}
	}
}

// bulkEcho sends n bytes on an echo connection and checks that the same
// bytes come back.
func bulkEcho(tc *nettest.TCPConn, n int) error {
	data := make([]byte, n)
	for i := range data {
		data[i] = byte(i * 7)
	}
	tc.Conn.SetDeadline(time.Now().Add(10 * time.Second))
	werr := make(chan error, 1)
	go func() {
		_, err := tc.Conn.Write(data)
		werr <- err
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(tc.Conn, got); err != nil {
		return fmt.Errorf("read back: %w", err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if !bytes.Equal(got, data) {
		return errors.New("data came back changed")
	}
	return nil
}

func open(t *testing.T, from *nettest.Netns, to netip.AddrPort) *nettest.TCPConn {
	t.Helper()
	tc, err := nettest.OpenTCP(nettest.Dialer(from, netip.Addr{}, to))
	if err != nil {
		t.Fatalf("connect %s -> %s: %v", from.Name, to, err)
	}
	t.Cleanup(func() { tc.Close() })
	return tc
}

func proxyObservation(p *testproxy.Proxy, clientPort uint16) (testproxy.Observation, bool) {
	for _, o := range p.Observations() {
		if o.Peer.Port() == clientPort {
			return o, true
		}
	}
	return testproxy.Observation{}, false
}

func proxied(p *testproxy.Proxy, clientPort uint16) bool {
	_, ok := proxyObservation(p, clientPort)
	return ok
}

func appSaw(a *nettest.App, peer netip.AddrPort) bool {
	for _, s := range a.Seen() {
		if s.Peer == peer {
			return true
		}
	}
	return false
}

// checkBpftoolDump: the translation map is readable with bpftool, with
// field names (BTF).
func checkBpftoolDump(t *testing.T, pin string) {
	t.Helper()
	if _, err := exec.LookPath("bpftool"); err != nil {
		t.Log("bpftool not installed: skipping the dump check")
		return
	}
	out, err := exec.Command("bpftool", "map", "dump", "pinned", pin).CombinedOutput()
	if err != nil {
		t.Errorf("bpftool map dump: %v: %s", err, out)
		return
	}
	for _, field := range []string{"pod_port", "host_port", "host"} {
		if !strings.Contains(string(out), fmt.Sprintf("%q", field)) {
			t.Errorf("bpftool dump lacks field %q:\n%s", field, out)
		}
	}
}
