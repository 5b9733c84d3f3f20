//go:build linux

// Package nettest builds throwaway network topologies for privileged tests
// (a "node" network namespace with a bridge and pods attached to it), runs
// code and commands inside them, and holds the scenario table that checks
// a capture mechanism (Istio's iptables rules, or the eBPF datapath)
// against the in-pod datapath contract of docs/spec datapath.md.
package nettest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/netns"
)

// Addresses of the node bridge; pod i gets .(10+i) / ::(10+i).
var (
	BridgeV4 = netip.MustParseAddr("10.77.0.1")
	BridgeV6 = netip.MustParseAddr("fd77::1")
)

const (
	prefixV4 = 24
	prefixV6 = 64
	// firstPodHost is the host part of pod 0's addresses.
	firstPodHost = 10
	bridgeName   = "br0"
)

// Netns is a named network namespace (/run/netns/<Name>) owned by a
// Topology. Its methods may be called from any goroutine.
type Netns struct {
	// Name is the short name within the topology: "node", "pod0", ...
	Name string
	// NSName is the name `ip netns` knows it by (Prefix + id + Name).
	NSName string
	// NSPath is /run/netns/<NSName>.
	NSPath string
	// NS is an open handle, closed by the topology's cleanup.
	NS *netns.NS
}

// Do runs fn on a locked OS thread inside the namespace (see netns.NS.Do).
func (n *Netns) Do(fn func() error) error { return n.NS.Do(fn) }

// Listen opens a listener inside the namespace with default options; it
// stays in the namespace and is usable from any goroutine.
func (n *Netns) Listen(network, address string) (net.Listener, error) {
	return n.ListenConfig(&net.ListenConfig{}, network, address)
}

// ListenConfig opens a listener inside the namespace using lc.
func (n *Netns) ListenConfig(lc *net.ListenConfig, network, address string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() (err error) {
		l, err = lc.Listen(context.Background(), network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, address, n.NSName, err)
	}
	return l, nil
}

// ListenPacket opens a packet socket inside the namespace.
func (n *Netns) ListenPacket(network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := n.Do(func() (err error) {
		pc, err = (&net.ListenConfig{}).ListenPacket(context.Background(), network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, address, n.NSName, err)
	}
	return pc, nil
}

// Dial connects from inside the namespace with a default dialer.
func (n *Netns) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	return n.DialWith(ctx, &net.Dialer{}, network, address)
}

// DialWith connects from inside the namespace using d (for a source
// address or socket options).
func (n *Netns) DialWith(ctx context.Context, d *net.Dialer, network, address string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) {
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s %s from %s: %w", network, address, n.NSName, err)
	}
	return c, nil
}

// Exec runs a command inside the namespace (`ip netns exec`) and returns
// its combined output; the error includes the output.
func (n *Netns) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	return run(exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.NSName, name}, args...)...))
}

// run runs cmd and wraps a failure with the command line and its output.
func run(cmd *exec.Cmd) ([]byte, error) {
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Pod is a pod network namespace: eth0 is a veth whose peer is attached to
// the node bridge, lo is up, default routes point at the bridge.
type Pod struct {
	Netns
	// Index is the pod's position in the topology.
	Index int
	// Node is the namespace holding the bridge.
	Node *Netns
	// IPv4 and IPv6 are eth0's addresses.
	IPv4, IPv6 netip.Addr
	// HostVeth is the name of eth0's peer in the node namespace.
	HostVeth string

	topo *Topology
}

// Addr returns the pod's address of the family of like (4 or 6).
func (p *Pod) Addr(v6 bool) netip.Addr {
	if v6 {
		return p.IPv6
	}
	return p.IPv4
}

// Topology is a node namespace with a bridge and pods attached to it. All
// of it is removed by the test's cleanup.
type Topology struct {
	// ID is the random part of every name the topology creates.
	ID   string
	Node *Netns
	Pods []*Pod

	tb testing.TB

	mu       sync.Mutex // guards cgroup and cleanups
	cgroup   *cgroupTree
	nsNames  []string
	handles  []*netns.NS
	cleanups []func() error
}

// Prefix is the name prefix of every network namespace nettest creates;
// a leak check can look for it in /run/netns.
const Prefix = "ambpf-"

// NewTopology creates the node namespace and n pods. It fails the test on
// error and registers cleanup with tb. IPv6 addresses are usable (not
// tentative) when it returns.
func NewTopology(tb testing.TB, n int) *Topology {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("nettest: network namespaces need root")
	}
	t := &Topology{ID: randomID(), tb: tb}
	tb.Cleanup(func() {
		if err := t.close(); err != nil {
			tb.Errorf("topology cleanup: %v", err)
		}
	})
	if err := t.build(n); err != nil {
		tb.Fatalf("build topology: %v", err)
	}
	return t
}

func randomID() string {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b[:])
}

func (t *Topology) build(n int) error {
	node, err := t.addNetns("node")
	if err != nil {
		return err
	}
	t.Node = node
	if err := node.Do(func() error { return setupNode() }); err != nil {
		return fmt.Errorf("set up node %s: %w", node.NSName, err)
	}
	for i := 0; i < n; i++ {
		p, err := t.addPod(i)
		if err != nil {
			return err
		}
		t.Pods = append(t.Pods, p)
	}
	return t.waitAddrs()
}

// addNetns creates /run/netns/ambpf-<id>-<suffix> and opens it.
func (t *Topology) addNetns(suffix string) (*Netns, error) {
	name := Prefix + t.ID + "-" + suffix
	if _, err := run(exec.Command("ip", "netns", "add", name)); err != nil {
		return nil, err
	}
	t.nsNames = append(t.nsNames, name)
	path := filepath.Join("/run/netns", name)
	h, err := netns.Open(path)
	if err != nil {
		return nil, err
	}
	t.handles = append(t.handles, h)
	if err := h.Do(func() error { return linkUp("lo") }); err != nil {
		return nil, fmt.Errorf("lo up in %s: %w", name, err)
	}
	return &Netns{Name: suffix, NSName: name, NSPath: path, NS: h}, nil
}

// setupNode runs inside the node namespace: bridge with the gateway and
// probe source addresses, forwarding on.
func setupNode() error {
	for _, kv := range [][2]string{
		{"net/ipv4/ip_forward", "1"},
		{"net/ipv6/conf/all/forwarding", "1"},
		{"net/ipv6/conf/default/accept_dad", "0"},
	} {
		if err := sysctl(kv[0], kv[1]); err != nil {
			return err
		}
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName}}
	if err := netlink.LinkAdd(br); err != nil {
		return fmt.Errorf("add bridge: %w", err)
	}
	if err := sysctl("net/ipv6/conf/"+bridgeName+"/accept_dad", "0"); err != nil {
		return err
	}
	link, err := netlink.LinkByName(bridgeName)
	if err != nil {
		return fmt.Errorf("find bridge: %w", err)
	}
	for _, p := range []netip.Prefix{
		netip.PrefixFrom(BridgeV4, prefixV4),
		netip.PrefixFrom(BridgeV6, prefixV6),
		netip.PrefixFrom(meshconst.ProbeSourceV4, 32),
		netip.PrefixFrom(meshconst.ProbeSourceV6, 128),
	} {
		if err := addrAdd(link, p); err != nil {
			return err
		}
	}
	return netlink.LinkSetUp(link)
}

func (t *Topology) addPod(i int) (*Pod, error) {
	name := fmt.Sprintf("pod%d", i)
	ns, err := t.addNetns(name)
	if err != nil {
		return nil, err
	}
	host := byte(firstPodHost + i)
	v4 := BridgeV4.As4()
	v4[3] = host
	v6 := BridgeV6.As16()
	v6[15] = host
	p := &Pod{
		Netns:    *ns,
		Index:    i,
		Node:     t.Node,
		IPv4:     netip.AddrFrom4(v4),
		IPv6:     netip.AddrFrom16(v6),
		HostVeth: fmt.Sprintf("veth%d", i),
		topo:     t,
	}
	// The veth is created in the node with its peer placed straight into
	// the pod, so no device ever appears in the caller's namespace.
	err = t.Node.Do(func() error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: p.HostVeth},
			PeerName:      "eth0",
			PeerNamespace: netlink.NsFd(p.NS.Fd()),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", p.HostVeth, err)
		}
		br, err := netlink.LinkByName(bridgeName)
		if err != nil {
			return fmt.Errorf("find bridge: %w", err)
		}
		l, err := netlink.LinkByName(p.HostVeth)
		if err != nil {
			return fmt.Errorf("find %s: %w", p.HostVeth, err)
		}
		if err := netlink.LinkSetMaster(l, br); err != nil {
			return fmt.Errorf("attach %s to bridge: %w", p.HostVeth, err)
		}
		return netlink.LinkSetUp(l)
	})
	if err != nil {
		return nil, fmt.Errorf("node side of %s: %w", name, err)
	}
	if err := p.Do(func() error { return setupPod(p) }); err != nil {
		return nil, fmt.Errorf("set up %s: %w", p.Name, err)
	}
	return p, nil
}

// setupPod runs inside the pod namespace.
func setupPod(p *Pod) error {
	// Unprivileged ICMP sockets let the scenarios ping without raw sockets.
	if err := sysctl("net/ipv4/ping_group_range", "0 2147483647"); err != nil {
		return err
	}
	if err := sysctl("net/ipv6/conf/eth0/accept_dad", "0"); err != nil {
		return err
	}
	link, err := netlink.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("find eth0: %w", err)
	}
	if err := addrAdd(link, netip.PrefixFrom(p.IPv4, prefixV4)); err != nil {
		return err
	}
	if err := addrAdd(link, netip.PrefixFrom(p.IPv6, prefixV6)); err != nil {
		return err
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("eth0 up: %w", err)
	}
	for _, gw := range []netip.Addr{BridgeV4, BridgeV6} {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw.AsSlice()}
		if err := netlink.RouteAdd(r); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	return nil
}

func addrAdd(link netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: &net.IPNet{
		IP:   p.Addr().AsSlice(),
		Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
	}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := netlink.AddrAdd(link, a); err != nil {
		return fmt.Errorf("add %s to %s: %w", p, link.Attrs().Name, err)
	}
	return nil
}

func linkUp(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s: %w", name, err)
	}
	return netlink.LinkSetUp(l)
}

// sysctl writes a /proc/sys/net key; it must run inside the target
// namespace because /proc/sys/net resolves to the opener's namespace.
func sysctl(key, value string) error {
	if err := os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

// waitAddrs waits until no IPv6 address in the topology is tentative and
// every link with a carrier is running: nodad makes this quick, but the
// bridge and veths still need a moment to come up.
func (t *Topology) waitAddrs() error {
	all := []*Netns{t.Node}
	for _, p := range t.Pods {
		all = append(all, &p.Netns)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, n := range all {
		for {
			var pending string
			err := n.Do(func() error {
				addrs, err := netlink.AddrList(nil, netlink.FAMILY_V6)
				if err != nil {
					return fmt.Errorf("list addresses: %w", err)
				}
				for _, a := range addrs {
					if a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0 {
						pending = a.IPNet.String()
					}
				}
				return nil
			})
			if err != nil {
				return fmt.Errorf("wait for addresses in %s: %w", n.Name, err)
			}
			if pending == "" {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("address %s in %s still tentative", pending, n.Name)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// Pod returns pod i.
func (t *Topology) Pod(i int) *Pod { return t.Pods[i] }

// Role names an address of the topology for comparable results: "pod<i>"
// for a pod's address, "node" for the bridge, "probe" for the probe
// sources, "loopback" for 127.0.0.0/8 and ::1; otherwise the address.
func (t *Topology) Role(a netip.Addr) string {
	a = a.Unmap()
	switch {
	case !a.IsValid():
		return ""
	case a.IsLoopback():
		return "loopback"
	case a == meshconst.ProbeSourceV4 || a == meshconst.ProbeSourceV6:
		return "probe"
	case a == BridgeV4 || a == BridgeV6:
		return "node"
	}
	for _, p := range t.Pods {
		if a == p.IPv4 || a == p.IPv6 {
			return p.Name
		}
	}
	return a.String()
}

// Cleanup registers fn to run when the topology is torn down, before its
// namespaces are deleted (in reverse order of registration).
func (t *Topology) Cleanup(fn func() error) {
	t.mu.Lock()
	t.cleanups = append(t.cleanups, fn)
	t.mu.Unlock()
}

func (t *Topology) close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		errs = append(errs, t.cleanups[i]())
	}
	if t.cgroup != nil {
		errs = append(errs, t.cgroup.remove())
	}
	for _, h := range t.handles {
		errs = append(errs, h.Close())
	}
	// Deleting a namespace takes its veth end with it; the peer in the
	// other namespace goes too.
	for i := len(t.nsNames) - 1; i >= 0; i-- {
		if _, err := run(exec.Command("ip", "netns", "delete", t.nsNames[i])); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func netipJoin(a netip.Addr, port uint16) string { return netip.AddrPortFrom(a, port).String() }
