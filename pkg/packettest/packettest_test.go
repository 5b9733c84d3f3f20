//go:build linux

package packettest

import (
	"bytes"
	"net/netip"
	"testing"
)

// TestRoundTrip builds packets of every supported shape and reads them
// back: addresses, ports, flags and payload survive, checksums verify, and
// a flipped payload bit breaks the L4 checksum (so L4Valid can fail).
func TestRoundTrip(t *testing.T) {
	v4s, v4d := netip.MustParseAddrPort("10.0.0.1:1234"), netip.MustParseAddrPort("10.0.0.2:80")
	v6s, v6d := netip.MustParseAddrPort("[fd00::1]:1234"), netip.MustParseAddrPort("[fd00::2]:80")
	for _, c := range []struct {
		name string
		p    Packet
	}{
		{"v4 tcp", Packet{Src: v4s, Dst: v4d, Flags: SYN, Payload: []byte("hello")}},
		{"v4 udp", Packet{Src: v4s, Dst: v4d, Proto: ProtoUDP, Payload: []byte("query")}},
		{"v6 tcp", Packet{Src: v6s, Dst: v6d, Proto: ProtoTCP, Flags: ACK | RST}},
		{"v6 udp behind hop-by-hop", Packet{Src: v6s, Dst: v6d, Proto: ProtoUDP, HopByHop: true, Payload: []byte("x")}},
		{"v6 tcp behind hop-by-hop", Packet{Src: v6s, Dst: v6d, Flags: SYN, HopByHop: true, Payload: []byte("odd")}},
		{"v4 tcp with options behind QinQ", Packet{Src: v4s, Dst: v4d, Flags: SYN, VLAN: []uint16{TagAD, TagQ}, IPv4Options: []byte{1, 1, 1}, Payload: []byte("o")}},
		{"v6 udp behind an extension chain", Packet{Src: v6s, Dst: v6d, Proto: ProtoUDP, Payload: []byte("chain"), Ext: []ExtHeader{
			{Type: ExtDestOpts, Len: 2048}, {Type: ExtAuth, Len: 24}, {Type: ExtRouting, Len: 40, RoutingType: 4},
		}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := c.p.Bytes()
			got, err := Parse(b)
			if err != nil {
				t.Fatal(err)
			}
			if got.Src != c.p.Src || got.Dst != c.p.Dst || got.Proto != c.p.proto() {
				t.Errorf("parsed %s -> %s proto %d, want %s -> %s proto %d", got.Src, got.Dst, got.Proto, c.p.Src, c.p.Dst, c.p.proto())
			}
			if got.Flags != c.p.Flags || !bytes.Equal(got.Payload, c.p.Payload) {
				t.Errorf("flags %#x payload %q, want %#x %q", got.Flags, got.Payload, c.p.Flags, c.p.Payload)
			}
			if !got.L3Valid || !got.L4Valid {
				t.Errorf("checksums: l3 %t l4 %t", got.L3Valid, got.L4Valid)
			}
			b[len(b)-1] ^= 0x40
			if bad := MustParse(t, b); bad.L4Valid && len(c.p.Payload) > 0 {
				t.Errorf("corrupted payload still has a valid checksum")
			}
		})
	}
	v4 := Packet{Src: v4s, Dst: v4d}.Bytes()
	v4[14+8]-- // TTL: the IPv4 header checksum no longer matches
	if got := MustParse(t, v4); got.L3Valid {
		t.Errorf("IPv4 header with a changed TTL still verifies")
	}
}

func TestParseRejectsShortPackets(t *testing.T) {
	full := Packet{Src: netip.MustParseAddrPort("10.0.0.1:1"), Dst: netip.MustParseAddrPort("10.0.0.2:2")}.Bytes()
	for _, n := range []int{0, 13, 20, 40} {
		if _, err := Parse(full[:n]); err == nil {
			t.Errorf("%d bytes parsed without error", n)
		}
	}
	arp := append([]byte(nil), full...)
	arp[12], arp[13] = 0x08, 0x06
	if _, err := Parse(arp); err == nil {
		t.Errorf("ARP ethertype parsed without error")
	}
}
