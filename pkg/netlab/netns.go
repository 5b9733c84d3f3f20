//go:build linux

package netlab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"

	"github.com/ambpf/ambpf/pkg/netns"
)

// Netns is a named network namespace (/run/netns/<NSName>) owned by a Lab.
// Its methods may be called from any goroutine.
type Netns struct {
	// Name is the short name within the lab: "node", "pod0", "app-a".
	Name string
	// NSName is the name `ip netns` knows it by (<prefix><id>-<Name>).
	NSName string
	// NSPath is /run/netns/<NSName>.
	NSPath string
	// NS is an open handle, closed by the lab's Close.
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
	return Run(exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.NSName, name}, args...)...))
}

// Pod is a pod network namespace: eth0 is a veth whose peer is attached to
// the node bridge, lo is up, default routes point at the bridge.
type Pod struct {
	Netns
	// Index is the pod's position in the lab.
	Index int
	// Node is the namespace holding the bridge.
	Node *Netns
	// IPv4 and IPv6 are eth0's addresses.
	IPv4, IPv6 netip.Addr
	// HostVeth is the name of eth0's peer in the node namespace.
	HostVeth string

	lab *Lab
}

// Addr returns the pod's IPv6 address when v6 is set, else its IPv4 one.
func (p *Pod) Addr(v6 bool) netip.Addr {
	if v6 {
		return p.IPv6
	}
	return p.IPv4
}
