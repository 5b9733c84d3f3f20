//go:build linux

package datapath

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ambpf/ambpf/pkg/packettest"
)

// parseCase is one crafted packet of the parse-policy tables and what the
// program must do with it.
type parseCase struct {
	name string
	pkt  testPacket
	// edit changes the built bytes (malformed headers); nil for none.
	edit    func([]byte) []byte
	mark    uint32
	verdict uint32
	// counter, when set, must move by exactly one. Unless it is
	// unparsed, dropped_unparsed must not move.
	counter func(Counters) uint64
}

// unparsed marks the cases pkt_parse refuses: dropped and counted.
var unparsed = func(c Counters) uint64 { return c.DroppedUnparsed }

// extChain is n IPv6 extension headers of every kind an app can add.
func extChain(n int) []packettest.ExtHeader {
	kinds := []packettest.ExtHeader{
		{Type: packettest.ExtDestOpts, Len: 16},
		{Type: packettest.ExtRouting, Len: 24, RoutingType: 4},
		{Type: packettest.ExtAuth, Len: 24},
		{Type: packettest.ExtDestOpts, Len: 8},
	}
	out := make([]packettest.ExtHeader, n)
	for i := range out {
		out[i] = kinds[i%len(kinds)]
	}
	return out
}

// parseCases are the cases of the parse policy (docs/SECURITY.md)
// for one family, sent from src to dst (the pod's side first for egress).
// tcpVerdict is what the program does with a TCP SYN it could classify:
// redirect on egress, drop for want of a listener on ingress (the test
// netns has none), so either shows that the packet was classified.
func parseCases(src, dst netip.Addr, tcpVerdict uint32, tcpCounter func(Counters) uint64) []parseCase {
	syn := func(mod func(*testPacket)) testPacket {
		p := testPacket{Src: ap(src, 41000), Dst: ap(dst, 8080), Proto: protoTCP, Flags: packettest.SYN}
		mod(&p)
		return p
	}
	udp := func(port uint16, mod func(*testPacket)) testPacket {
		p := testPacket{Src: ap(src, 5353), Dst: ap(dst, port), Proto: protoUDP, Payload: bytes.Repeat([]byte("q"), 64)}
		mod(&p)
		return p
	}
	none := func(*testPacket) {}
	cases := []parseCase{
		{"802.1Q tagged syn is classified", syn(func(p *testPacket) { p.VLAN = []uint16{packettest.TagQ} }), nil, 0, tcpVerdict, tcpCounter},
		{"802.1ad+802.1Q tagged syn is classified", syn(func(p *testPacket) { p.VLAN = []uint16{packettest.TagAD, packettest.TagQ} }), nil, 0, tcpVerdict, tcpCounter},
		{"three VLAN tags are dropped", syn(func(p *testPacket) { p.VLAN = []uint16{packettest.TagAD, packettest.TagQ, packettest.TagQ} }), nil, 0, tcActShot, unparsed},
		{"TFO syn with data is classified", syn(func(p *testPacket) { p.Payload = bytes.Repeat([]byte("GET / "), 200) }), nil, 0, tcpVerdict, tcpCounter},
		{"truncated TCP header is dropped", syn(none), func(b []byte) []byte { return b[:len(b)-8] }, 0, tcActShot, unparsed},
		{"first TCP fragment is dropped", syn(func(p *testPacket) { p.Frag = &packettest.Fragment{More: true} }), nil, 0, tcActShot, unparsed},
		{"later TCP fragment is dropped", syn(func(p *testPacket) { p.Frag = &packettest.Fragment{Offset: 1480} }), nil, 0, tcActShot, unparsed},
		{"later UDP fragment passes", udp(9999, func(p *testPacket) { p.Frag = &packettest.Fragment{Offset: 1480} }), nil, 0, tcActOK, nil},
		{"first UDP fragment (not DNS) passes", udp(9999, func(p *testPacket) { p.Frag = &packettest.Fragment{More: true} }), nil, 0, tcActOK, nil},
		{"ICMP fragment passes", testPacket{Src: ap(src, 0), Dst: ap(dst, 0), Proto: protoICMP, Frag: &packettest.Fragment{Offset: 8}}, nil, 0, tcActOK, nil},
		{"truncated UDP header is dropped", udp(9999, none), func(b []byte) []byte { return b[:len(b)-64-4] }, 0, tcActShot, unparsed},
		{"ARP passes", syn(none), func(b []byte) []byte { b[12], b[13] = 0x08, 0x06; return b }, 0, tcActOK, nil},
		{"headers running past the end are dropped", syn(none), func(b []byte) []byte {
			if b[12] == 0x08 {
				b[14] = 0x4f // IHL 15: 40 bytes of options that are not there
				return b[:14+20+20]
			}
			b[14+6] = packettest.ExtDestOpts // an extension header that is not there
			return b[:14+40]
		}, 0, tcActShot, unparsed},
	}
	if src.Is4() {
		return append(cases,
			parseCase{"syn with 40 bytes of IPv4 options is classified", syn(func(p *testPacket) { p.IPv4Options = bytes.Repeat([]byte{1}, 40) }), nil, 0, tcpVerdict, tcpCounter},
			parseCase{"IHL below 5 is dropped", syn(none), func(b []byte) []byte { b[14] = 0x44; return b }, 0, tcActShot, unparsed},
		)
	}
	return append(cases,
		parseCase{"syn behind 2 KiB destination options is classified", syn(func(p *testPacket) { p.Ext = []packettest.ExtHeader{{Type: packettest.ExtDestOpts, Len: 2048}} }), nil, 0, tcpVerdict, tcpCounter},
		parseCase{"syn behind a 2 KiB segment routing header is classified", syn(func(p *testPacket) {
			p.Ext = []packettest.ExtHeader{{Type: packettest.ExtRouting, Len: 2048, RoutingType: 4}}
		}), nil, 0, tcpVerdict, tcpCounter},
		parseCase{"syn behind hop-by-hop and 4 more headers is classified", syn(func(p *testPacket) { p.HopByHop = true; p.Ext = extChain(4) }), nil, 0, tcpVerdict, tcpCounter},
		// BPF_PROG_TEST_RUN takes a packet of up to a page: 8 headers of 2
		// KiB each are tested as 8 headers and as 2 KiB.
		parseCase{"syn behind 8 headers, one of 2 KiB, is classified", syn(func(p *testPacket) {
			p.Ext = append([]packettest.ExtHeader{{Type: packettest.ExtRouting, Len: 2048, RoutingType: 4}}, extChain(7)...)
		}), nil, 0, tcpVerdict, tcpCounter},
		parseCase{"syn behind 9 headers is dropped", syn(func(p *testPacket) { p.Ext = extChain(9) }), nil, 0, tcActShot, unparsed},
		parseCase{"syn in an atomic fragment is classified", syn(func(p *testPacket) { p.Frag = &packettest.Fragment{} }), nil, 0, tcpVerdict, tcpCounter},
		parseCase{"first TCP fragment behind options is dropped", syn(func(p *testPacket) {
			p.HopByHop = true
			p.Frag = &packettest.Fragment{More: true}
		}), nil, 0, tcActShot, unparsed},
		parseCase{"later fragment of an unknown chain is dropped", syn(func(p *testPacket) { p.Frag = &packettest.Fragment{Offset: 8} }), func(b []byte) []byte {
			b[14+40] = packettest.ExtDestOpts // the fragment header's next header
			return b
		}, 0, tcActShot, unparsed},
		parseCase{"ESP passes", testPacket{Src: ap(src, 0), Dst: ap(dst, 0), Proto: 50}, nil, 0, tcActOK, nil},
		parseCase{"no next header passes", testPacket{Src: ap(src, 0), Dst: ap(dst, 0), Proto: 59, Ext: extChain(2)}, nil, 0, tcActOK, nil},
	)
}

// runner runs a program once on a packet: run, or a netnsWorker's run.
type runner func(t *testing.T, prog *ebpf.Program, pkt []byte, mark uint32) (uint32, []byte, uint32)

func runParseCases(t *testing.T, o *objects, run runner, prog *ebpf.Program, cases []parseCase) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := c.pkt.Bytes()
			if c.edit != nil {
				b = c.edit(b)
			}
			before := readCounters(t, o)
			verdict, _, _ := run(t, prog, b, c.mark)
			if verdict != c.verdict {
				t.Errorf("verdict %d, want %d", verdict, c.verdict)
			}
			after := readCounters(t, o)
			if c.counter != nil && c.counter(after) != c.counter(before)+1 {
				t.Errorf("counter %d -> %d, want +1", c.counter(before), c.counter(after))
			}
			isUnparsed := c.counter != nil && c.counter(Counters{DroppedUnparsed: 7}) == 7
			if !isUnparsed && after.DroppedUnparsed != before.DroppedUnparsed {
				t.Errorf("dropped_unparsed moved %d -> %d", before.DroppedUnparsed, after.DroppedUnparsed)
			}
		})
	}
}

// TestParsePolicyEgress runs capture_egress on packets of every shape the
// parser must walk or refuse (docs/SECURITY.md): what may be TCP is
// classified (sent back into ingress for the proxy) or dropped, never
// passed uncaptured; what is not IP, or certainly not TCP, passes.
func TestParsePolicyEgress(t *testing.T) {
	o := loadTestObjects(t)
	for _, fam := range []struct {
		name        string
		pod, remote netip.Addr
	}{{"ipv4", pod4, remote4}, {"ipv6", pod6, remote6}} {
		t.Run(fam.name, func(t *testing.T) {
			runParseCases(t, o, run, o.CaptureEgress, parseCases(fam.pod, fam.remote, tcActRedirect, nil))
		})
	}
}

// TestParsePolicyIngress is TestParsePolicyEgress for capture_ingress, in
// an empty netns: a classified inbound SYN finds no proxy listener there
// and is dropped for that (dropped_no_listener), which shows it reached
// classification instead of passing.
func TestParsePolicyIngress(t *testing.T) {
	o := loadTestObjects(t)
	ns := freshNetns(t)
	for _, fam := range []struct {
		name        string
		pod, remote netip.Addr
	}{{"ipv4", pod4, remote4}, {"ipv6", pod6, remote6}} {
		t.Run(fam.name, func(t *testing.T) {
			noListener := func(c Counters) uint64 { return c.DroppedNoListener }
			runParseCases(t, o, ns.run, o.CaptureIngress, parseCases(fam.remote, fam.pod, tcActShot, noListener))
		})
	}
}

// TestParsePolicyDNS: with DNS capture on, queries behind VLAN tags, IPv4
// options and IPv6 extension headers are rewritten to the resolver with
// valid checksums (TCP DNS with TFO data too), and a fragmented UDP query
// is dropped, its later fragments passed (they carry no port).
func TestParsePolicyDNS(t *testing.T) {
	o := loadTestObjects(t)
	setFlags(t, o, Options{DNSCapture: true})
	for _, fam := range []struct {
		name        string
		pod, remote netip.Addr
		loopback    netip.Addr
	}{
		{"ipv4", pod4, remote4, netip.MustParseAddr("127.0.0.1")},
		{"ipv6", pod6, remote6, netip.IPv6Loopback()},
	} {
		query := func(proto uint8, mod func(*testPacket)) testPacket {
			p := testPacket{Src: ap(fam.pod, 33333), Dst: ap(fam.remote, 53), Proto: proto, Flags: tcpFlags(proto, syn), Payload: []byte("query")}
			mod(&p)
			return p
		}
		rewrites := []struct {
			name string
			pkt  testPacket
		}{
			{"udp behind 802.1Q", query(protoUDP, func(p *testPacket) { p.VLAN = []uint16{packettest.TagQ} })},
			{"tcp TFO syn with data", query(protoTCP, func(p *testPacket) { p.Payload = bytes.Repeat([]byte("dns?"), 100) })},
		}
		if fam.pod.Is4() {
			rewrites = append(rewrites, struct {
				name string
				pkt  testPacket
			}{"udp with IPv4 options", query(protoUDP, func(p *testPacket) { p.IPv4Options = []byte{1, 1, 1, 1, 1, 1, 1, 0} })})
		} else {
			rewrites = append(rewrites, struct {
				name string
				pkt  testPacket
			}{"udp behind 6 extension headers", query(protoUDP, func(p *testPacket) { p.HopByHop = true; p.Ext = extChain(5) })})
		}
		for _, c := range rewrites {
			t.Run(fam.name+"/"+c.name, func(t *testing.T) {
				b := c.pkt.Bytes()
				verdict, out, _ := run(t, o.CaptureEgress, b, 0)
				if verdict != tcActRedirect {
					t.Fatalf("verdict %d, want redirect", verdict)
				}
				got := packettest.MustParse(t, out[:len(b)])
				if got.Dst != ap(fam.loopback, 15053) || got.Src != c.pkt.Src {
					t.Errorf("rewritten to %s -> %s, want %s -> %s", got.Src, got.Dst, c.pkt.Src, ap(fam.loopback, 15053))
				}
				if !got.L3Valid || !got.L4Valid || !bytes.Equal(got.Payload, c.pkt.Payload) {
					t.Errorf("after rewrite: ip checksum %t, l4 checksum %t, payload kept %t", got.L3Valid, got.L4Valid, bytes.Equal(got.Payload, c.pkt.Payload))
				}
			})
		}
		t.Run(fam.name+"/fragments", func(t *testing.T) {
			runParseCases(t, o, run, o.CaptureEgress, []parseCase{
				{"first fragment of a query is dropped", query(protoUDP, func(p *testPacket) { p.Frag = &packettest.Fragment{More: true} }), nil, 0, tcActShot, unparsed},
				{"later fragment of a query passes", query(protoUDP, func(p *testPacket) { p.Frag = &packettest.Fragment{Offset: 1480} }), nil, 0, tcActOK, nil},
				// prog.Run packets have no socket: a marked query is not the proxy's.
				{"marked fragmented query from no proxy cgroup is dropped", query(protoUDP, func(p *testPacket) { p.Frag = &packettest.Fragment{More: true} }), nil, 0x539, tcActShot, unparsed},
				{"query behind 9 headers is dropped", query(protoUDP, func(p *testPacket) {
					if p.Src.Addr().Is6() {
						p.Ext = extChain(9)
					} else {
						p.VLAN = []uint16{packettest.TagQ, packettest.TagQ, packettest.TagQ}
					}
				}), nil, 0, tcActShot, unparsed},
			})
		})
	}
}
