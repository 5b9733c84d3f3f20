//go:build linux

package probesnat

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/packettest"
)

// Short names for the table tests.
const (
	tcActOK   = packettest.TCActOK
	tcActShot = packettest.TCActShot
	flagSYN   = packettest.SYN
	flagRST   = packettest.RST
	flagACK   = packettest.ACK
)

type tcpPacket = packettest.Packet

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs and creates network namespaces")
	}
}

// loopbackIndex is the ifindex of lo in every network namespace.
const loopbackIndex = uint32(1)

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func addrBytes(a netip.Addr) hostprobeAddr {
	var out hostprobeAddr
	copy(out.B[:], a.AsSlice())
	return out
}

func natKey(pod netip.AddrPort, hostPort uint16) hostprobeProbeKey {
	fam := uint8(unix.AF_INET6)
	if pod.Addr().Is4() {
		fam = unix.AF_INET
	}
	return hostprobeProbeKey{Pod: addrBytes(pod.Addr()), PodPort: htons(pod.Port()), HostPort: htons(hostPort), Family: fam}
}

func probeSource(v6 bool) netip.Addr {
	if v6 {
		return meshconst.ProbeSourceV6
	}
	return meshconst.ProbeSourceV4
}

// TestProgramsTranslate runs the two programs with prog.Run on crafted
// packets inside a network namespace that holds real sockets, so the
// programs' socket lookups find (or miss) real host connections: the SYN
// of a host connection gets the probe source, later packets follow the
// recorded translation, the pod's replies get the host address back, all
// with valid checksums; packets no host socket owns pass untouched; a port
// collision keeps the first connection until its socket is gone.
func TestProgramsTranslate(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 0)
	node := topo.Node
	for _, a := range []string{"fd99::1/128", "fd99::2/128", "fd99::3/128"} {
		if _, err := node.Exec(context.Background(), "ip", "addr", "add", a, "dev", "lo", "nodad"); err != nil {
			t.Fatal(err)
		}
	}
	for _, fam := range []struct {
		name             string
		host, pod, other netip.Addr
		v6               bool
	}{
		{"v4", netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3"), false},
		{"v6", netip.MustParseAddr("fd99::1"), netip.MustParseAddr("fd99::2"), netip.MustParseAddr("fd99::3"), true},
	} {
		t.Run(fam.name, func(t *testing.T) {
			var o hostprobeObjects
			if err := loadHostprobeObjects(&o, nil); err != nil {
				t.Fatalf("load: %v", err)
			}
			t.Cleanup(func() { o.Close() })
			// prog.Run runs the programs on the loopback device of the
			// calling namespace: they count under its ifindex, and only
			// once the loader has written the entry.
			if err := o.ProbeStats.Put(loopbackIndex, hostprobeProbeCounters{}); err != nil {
				t.Fatal(err)
			}

			// The "pod" is a listener, the host connections are real
			// sockets: A from host, B from another host address with A's
			// source port (the collision case).
			ln, err := node.Listen("tcp", netip.AddrPortFrom(fam.pod, 0).String())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			pod := ln.Addr().(*net.TCPAddr).AddrPort()
			connA := dialFrom(t, node, netip.AddrPortFrom(fam.host, 0), pod)
			port := connA.LocalAddr().(*net.TCPAddr).AddrPort().Port()
			connB := dialFrom(t, node, netip.AddrPortFrom(fam.other, port), pod)
			hostA := netip.AddrPortFrom(fam.host, port)
			hostB := netip.AddrPortFrom(fam.other, port)
			probe := netip.AddrPortFrom(probeSource(fam.v6), port)

			run := func(prog *ebpf.Program, p tcpPacket) (uint32, []byte) {
				t.Helper()
				var r packettest.Result
				// Inside the namespace: the programs look sockets up in
				// the caller's network namespace.
				err := node.Do(func() (err error) {
					r, err = packettest.Run(prog, p.Bytes(), 0)
					return err
				})
				if err != nil {
					t.Fatal(err)
				}
				return r.Verdict, r.Out
			}
			// expect runs a packet and checks verdict and addresses; a
			// zero want means "unchanged".
			expect := func(what string, prog *ebpf.Program, p tcpPacket, wantRet uint32, wantSrc, wantDst netip.AddrPort) {
				t.Helper()
				ret, out := run(prog, p)
				if ret != wantRet {
					t.Errorf("%s: verdict %d, want %d", what, ret, wantRet)
					return
				}
				if !wantSrc.IsValid() {
					if !bytes.Equal(out, p.Bytes()) {
						t.Errorf("%s: packet changed: %v", what, packettest.MustParse(t, out))
					}
					return
				}
				got := packettest.MustParse(t, out)
				if got.Src != wantSrc || got.Dst != wantDst {
					t.Errorf("%s: %s -> %s, want %s -> %s", what, got.Src, got.Dst, wantSrc, wantDst)
				}
				if !got.L3Valid || !got.L4Valid {
					t.Errorf("%s: checksums: ip %t tcp %t", what, got.L3Valid, got.L4Valid)
				}
				if got.Flags != p.Flags || !bytes.Equal(got.Payload, p.Payload) {
					t.Errorf("%s: flags or payload changed", what)
				}
			}
			entry := func() netip.Addr {
				t.Helper()
				var v hostprobeProbeOrig
				if err := o.ProbeNat.Lookup(natKey(pod, port), &v); err != nil {
					t.Fatalf("lookup translation: %v", err)
				}
				a := netip.AddrFrom16(v.Host.B)
				if !fam.v6 {
					a = netip.AddrFrom4([4]byte(v.Host.B[:4]))
				}
				return a
			}
			data := []byte("GET /healthz")
			var none netip.AddrPort

			expect("SYN of host socket A", o.ProbeSnat, tcpPacket{Src: hostA, Dst: pod, Flags: flagSYN}, tcActOK, probe, pod)
			if got := entry(); got != fam.host {
				t.Errorf("translation records %s, want %s", got, fam.host)
			}
			expect("data of A", o.ProbeSnat, tcpPacket{Src: hostA, Dst: pod, Flags: flagACK, Payload: data}, tcActOK, probe, pod)
			expect("data of A behind a hop-by-hop header", o.ProbeSnat, tcpPacket{Src: hostA, Dst: pod, Flags: flagACK, HopByHop: fam.v6, Payload: data}, tcActOK, probe, pod)
			expect("reply to A behind a hop-by-hop header", o.ProbeUnsnat, tcpPacket{Src: pod, Dst: probe, Flags: flagACK, HopByHop: fam.v6, Payload: data}, tcActOK, pod, hostA)
			expect("reply to A", o.ProbeUnsnat, tcpPacket{Src: pod, Dst: probe, Flags: flagACK, Payload: data}, tcActOK, pod, hostA)
			expect("SYN-ACK of A's pod", o.ProbeUnsnat, tcpPacket{Src: pod, Dst: probe, Flags: flagSYN | flagACK}, tcActOK, pod, hostA)

			unowned := netip.AddrPortFrom(fam.host, 1)
			expect("SYN no host socket owns", o.ProbeSnat, tcpPacket{Src: unowned, Dst: pod, Flags: flagSYN}, tcActOK, none, none)
			expect("ACK of an unknown connection", o.ProbeSnat, tcpPacket{Src: unowned, Dst: pod, Flags: flagACK}, tcActOK, none, none)
			expect("SYN-ACK the host answers a pod with", o.ProbeSnat, tcpPacket{Src: hostA, Dst: netip.AddrPortFrom(fam.pod, 2), Flags: flagSYN | flagACK}, tcActOK, none, none)
			expect("reply without a translation", o.ProbeUnsnat, tcpPacket{Src: pod, Dst: netip.AddrPortFrom(probe.Addr(), 1), Flags: flagACK}, tcActOK, none, none)
			expect("reply to a host address", o.ProbeUnsnat, tcpPacket{Src: pod, Dst: hostA, Flags: flagACK}, tcActOK, none, none)

			// B has A's source port to the same pod port: while A lives,
			// B's SYN is refused; B's other packets are not B's to take.
			expect("SYN of B while A lives", o.ProbeSnat, tcpPacket{Src: hostB, Dst: pod, Flags: flagSYN}, tcActShot, none, none)
			expect("ACK of B while A holds the tuple", o.ProbeSnat, tcpPacket{Src: hostB, Dst: pod, Flags: flagACK}, tcActOK, none, none)
			if got := entry(); got != fam.host {
				t.Errorf("after the refused SYN the translation records %s, want %s", got, fam.host)
			}
			abort(t, connA)
			expect("SYN of B once A is gone", o.ProbeSnat, tcpPacket{Src: hostB, Dst: pod, Flags: flagSYN}, tcActOK, probe, pod)
			if got := entry(); got != fam.other {
				t.Errorf("after A closed the translation records %s, want %s", got, fam.other)
			}
			expect("reply to B", o.ProbeUnsnat, tcpPacket{Src: pod, Dst: probe, Flags: flagACK}, tcActOK, pod, hostB)
			expect("late packet of A", o.ProbeSnat, tcpPacket{Src: hostA, Dst: pod, Flags: flagACK}, tcActOK, none, none)

			// Once B's socket is gone only its RST is still translated.
			abort(t, connB)
			expect("ACK after B's socket is gone", o.ProbeSnat, tcpPacket{Src: hostB, Dst: pod, Flags: flagACK}, tcActOK, none, none)
			expect("RST of B's abort", o.ProbeSnat, tcpPacket{Src: hostB, Dst: pod, Flags: flagRST | flagACK}, tcActOK, probe, pod)

			var c hostprobeProbeCounters
			if err := o.ProbeStats.Lookup(loopbackIndex, &c); err != nil {
				t.Fatal(err)
			}
			want := hostprobeProbeCounters{Translated: 2, Replaced: 1, Refused: 1, NotOwned: 1, Restored: 4}
			if c != want {
				t.Errorf("counters %+v, want %+v", c, want)
			}
		})
	}
}

func dialFrom(t *testing.T, n *nettest.Netns, src, dst netip.AddrPort) *net.TCPConn {
	t.Helper()
	d := &net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(src)}
	c, err := n.DialWith(context.Background(), d, "tcp", dst.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// abort closes c with a RST, so its socket is gone at once (no TIME_WAIT).
func abort(t *testing.T, c *net.TCPConn) {
	t.Helper()
	if err := c.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}
