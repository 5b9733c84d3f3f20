//go:build linux

package nettest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// Ports the scenario apps listen on.
const (
	AppPort    = 8080
	DNSAppPort = 53
	UDPAppPort = 9999
)

// App is a set of test servers inside one namespace: TCP servers that
// greet each connection with "app <name> peer=<ip>" and then echo lines,
// and UDP servers that answer each datagram with "udp <name> peer=<ip>".
// It records every peer it served.
type App struct {
	name string

	mu      sync.Mutex
	seen    []Seen
	closers []io.Closer
	wg      sync.WaitGroup
}

// Seen is one connection or datagram an App received.
type Seen struct {
	Proto string // "tcp" or "udp"
	Port  uint16
	Peer  netip.AddrPort
}

// StartApp starts TCP servers on [::]:tcpPorts and UDP servers on
// [::]:udpPorts inside n. name is what the app calls itself in answers.
func StartApp(n *Netns, name string, tcpPorts, udpPorts []uint16) (*App, error) {
	a := &App{name: name}
	for _, port := range tcpPorts {
		l, err := n.Listen("tcp", fmt.Sprintf("[::]:%d", port))
		if err != nil {
			a.Close()
			return nil, err
		}
		a.closers = append(a.closers, l)
		a.wg.Add(1)
		go a.serveTCP(l, port)
	}
	for _, port := range udpPorts {
		pc, err := n.ListenPacket("udp", fmt.Sprintf("[::]:%d", port))
		if err != nil {
			a.Close()
			return nil, err
		}
		a.closers = append(a.closers, pc)
		a.wg.Add(1)
		go a.serveUDP(pc.(*net.UDPConn), port)
	}
	return a, nil
}

// Close stops the servers, closes their connections and waits for them.
func (a *App) Close() error {
	a.mu.Lock()
	var errs []error
	for _, c := range a.closers {
		if err := c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	a.mu.Unlock()
	a.wg.Wait()
	return errors.Join(errs...)
}

// Seen returns a copy of what the app received so far.
func (a *App) Seen() []Seen {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]Seen(nil), a.seen...)
}

func (a *App) record(s Seen) {
	a.mu.Lock()
	a.seen = append(a.seen, s)
	a.mu.Unlock()
}

func (a *App) serveTCP(l net.Listener, port uint16) {
	defer a.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		peer := unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort())
		a.record(Seen{Proto: "tcp", Port: port, Peer: peer})
		a.mu.Lock()
		a.closers = append(a.closers, c)
		a.mu.Unlock()
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			defer c.Close()
			fmt.Fprintf(c, "app %s peer=%s\n", a.name, peer.Addr())
			io.Copy(c, c)
		}()
	}
}

func (a *App) serveUDP(c *net.UDPConn, port uint16) {
	defer a.wg.Done()
	buf := make([]byte, 2048)
	for {
		_, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		peer := unmap(from)
		a.record(Seen{Proto: "udp", Port: port, Peer: peer})
		c.WriteToUDPAddrPort([]byte(fmt.Sprintf("udp %s peer=%s\n", a.name, peer.Addr())), from)
	}
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Timeouts of the scenario clients: short, because a captured connection
// either answers at once or is refused/dropped. The dial timeout covers
// the first SYN retransmission (1 s) with room to spare, so one SYN lost to a loaded
// machine (neighbour discovery on a fresh topology) is not a failure.
const (
	DialTimeout  = 2500 * time.Millisecond
	ReplyTimeout = 1500 * time.Millisecond
)

// TCPConn is a client connection opened by OpenTCP.
type TCPConn struct {
	Conn net.Conn
	// Local is the client's own address (v4-mapped unmapped).
	Local netip.AddrPort
	// Greeting is the first line the server sent, without the newline.
	Greeting string

	r *bufio.Reader
}

// OpenTCP connects with dial and reads the server's greeting line.
func OpenTCP(dial func(context.Context) (net.Conn, error)) (*TCPConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), DialTimeout)
	defer cancel()
	c, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	tc := &TCPConn{Conn: c, Local: unmap(c.LocalAddr().(*net.TCPAddr).AddrPort()), r: bufio.NewReader(c)}
	c.SetReadDeadline(time.Now().Add(ReplyTimeout))
	line, err := tc.r.ReadString('\n')
	if err != nil {
		return tc, fmt.Errorf("read greeting: %w", err)
	}
	tc.Greeting = strings.TrimSuffix(line, "\n")
	return tc, nil
}

// Echo sends a line and checks that the same line comes back.
func (tc *TCPConn) Echo(msg string) error {
	tc.Conn.SetDeadline(time.Now().Add(ReplyTimeout))
	if _, err := io.WriteString(tc.Conn, msg+"\n"); err != nil {
		return fmt.Errorf("write echo: %w", err)
	}
	line, err := tc.r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if line != msg+"\n" {
		return fmt.Errorf("echo: got %q, want %q", line, msg)
	}
	return nil
}

// Close closes the connection.
func (tc *TCPConn) Close() error { return tc.Conn.Close() }

// UDPExchange sends a query datagram to dst on c (an unconnected socket)
// and returns the first answer and its source. Like TCP's SYN, the query
// is sent again after 1 s without an answer, once: a datagram lost to a
// loaded machine (neighbour discovery on a fresh topology) is not a
// failure, while a path that drops or refuses them still fails, after
// DialTimeout.
func UDPExchange(c *net.UDPConn, dst netip.AddrPort) (answer string, from netip.AddrPort, err error) {
	deadline := time.Now().Add(DialTimeout)
	buf := make([]byte, 2048)
	for try := 0; ; try++ {
		if _, err := c.WriteToUDPAddrPort([]byte("query\n"), dst); err != nil {
			return "", from, fmt.Errorf("send to %s: %w", dst, err)
		}
		wait := deadline
		if try == 0 {
			wait = time.Now().Add(time.Second)
		}
		c.SetReadDeadline(wait)
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err == nil {
			return strings.TrimSuffix(string(buf[:n]), "\n"), unmap(from), nil
		}
		if try > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return "", from, fmt.Errorf("read answer from %s: %w", dst, err)
		}
	}
}

// Ping sends one ICMP echo request from inside n to dst over an
// unprivileged ICMP socket (the topology allows them in pods) and returns
// the source of the echo reply.
func Ping(n *Netns, dst netip.Addr) (netip.Addr, error) {
	network, laddr := "udp4", "0.0.0.0"
	var typ icmp.Type = ipv4.ICMPTypeEcho
	proto := 1
	if dst.Is6() {
		network, laddr, typ, proto = "udp6", "::", ipv6.ICMPTypeEchoRequest, 58
	}
	var c *icmp.PacketConn
	if err := n.Do(func() (err error) {
		c, err = icmp.ListenPacket(network, laddr)
		return err
	}); err != nil {
		return netip.Addr{}, fmt.Errorf("icmp socket in %s: %w", n.Name, err)
	}
	defer c.Close()
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: 1, Seq: 1, Data: []byte("nettest")}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("marshal echo: %w", err)
	}
	if _, err := c.WriteTo(b, &net.UDPAddr{IP: dst.AsSlice()}); err != nil {
		return netip.Addr{}, fmt.Errorf("ping %s: %w", dst, err)
	}
	c.SetReadDeadline(time.Now().Add(ReplyTimeout))
	buf := make([]byte, 1500)
	for {
		k, from, err := c.ReadFrom(buf)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("ping %s: %w", dst, err)
		}
		m, err := icmp.ParseMessage(proto, buf[:k])
		if err != nil {
			continue
		}
		if m.Type == ipv4.ICMPTypeEchoReply || m.Type == ipv6.ICMPTypeEchoReply {
			ua := from.(*net.UDPAddr)
			a, _ := netip.AddrFromSlice(ua.IP)
			return a.Unmap(), nil
		}
	}
}
