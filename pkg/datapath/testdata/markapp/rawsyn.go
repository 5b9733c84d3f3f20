package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"syscall"
)

// sendRawSyn sends one hand-built TCP SYN to target (IPv4) from the
// pod's address: through a raw IP socket ("ip": the kernel adds the IP
// header and the packet takes the IP output path, TC included), or as a
// whole Ethernet frame through a packet socket with PACKET_QDISC_BYPASS
// ("packet": straight to the driver, past every TC program).
func sendRawSyn(how, target, dev, dstMAC string) error {
	dst, err := net.ResolveTCPAddr("tcp4", target)
	if err != nil {
		return err
	}
	// The pod's own source address: the one a UDP socket would use.
	u, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: dst.IP, Port: dst.Port})
	if err != nil {
		return err
	}
	src := u.LocalAddr().(*net.UDPAddr).IP.To4()
	u.Close()
	tcp := synSegment(src, dst.IP.To4(), 41999, uint16(dst.Port))
	switch how {
	case "ip":
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_TCP)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		sa := &syscall.SockaddrInet4{}
		copy(sa.Addr[:], dst.IP.To4())
		return syscall.Sendto(fd, tcp, 0, sa)
	case "packet":
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		mac, err := net.ParseMAC(dstMAC)
		if err != nil {
			return err
		}
		fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		const packetQdiscBypass = 20
		if err := syscall.SetsockoptInt(fd, syscall.SOL_PACKET, packetQdiscBypass, 1); err != nil {
			return fmt.Errorf("PACKET_QDISC_BYPASS: %w", err)
		}
		frame := append(append(append([]byte{}, mac...), ifi.HardwareAddr...), 0x08, 0x00)
		frame = append(frame, ipv4Header(src, dst.IP.To4(), len(tcp))...)
		frame = append(frame, tcp...)
		sll := &syscall.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6}
		copy(sll.Addr[:], mac)
		return syscall.Sendto(fd, frame, 0, sll)
	}
	return fmt.Errorf("unknown -raw-syn %q", how)
}

// synSegment is a 20-byte TCP SYN with a valid checksum.
func synSegment(src, dst net.IP, sport, dport uint16) []byte {
	t := make([]byte, 20)
	binary.BigEndian.PutUint16(t[0:], sport)
	binary.BigEndian.PutUint16(t[2:], dport)
	binary.BigEndian.PutUint32(t[4:], 0x1000)
	t[12] = 5 << 4
	t[13] = 0x02 // SYN
	binary.BigEndian.PutUint16(t[14:], 64240)
	pseudo := append(append(append([]byte{}, src...), dst...), 0, syscall.IPPROTO_TCP, 0, 20)
	binary.BigEndian.PutUint16(t[16:], checksum(append(pseudo, t...)))
	return t
}

func ipv4Header(src, dst net.IP, payload int) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+payload))
	h[6] = 0x40 // DF
	h[8] = 64
	h[9] = syscall.IPPROTO_TCP
	copy(h[12:], src)
	copy(h[16:], dst)
	binary.BigEndian.PutUint16(h[10:], checksum(h))
	return h
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}
