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

const (
	etherIPv4 = 0x0800
	etherIPv6 = 0x86dd
	ethLen    = 14
	ipv4Len   = 20
	ipv6Len   = 40
	hopByHop  = 0
	icmpV6    = 58
)

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
	Payload  []byte
}

func (p Packet) proto() uint8 {
	if p.Proto == 0 {
		return ProtoTCP
	}
	return p.Proto
}

// Bytes builds the packet: Ethernet, IPv4 (no options) or IPv6, L4, with
// valid IPv4 header and TCP/UDP checksums. The address family is Src's.
func (p Packet) Bytes() []byte {
	proto := p.proto()
	l4 := p.l4(proto)
	eth := []byte{0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0, 0}
	if p.Src.Addr().Is4() {
		binary.BigEndian.PutUint16(eth[12:], etherIPv4)
		ip := make([]byte, ipv4Len)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(ipv4Len+len(l4)))
		ip[8] = 64
		ip[9] = proto
		s, d := p.Src.Addr().As4(), p.Dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], checksum(ip, 0))
		return append(append(eth, ip...), l4...)
	}
	binary.BigEndian.PutUint16(eth[12:], etherIPv6)
	next := proto
	if next == ProtoICMP {
		next = icmpV6
	}
	var ext []byte
	if p.HopByHop {
		ext = []byte{next, 0, 1, 4, 0, 0, 0, 0} // a PadN option filling 8 bytes
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

func (p Packet) l4(proto uint8) []byte {
	var l4 []byte
	var csumOff int
	switch proto {
	case ProtoTCP:
		l4 = make([]byte, 20+len(p.Payload))
		binary.BigEndian.PutUint16(l4[0:], p.Src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.Dst.Port())
		binary.BigEndian.PutUint32(l4[4:], 1000)
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

// Parse reads a packet of the shape Bytes builds (IPv4 without options,
// IPv6 with at most a hop-by-hop header). It returns an error for a packet
// too short for its headers.
func Parse(b []byte) (Parsed, error) {
	var p Parsed
	if len(b) < ethLen {
		return p, fmt.Errorf("packet of %d bytes: no Ethernet header", len(b))
	}
	p.DstMAC = append([]byte(nil), b[0:6]...)
	var src, dst netip.Addr
	var l4 []byte
	switch binary.BigEndian.Uint16(b[12:]) {
	case etherIPv4:
		if len(b) < ethLen+ipv4Len {
			return p, fmt.Errorf("packet of %d bytes: short IPv4 header", len(b))
		}
		ip := b[ethLen : ethLen+ipv4Len]
		p.L3Valid = checksum(ip, 0) == 0
		src = netip.AddrFrom4([4]byte(ip[12:16]))
		dst = netip.AddrFrom4([4]byte(ip[16:20]))
		p.Proto = ip[9]
		l4 = b[ethLen+ipv4Len:]
	case etherIPv6:
		if len(b) < ethLen+ipv6Len {
			return p, fmt.Errorf("packet of %d bytes: short IPv6 header", len(b))
		}
		ip := b[ethLen : ethLen+ipv6Len]
		p.L3Valid = true
		src = netip.AddrFrom16([16]byte(ip[8:24]))
		dst = netip.AddrFrom16([16]byte(ip[24:40]))
		p.Proto = ip[6]
		l4 = b[ethLen+ipv6Len:]
		if p.Proto == hopByHop {
			if len(l4) < 8 {
				return p, fmt.Errorf("packet of %d bytes: short hop-by-hop header", len(b))
			}
			p.Proto = l4[0]
			l4 = l4[8:]
		}
	default:
		return p, fmt.Errorf("ethertype %#04x is not IP", binary.BigEndian.Uint16(b[12:]))
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
