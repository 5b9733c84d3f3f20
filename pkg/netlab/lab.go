//go:build linux

// Package netlab builds throwaway network topologies on one machine: a
// "node" network namespace holding a bridge, and "pods", each a network
// namespace whose eth0 is a veth attached to that bridge, with IPv4 and
// IPv6 addresses and (on demand) a cgroup v2 directory. Tests use it
// through pkg/nettest; the demo uses it directly.
//
// Everything a Lab creates carries its name prefix and a random ID, so
// several labs can live side by side and a leak check can find what a lab
// left behind: /run/netns/<prefix><id>-<name> and <cgroup2>/<prefix><id>/.
// A Lab never touches the caller's own network namespace.
package netlab

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/nlretry"
)

// DefaultPrefix is the name prefix used when Options.Prefix is empty.
const DefaultPrefix = "ambpf-"

// Addresses of the node bridge; pod i gets .(10+i) and ::(10+i) in the
// same subnets. The node also holds the kubelet probe source addresses
// (meshconst.ProbeSourceV4/V6), so a probe-like connection can be made
// from it.
var (
	BridgeV4 = netip.MustParseAddr("10.77.0.1")
	BridgeV6 = netip.MustParseAddr("fd77::1")
)

const (
	prefixV4 = 24
	prefixV6 = 64
	// firstPodHost is the host part of pod 0's addresses.
	firstPodHost = 10
	maxPods      = 254 - firstPodHost
	bridgeName   = "br0"
	nodeName     = "node"
)

// Options configure Build.
type Options struct {
	// Prefix starts the name of every namespace and cgroup the lab
	// creates; DefaultPrefix when empty.
	Prefix string
	// Pods names the pods, in order: lowercase letters, digits and '-'
	// ("app-a"). Pod i is Lab.Pods[i].
	Pods []string
}

// Lab is a node namespace with a bridge and pods attached to it. Close
// removes all of it.
type Lab struct {
	// ID is the random part of every name the lab creates.
	ID string
	// Prefix is the name prefix in use.
	Prefix string
	Node   *Netns
	Pods   []*Pod

	mu       sync.Mutex // guards everything below
	closed   bool
	cgroup   *cgroupTree
	nsNames  []string
	handles  []*netns.NS
	cleanups []func() error
}

var podNamePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,30}$`)

// Build creates the node namespace and the pods. IPv6 addresses are usable
// (not tentative) when it returns. On error everything already created is
// removed and the error says what failed. It needs root.
func Build(opts Options) (*Lab, error) {
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if len(opts.Pods) > maxPods {
		return nil, fmt.Errorf("build lab: %d pods, at most %d", len(opts.Pods), maxPods)
	}
	seen := map[string]bool{nodeName: true}
	for _, name := range opts.Pods {
		if !podNamePattern.MatchString(name) || seen[name] {
			return nil, fmt.Errorf("build lab: invalid or duplicate pod name %q", name)
		}
		seen[name] = true
	}
	l := &Lab{ID: randomID(), Prefix: opts.Prefix}
	if err := l.build(opts.Pods); err != nil {
		if cerr := l.Close(); cerr != nil {
			err = fmt.Errorf("%w (cleanup: %v)", err, cerr)
		}
		return nil, fmt.Errorf("build lab %s%s: %w", l.Prefix, l.ID, err)
	}
	return l, nil
}

func randomID() string {
	var b [4]byte
	rand.Read(b[:]) // never fails (crypto/rand panics instead)
	return hex.EncodeToString(b[:])
}

func (l *Lab) build(pods []string) error {
	node, err := l.addNetns(nodeName)
	if err != nil {
		return err
	}
	l.Node = node
	if err := node.Do(setupNode); err != nil {
		return fmt.Errorf("set up node %s: %w", node.NSName, err)
	}
	for i, name := range pods {
		p, err := l.addPod(i, name)
		if err != nil {
			return err
		}
		l.Pods = append(l.Pods, p)
	}
	return l.waitAddrs()
}

// addNetns creates /run/netns/<prefix><id>-<suffix>, opens it and brings
// its lo up.
func (l *Lab) addNetns(suffix string) (*Netns, error) {
	name := l.Prefix + l.ID + "-" + suffix
	if _, err := Run(exec.Command("ip", "netns", "add", name)); err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.nsNames = append(l.nsNames, name)
	l.mu.Unlock()
	path := filepath.Join("/run/netns", name)
	h, err := netns.Open(path)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.handles = append(l.handles, h)
	l.mu.Unlock()
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
	link, err := nlretry.LinkByName(bridgeName)
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

func (l *Lab) addPod(i int, name string) (*Pod, error) {
	ns, err := l.addNetns(name)
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
		Node:     l.Node,
		IPv4:     netip.AddrFrom4(v4),
		IPv6:     netip.AddrFrom16(v6),
		HostVeth: fmt.Sprintf("veth%d", i),
		lab:      l,
	}
	// The veth is created in the node with its peer placed straight into
	// the pod, so no device ever appears in the caller's namespace.
	err = l.Node.Do(func() error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: p.HostVeth},
			PeerName:      "eth0",
			PeerNamespace: netlink.NsFd(p.NS.Fd()),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", p.HostVeth, err)
		}
		br, err := nlretry.LinkByName(bridgeName)
		if err != nil {
			return fmt.Errorf("find bridge: %w", err)
		}
		hv, err := nlretry.LinkByName(p.HostVeth)
		if err != nil {
			return fmt.Errorf("find %s: %w", p.HostVeth, err)
		}
		if err := netlink.LinkSetMaster(hv, br); err != nil {
			return fmt.Errorf("attach %s to bridge: %w", p.HostVeth, err)
		}
		return netlink.LinkSetUp(hv)
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
	// Unprivileged ICMP sockets let tests ping without raw sockets.
	if err := sysctl("net/ipv4/ping_group_range", "0 2147483647"); err != nil {
		return err
	}
	if err := sysctl("net/ipv6/conf/eth0/accept_dad", "0"); err != nil {
		return err
	}
	link, err := nlretry.LinkByName("eth0")
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
	l, err := nlretry.LinkByName(name)
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

// waitAddrs waits until no IPv6 address in the lab is tentative: nodad
// makes this quick, but the bridge and veths still need a moment.
func (l *Lab) waitAddrs() error {
	all := []*Netns{l.Node}
	for _, p := range l.Pods {
		all = append(all, &p.Netns)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, n := range all {
		for {
			var pending string
			err := n.Do(func() error {
				addrs, err := nlretry.AddrList(nil, netlink.FAMILY_V6)
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
func (l *Lab) Pod(i int) *Pod { return l.Pods[i] }

// PodNamed returns the pod called name, or nil.
func (l *Lab) PodNamed(name string) *Pod {
	for _, p := range l.Pods {
		if p.Name == name {
			return p
		}
	}
	return nil
}

// Role names an address of the lab for comparable results: the pod's
// name for a pod's address, "node" for the bridge, "probe" for the probe
// sources, "loopback" for 127.0.0.0/8 and ::1; otherwise the address.
func (l *Lab) Role(a netip.Addr) string {
	a = a.Unmap()
	switch {
	case !a.IsValid():
		return ""
	case a.IsLoopback():
		return "loopback"
	case a == meshconst.ProbeSourceV4 || a == meshconst.ProbeSourceV6:
		return "probe"
	case a == BridgeV4 || a == BridgeV6:
		return nodeName
	}
	for _, p := range l.Pods {
		if a == p.IPv4 || a == p.IPv6 {
			return p.Name
		}
	}
	return a.String()
}

// Cleanup registers fn to run when the lab is closed, before its cgroups
// and namespaces are removed, in reverse order of registration. After
// Close, fn runs at once.
func (l *Lab) Cleanup(fn func() error) {
	l.mu.Lock()
	if !l.closed {
		l.cleanups = append(l.cleanups, fn)
		l.mu.Unlock()
		return
	}
	l.mu.Unlock()
	fn()
}

// Close removes everything the lab created: it runs the registered
// cleanups, kills the processes left in the pods' cgroups and removes the
// cgroups, closes its namespace handles and deletes the namespaces (which
// takes the veths and the bridge with them). It is safe on a partly built
// lab and idempotent: only the first call does anything. It returns every
// failure joined.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	cleanups, cg, handles, names := l.cleanups, l.cgroup, l.handles, l.nsNames
	l.cleanups, l.cgroup, l.handles, l.nsNames = nil, nil, nil, nil
	// Unlocked from here: a cleanup may call back into the lab.
	l.mu.Unlock()

	var errs []error
	for i := len(cleanups) - 1; i >= 0; i-- {
		errs = append(errs, cleanups[i]())
	}
	if cg != nil {
		errs = append(errs, cg.remove())
	}
	for _, h := range handles {
		errs = append(errs, h.Close())
	}
	for i := len(names) - 1; i >= 0; i-- {
		if _, err := Run(exec.Command("ip", "netns", "delete", names[i])); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Run runs cmd and returns its combined output; a failure is wrapped with
// the command line and the output.
func Run(cmd *exec.Cmd) ([]byte, error) {
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// RemovePod does to p what a container runtime does when a pod goes away
// under the node: with deleteVeth, it first deletes the pod's veth pair
// from the node (as the CNI plugin's DEL would); then it removes the
// pod's /run/netns name (unmounting the bind mount) and closes the lab's
// handle. The namespace itself lives on while anything else still holds
// it: a socket in it, an open descriptor, a process. RemovePod returns
// the namespace's ID, so a test can look for whoever holds it. p must not
// be used afterwards; Close leaves it out.
func (l *Lab) RemovePod(p *Pod, deleteVeth bool) (netns.ID, error) {
	id, err := p.NS.ID()
	if err != nil {
		return id, fmt.Errorf("remove %s: %w", p.Name, err)
	}
	if deleteVeth {
		err := l.Node.Do(func() error {
			link, err := nlretry.LinkByName(p.HostVeth)
			if err != nil {
				return err
			}
			return netlink.LinkDel(link)
		})
		if err != nil {
			return id, fmt.Errorf("remove %s: delete veth %s: %w", p.Name, p.HostVeth, err)
		}
	}
	l.mu.Lock()
	l.handles = slices.DeleteFunc(l.handles, func(h *netns.NS) bool { return h == p.NS })
	l.nsNames = slices.DeleteFunc(l.nsNames, func(n string) bool { return n == p.NSName })
	l.mu.Unlock()
	errs := []error{p.NS.Close()}
	if _, err := Run(exec.Command("ip", "netns", "delete", p.NSName)); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return id, fmt.Errorf("remove %s: %w", p.Name, err)
	}
	return id, nil
}
