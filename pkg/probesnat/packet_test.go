//go:build linux

package probesnat

import (
	"encoding/binary"
	"net/netip"
)

// A minimal Ethernet + IPv4/IPv6 + TCP builder and parser for prog.Run
// tests, with real checksums, so the programs' incremental updates can be
// verified on their output.

// TCP flags.
const (
	flagFIN = 0x01
	flagSYN = 0x02
	flagRST = 0x04
	flagACK = 0x10
)

type tcpPacket struct {
	src, dst netip.AddrPort
	flags    byte
	payload  []byte
}

func (p tcpPacket) bytes() []byte {
	l4 := make([]byte, 20+len(p.payload))
	binary.BigEndian.PutUint16(l4[0:], p.src.Port())
	binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
	binary.BigEndian.PutUint32(l4[4:], 1000)
	if p.flags&flagACK != 0 {
		binary.BigEndian.PutUint32(l4[8:], 2000)
	}
	l4[12] = 5 << 4
	l4[13] = p.flags
	binary.BigEndian.PutUint16(l4[14:], 65535)
	copy(l4[20:], p.payload)
	binary.BigEndian.PutUint16(l4[16:], checksum(l4, pseudoSum(p.src.Addr(), p.dst.Addr(), len(l4))))

	eth := []byte{0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0, 0}
	if p.src.Addr().Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		ip := make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
		ip[8] = 64
		ip[9] = protoTCP
		s, d := p.src.Addr().As4(), p.dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], checksum(ip, 0))
		return append(append(eth, ip...), l4...)
	}
	binary.BigEndian.PutUint16(eth[12:], 0x86dd)
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(l4)))
	ip[6] = protoTCP
	ip[7] = 64
	s, d := p.src.Addr().As16(), p.dst.Addr().As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(append(eth, ip...), l4...)
}

const protoTCP = 6

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

func pseudoSum(src, dst netip.Addr, length int) uint32 {
	acc := sum16(src.AsSlice(), 0)
	acc = sum16(dst.AsSlice(), acc)
	return acc + protoTCP + uint32(length)
}

// parsedPacket is what a test reads back from a program's output.
type parsedPacket struct {
	src, dst netip.AddrPort
	flags    byte
	payload  []byte
	l3Valid  bool // the IPv4 header checksum verifies (always true for IPv6)
	l4Valid  bool // the TCP checksum verifies
}

func parsePacket(b []byte) parsedPacket {
	var p parsedPacket
	var src, dst netip.Addr
	var l4 []byte
	if binary.BigEndian.Uint16(b[12:]) == 0x0800 {
		ip := b[14:34]
		p.l3Valid = checksum(ip, 0) == 0
		src = netip.AddrFrom4([4]byte(ip[12:16]))
		dst = netip.AddrFrom4([4]byte(ip[16:20]))
		l4 = b[34:]
	} else {
		ip := b[14:54]
		p.l3Valid = true
		src = netip.AddrFrom16([16]byte(ip[8:24]))
		dst = netip.AddrFrom16([16]byte(ip[24:40]))
		l4 = b[54:]
	}
	p.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:]))
	p.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))
	p.flags = l4[13]
	p.payload = l4[20:]
	p.l4Valid = checksum(l4, pseudoSum(src, dst, len(l4))) == 0
	return p
}
