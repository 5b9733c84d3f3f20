//go:build linux

// Package packettest builds and reads Ethernet + IPv4/IPv6 + TCP/UDP
// packets with real checksums, and runs TC programs on them with
// BPF_PROG_TEST_RUN, for the prog.Run tests of ambpf's BPF programs: a
// program's incremental checksum updates are verified on its output.
package packettest

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
)

// IP protocol numbers.
const (
	ProtoICMP = 1
	ProtoTCP  = 6
	ProtoUDP  = 17
)

// TCP flags.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	ACK = 0x10
)

// TC verdicts (TC_ACT_*).
const (
	TCActOK       = 0
	TCActShot     = 2
	TCActRedirect = 7
)

// VLAN tag protocol identifiers.
const (
	TagQ  = 0x8100 // 802.1Q
	TagAD = 0x88a8 // 802.1ad (the outer tag of QinQ)
)

// IPv6 extension header types.
const (
	ExtHopByHop = 0
	ExtRouting  = 43
	ExtFragment = 44
	ExtAuth     = 51
	ExtDestOpts = 60
)

const (
	etherIPv4 = 0x0800
	etherIPv6 = 0x86dd
	ethLen    = 14
	ipv4Len   = 20
	ipv6Len   = 40
	hopByHop  = 0
	icmpV6    = 58
)

// ExtHeader is an IPv6 extension header to build.
type ExtHeader struct {
	// Type is ExtHopByHop, ExtRouting, ExtDestOpts or ExtAuth (for a
	// fragment header use Packet.Frag).
	Type uint8
	// Len is the header's length in bytes: a multiple of 8 from 8 to 2048
	// (of 4 for ExtAuth), filled with a PadN option for option headers.
	Len int
	// RoutingType is the routing header's type (4: segment routing).
	RoutingType uint8
}

// Fragment makes a packet one fragment of a datagram.
type Fragment struct {
	// Offset is the fragment's offset in bytes (a multiple of 8).
	Offset int
	// More is the more-fragments flag.
	More bool
}

// Packet describes a packet to build.
type Packet struct {
	Src, Dst netip.AddrPort
	// Proto is ProtoTCP, ProtoUDP or ProtoICMP (an echo request, ICMPv6
	// for IPv6 addresses); zero means TCP.
	Proto uint8
	// Flags are the TCP flags; ACK also sets an acknowledgment number.
	Flags byte
	// HopByHop puts an IPv6 hop-by-hop options header before L4.
	HopByHop bool
	// Ext are IPv6 extension headers after HopByHop, in order.
	Ext []ExtHeader
	// VLAN are tag protocol IDs (TagQ, TagAD), outermost first, whose
	// tags go between the Ethernet header and IP.
	VLAN []uint16
	// IPv4Options are IPv4 options, padded to 4-byte words with zeros
	// (end of options list).
	IPv4Options []byte
	// Frag makes the packet a fragment: IPv4 flags and offset, or an
	// IPv6 fragment header after Ext. The L4 header is built anyway.
	Frag *Fragment
	// Seq is the TCP sequence number (1000 when zero).
	Seq     uint32
	Payload []byte
}

func (p Packet) proto() uint8 {
	if p.Proto == 0 {
		return ProtoTCP
	}
	return p.Proto
}

// Bytes builds the packet: Ethernet (with VLAN tags), IPv4 (with options)
// or IPv6 (with extension headers), L4, with valid IPv4 header and TCP/UDP
// checksums. The address family is Src's.
func (p Packet) Bytes() []byte {
	proto := p.proto()
	l4 := p.l4(proto)
	eth := []byte{0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02}
	for i, tpid := range p.VLAN {
		eth = binary.BigEndian.AppendUint16(eth, tpid)
		eth = binary.BigEndian.AppendUint16(eth, uint16(100+i)) // the VLAN ID
	}
	if p.Src.Addr().Is4() {
		eth = binary.BigEndian.AppendUint16(eth, etherIPv4)
		opts := append([]byte(nil), p.IPv4Options...)
		for len(opts)%4 != 0 {
			opts = append(opts, 0)
		}
		hlen := ipv4Len + len(opts)
		ip := make([]byte, hlen)
		ip[0] = 0x40 | byte(hlen/4)
		binary.BigEndian.PutUint16(ip[2:], uint16(hlen+len(l4)))
		binary.BigEndian.PutUint16(ip[4:], 0x4242) // identification
		if p.Frag != nil {
			fo := uint16(p.Frag.Offset / 8)
			if p.Frag.More {
				fo |= 0x2000
			}
			binary.BigEndian.PutUint16(ip[6:], fo)
		}
		ip[8] = 64
		ip[9] = proto
		s, d := p.Src.Addr().As4(), p.Dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		copy(ip[20:], opts)
		binary.BigEndian.PutUint16(ip[10:], checksum(ip, 0))
		return append(append(eth, ip...), l4...)
	}
	eth = binary.BigEndian.AppendUint16(eth, etherIPv6)
	next := proto
	if next == ProtoICMP {
		next = icmpV6
	}
	// Built from the inside out: each header names the one after it.
	var ext []byte
	if p.Frag != nil {
		fh := make([]byte, 8)
		fh[0] = next
		fo := uint16(p.Frag.Offset) &^ 7
		if p.Frag.More {
			fo |= 1
		}
		binary.BigEndian.PutUint16(fh[2:], fo)
		binary.BigEndian.PutUint32(fh[4:], 0x42424242)
		ext, next = fh, ExtFragment
	}
	for i := len(p.Ext) - 1; i >= 0; i-- {
		ext, next = append(p.Ext[i].Build(next), ext...), p.Ext[i].Type
	}
	if p.HopByHop {
		ext = append([]byte{next, 0, 1, 4, 0, 0, 0, 0}, ext...) // a PadN option filling 8 bytes
		next = hopByHop
	}
	ip := make([]byte, ipv6Len)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)))
	ip[6] = next
	ip[7] = 64
	s, d := p.Src.Addr().As16(), p.Dst.Addr().As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(append(append(eth, ip...), ext...), l4...)
}

// Build returns the header with next as its next header. Option headers
// are filled with options of an experimental type the receiver skips
// (0x1e, RFC 4727), at most 8 of them and no padding run over 7 bytes, so
// Linux (max_dst_opts_number, max_hbh_opts_number) accepts them; the
// buffer is what IPV6_HOPOPTS and IPV6_DSTOPTS take too.
func (e ExtHeader) Build(next uint8) []byte {
	h := make([]byte, e.Len)
	h[0] = next
	switch e.Type {
	case ExtAuth:
		h[1] = byte(e.Len/4 - 2)
		return h
	case ExtRouting:
		h[1] = byte(e.Len/8 - 1)
		h[2] = e.RoutingType
		if e.RoutingType == 4 && e.Len >= 24 {
			// Segment routing: the segments fill it, none left to visit.
			h[4] = byte((e.Len-8)/16 - 1) // last entry
		}
		return h
	}
	h[1] = byte(e.Len/8 - 1)
	for off := 2; off < len(h); {
		rest := len(h) - off
		if rest == 1 {
			break // a Pad1 (zero)
		}
		n := min(rest-2, 255)
		if rest-2-n == 1 {
			n-- // leaves two bytes: an empty option, not a lone Pad1 after a full one
		}
		h[off], h[off+1] = 0x1e, byte(n)
		off += 2 + n
	}
	return h
}

func (p Packet) l4(proto uint8) []byte {
	var l4 []byte
	var csumOff int
	switch proto {
	case ProtoTCP:
		l4 = make([]byte, 20+len(p.Payload))
		binary.BigEndian.PutUint16(l4[0:], p.Src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.Dst.Port())
		seq := p.Seq
		if seq == 0 {
			seq = 1000
		}
		binary.BigEndian.PutUint32(l4[4:], seq)
		if p.Flags&ACK != 0 {
			binary.BigEndian.PutUint32(l4[8:], 2000)
		}
		l4[12] = 5 << 4
		l4[13] = p.Flags
		binary.BigEndian.PutUint16(l4[14:], 65535)
		copy(l4[20:], p.Payload)
		csumOff = 16
	case ProtoUDP:
		l4 = make([]byte, 8+len(p.Payload))
		binary.BigEndian.PutUint16(l4[0:], p.Src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.Dst.Port())
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		copy(l4[8:], p.Payload)
		csumOff = 6
	default:
		// An echo request without a checksum: no program here reads it.
		return []byte{8, 0, 0, 0, 0, 1, 0, 1}
	}
	c := checksum(l4, pseudoSum(p.Src.Addr(), p.Dst.Addr(), proto, len(l4)))
	if c == 0 && proto == ProtoUDP {
		c = 0xffff // zero means "no checksum" in UDP
	}
	binary.BigEndian.PutUint16(l4[csumOff:], c)
	return l4
}

func sum16(b []byte, acc uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		acc += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		acc += uint32(b[len(b)-1]) << 8
	}
	return acc
}

func checksum(b []byte, acc uint32) uint16 {
	acc = sum16(b, acc)
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	return ^uint16(acc)
}

func pseudoSum(src, dst netip.Addr, proto uint8, length int) uint32 {
	acc := sum16(src.AsSlice(), 0)
	acc = sum16(dst.AsSlice(), acc)
	return acc + uint32(proto) + uint32(length)
}

// Parsed is what a test reads back from a program's output.
type Parsed struct {
	Src, Dst netip.AddrPort
	Proto    uint8
	// Flags are the TCP flags.
	Flags   byte
	Payload []byte
	DstMAC  []byte
	// L3Valid is true when the IPv4 header checksum verifies (always for IPv6).
	L3Valid bool
	// L4Valid is true when the TCP or UDP checksum verifies.
	L4Valid bool
}

// Parse reads a packet of the shape Bytes builds: VLAN tags, IPv4 with
// options, IPv6 with extension headers (no fragments). It returns an error
// for a packet too short for its headers.
func Parse(b []byte) (Parsed, error) {
	var p Parsed
	if len(b) < ethLen {
		return p, fmt.Errorf("packet of %d bytes: no Ethernet header", len(b))
	}
	p.DstMAC = append([]byte(nil), b[0:6]...)
	off := 12
	etherType := binary.BigEndian.Uint16(b[off:])
	for etherType == TagQ || etherType == TagAD {
		off += 4
		if len(b) < off+2 {
			return p, fmt.Errorf("packet of %d bytes: short VLAN tag", len(b))
		}
		etherType = binary.BigEndian.Uint16(b[off:])
	}
	off += 2
	var src, dst netip.Addr
	var l4 []byte
	switch etherType {
	case etherIPv4:
		if len(b) < off+ipv4Len {
			return p, fmt.Errorf("packet of %d bytes: short IPv4 header", len(b))
		}
		hlen := int(b[off]&0xf) * 4
		if len(b) < off+hlen {
			return p, fmt.Errorf("packet of %d bytes: short IPv4 options", len(b))
		}
		ip := b[off : off+hlen]
		p.L3Valid = checksum(ip, 0) == 0
		src = netip.AddrFrom4([4]byte(ip[12:16]))
		dst = netip.AddrFrom4([4]byte(ip[16:20]))
		p.Proto = ip[9]
		l4 = b[off+hlen:]
	case etherIPv6:
		if len(b) < off+ipv6Len {
			return p, fmt.Errorf("packet of %d bytes: short IPv6 header", len(b))
		}
		ip := b[off : off+ipv6Len]
		p.L3Valid = true
		src = netip.AddrFrom16([16]byte(ip[8:24]))
		dst = netip.AddrFrom16([16]byte(ip[24:40]))
		p.Proto = ip[6]
		l4 = b[off+ipv6Len:]
		for p.Proto == ExtHopByHop || p.Proto == ExtRouting || p.Proto == ExtDestOpts || p.Proto == ExtAuth {
			if len(l4) < 8 {
				return p, fmt.Errorf("packet of %d bytes: short extension header", len(b))
			}
			n := (int(l4[1]) + 1) * 8
			if p.Proto == ExtAuth {
				n = (int(l4[1]) + 2) * 4
			}
			if len(l4) < n {
				return p, fmt.Errorf("packet of %d bytes: short extension header", len(b))
			}
			p.Proto = l4[0]
			l4 = l4[n:]
		}
	default:
		return p, fmt.Errorf("ethertype %#04x is not IP", etherType)
	}
	hdr := 0
	switch p.Proto {
	case ProtoTCP:
		hdr = 20
	case ProtoUDP:
		hdr = 8
	default:
		p.Payload = l4
		return p, nil
	}
	if len(l4) < hdr {
		return p, fmt.Errorf("packet of %d bytes: short L4 header", len(b))
	}
	p.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:]))
	p.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))
	if p.Proto == ProtoTCP {
		p.Flags = l4[13]
	}
	p.Payload = l4[hdr:]
	p.L4Valid = checksum(l4, pseudoSum(src, dst, p.Proto, len(l4))) == 0
	return p, nil
}

// skbCtx is the head of struct __sk_buff, as far as BPF_PROG_TEST_RUN lets
// a test set it (len and pkt_type must be zero).
type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto uint32
	Priority, IngressIfindex, Ifindex, TCIndex                                  uint32
	CB                                                                          [5]uint32
}

// Result is what a TC program did to a packet.
type Result struct {
	Verdict uint32
	// Out is the packet as the program left it.
	Out []byte
	// Mark is skb->mark afterwards.
	Mark uint32
}

// Run runs the TC program prog once on pkt, with skb->mark set to mark.
// Socket lookups the program makes see the network namespace of the
// calling thread.
func Run(prog *ebpf.Program, pkt []byte, mark uint32) (Result, error) {
	// The kernel writes back all of struct __sk_buff: leave room for it.
	var ctxOut struct {
		skbCtx
		Rest [48]uint32
	}
	opts := &ebpf.RunOptions{
		Data:       pkt,
		DataOut:    make([]byte, len(pkt)+256),
		Context:    skbCtx{Mark: mark},
		ContextOut: &ctxOut,
	}
	ret, err := prog.Run(opts)
	if err != nil {
		return Result{}, fmt.Errorf("run %s: %w", prog, err)
	}
	return Result{Verdict: ret, Out: opts.DataOut, Mark: ctxOut.Mark}, nil
}

// MustParse is Parse for tests: a packet that does not parse fails tb.
func MustParse(tb testing.TB, b []byte) Parsed {
	tb.Helper()
	p, err := Parse(b)
	if err != nil {
		tb.Fatalf("parse output packet: %v", err)
	}
	return p
}
