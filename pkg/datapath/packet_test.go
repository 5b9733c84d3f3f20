//go:build linux

package datapath

import (
	"encoding/binary"
	"net/netip"
)

// Minimal packet builder for prog.Run tests: Ethernet + IPv4/IPv6 (with an
// optional IPv6 hop-by-hop header) + TCP/UDP with correct checksums, so the
// programs' checksum updates can be verified on the output.

type testPacket struct {
	src, dst netip.AddrPort
	proto    uint8 // 6 TCP, 17 UDP, 1 ICMP
	syn, ack bool
	hopByHop bool
	payload  []byte
}

const (
	protoTCP  = 6
	protoUDP  = 17
	protoICMP = 1
)

func (p testPacket) bytes() []byte {
	var l4 []byte
	switch p.proto {
	case protoTCP:
		l4 = make([]byte, 20+len(p.payload))
		binary.BigEndian.PutUint16(l4[0:], p.src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
		binary.BigEndian.PutUint32(l4[4:], 1000)
		l4[12] = 5 << 4
		var flags byte
		if p.syn {
			flags |= 0x02
		}
		if p.ack {
			flags |= 0x10
			binary.BigEndian.PutUint32(l4[8:], 2000)
		}
		l4[13] = flags
		binary.BigEndian.PutUint16(l4[14:], 65535)
		copy(l4[20:], p.payload)
	case protoUDP:
		l4 = make([]byte, 8+len(p.payload))
		binary.BigEndian.PutUint16(l4[0:], p.src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		copy(l4[8:], p.payload)
	default:
		l4 = []byte{8, 0, 0, 0, 0, 1, 0, 1} // ICMP echo request
	}
	if p.proto == protoTCP || p.proto == protoUDP {
		off := 16
		if p.proto == protoUDP {
			off = 6
		}
		c := l4Checksum(p.src.Addr(), p.dst.Addr(), p.proto, l4)
		if c == 0 && p.proto == protoUDP {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(l4[off:], c)
	}

	eth := make([]byte, 14)
	copy(eth[0:6], []byte{0x02, 0, 0, 0, 0, 0x01})
	copy(eth[6:12], []byte{0x02, 0, 0, 0, 0, 0x02})
	if p.src.Addr().Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		ip := make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
		ip[8] = 64
		ip[9] = p.proto
		s, d := p.src.Addr().As4(), p.dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], checksum(ip, 0))
		return append(append(eth, ip...), l4...)
	}
	binary.BigEndian.PutUint16(eth[12:], 0x86dd)
	ip := make([]byte, 40)
	ip[0] = 0x60
	next := p.proto
	if next == protoICMP {
		next = 58
	}
	var ext []byte
	if p.hopByHop {
		ext = []byte{next, 0, 1, 4, 0, 0, 0, 0} // PadN option filling 8 bytes
		next = 0
	}
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)))
	ip[6] = next
	ip[7] = 64
	s, d := p.src.Addr().As16(), p.dst.Addr().As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(append(append(eth, ip...), ext...), l4...)
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

func fold(acc uint32) uint16 {
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	return ^uint16(acc)
}

func checksum(b []byte, acc uint32) uint16 { return fold(sum16(b, acc)) }

func pseudoSum(src, dst netip.Addr, proto uint8, length int) uint32 {
	var acc uint32
	acc = sum16(src.AsSlice(), acc)
	acc = sum16(dst.AsSlice(), acc)
	acc += uint32(proto) + uint32(length)
	return acc
}

func l4Checksum(src, dst netip.Addr, proto uint8, l4 []byte) uint16 {
	return checksum(l4, pseudoSum(src, dst, proto, len(l4)))
}

// parsedPacket is what a test reads back from a program's output.
type parsedPacket struct {
	src, dst  netip.AddrPort
	proto     uint8
	l4        []byte
	ipv4Valid bool // IPv4 header checksum verifies (always true for IPv6)
	l4Valid   bool // TCP/UDP checksum verifies
	dstMAC    []byte
}

func parsePacket(b []byte) parsedPacket {
	var p parsedPacket
	p.dstMAC = append([]byte(nil), b[0:6]...)
	var src, dst netip.Addr
	var l4 []byte
	if binary.BigEndian.Uint16(b[12:]) == 0x0800 {
		ip := b[14:34]
		p.ipv4Valid = checksum(ip, 0) == 0
		src = netip.AddrFrom4([4]byte(ip[12:16]))
		dst = netip.AddrFrom4([4]byte(ip[16:20]))
		p.proto = ip[9]
		l4 = b[34:]
	} else {
		ip := b[14:54]
		p.ipv4Valid = true
		src = netip.AddrFrom16([16]byte(ip[8:24]))
		dst = netip.AddrFrom16([16]byte(ip[24:40]))
		p.proto = ip[6]
		l4 = b[54:]
		if p.proto == 0 {
			p.proto = l4[0]
			l4 = l4[8:]
		}
	}
	p.l4 = l4
	if len(l4) >= 4 {
		p.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:]))
		p.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))
	}
	if p.proto == protoTCP || p.proto == protoUDP {
		p.l4Valid = checksum(l4, pseudoSum(src, dst, p.proto, len(l4))) == 0
	}
	return p
}
