//go:build linux

// Package sockopt sets the socket options a transparent mesh proxy needs
// (SO_MARK, IP_TRANSPARENT, IP_FREEBIND, SO_REUSEPORT) through the Control
// hooks of net.ListenConfig and net.Dialer, and reads SO_ORIGINAL_DST.
package sockopt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Opt sets one option on a raw socket descriptor. family is the socket's
// address family (unix.AF_INET or unix.AF_INET6).
type Opt func(fd, family int) error

// Control returns a Control hook for net.ListenConfig or net.Dialer that
// applies opts in order and stops at the first error.
func Control(opts ...Opt) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var err error
		cerr := c.Control(func(fd uintptr) {
			family, ferr := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
			if ferr != nil {
				err = fmt.Errorf("get socket family: %w", ferr)
				return
			}
			for _, o := range opts {
				if err = o(int(fd), family); err != nil {
					return
				}
			}
		})
		if cerr != nil {
			return fmt.Errorf("control %s socket %s: %w", network, address, cerr)
		}
		return err
	}
}

// Mark sets SO_MARK to m.
func Mark(m uint32) Opt {
	return func(fd, _ int) error {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(m)); err != nil {
			return fmt.Errorf("set SO_MARK %#x: %w", m, err)
		}
		return nil
	}
}

// ReusePort sets SO_REUSEPORT.
func ReusePort() Opt {
	return func(fd, _ int) error {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return fmt.Errorf("set SO_REUSEPORT: %w", err)
		}
		return nil
	}
}

// Transparent sets IP_TRANSPARENT on IPv4 sockets. On IPv6 sockets it sets
// IPV6_TRANSPARENT and, because a dual-stack [::] socket also carries IPv4
// traffic, IP_TRANSPARENT as well.
func Transparent() Opt {
	return perFamily("IP_TRANSPARENT", unix.IP_TRANSPARENT, unix.IPV6_TRANSPARENT)
}

// Freebind sets IP_FREEBIND (and IPV6_FREEBIND on IPv6 sockets), allowing a
// bind to an address that is not (yet) local.
func Freebind() Opt {
	return perFamily("IP_FREEBIND", unix.IP_FREEBIND, unix.IPV6_FREEBIND)
}

// perFamily sets the IPv4 option v4 on every socket and the IPv6 option v6
// on AF_INET6 sockets. The kernel accepts SOL_IP options on TCP and UDP
// IPv6 sockets, which is what makes the dual-stack case work.
func perFamily(name string, v4, v6 int) Opt {
	return func(fd, family int) error {
		if family == unix.AF_INET6 {
			if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, v6, 1); err != nil {
				return fmt.Errorf("set IPv6 %s: %w", name, err)
			}
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_IP, v4, 1); err != nil {
			return fmt.Errorf("set %s: %w", name, err)
		}
		return nil
	}
}

// soOriginalDst is SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and
// IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h); both are 80.
const soOriginalDst = 80

// OriginalDst returns the destination a connection had before netfilter NAT
// (REDIRECT/DNAT) rewrote it, from SO_ORIGINAL_DST or IP6T_SO_ORIGINAL_DST.
// For an IPv4 connection accepted on a dual-stack [::] socket (its addresses
// are v4-mapped) the IPv4 option is asked. The error wraps the errno:
// unix.ENOENT means conntrack has no entry for the connection.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	local, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, errors.New("original dst: connection has no TCP local address")
	}
	isV4 := local.IP.To4() != nil
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: %w", err)
	}
	var (
		res  netip.AddrPort
		gerr error
	)
	cerr := rc.Control(func(fd uintptr) {
		if isV4 {
			res, gerr = originalDst4(int(fd))
		} else {
			res, gerr = originalDst6(int(fd))
		}
	})
	if cerr != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst: %w", cerr)
	}
	if gerr != nil {
		return netip.AddrPort{}, fmt.Errorf("original dst of %s: %w", local, gerr)
	}
	return res, nil
}

func originalDst4(fd int) (netip.AddrPort, error) {
	var sa unix.RawSockaddrInet4
	if err := getsockopt(fd, unix.SOL_IP, soOriginalDst, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); err != nil {
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: %w", err)
	}
	return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), portFromNet(sa.Port)), nil
}

func originalDst6(fd int) (netip.AddrPort, error) {
	var sa unix.RawSockaddrInet6
	if err := getsockopt(fd, unix.SOL_IPV6, soOriginalDst, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); err != nil {
		return netip.AddrPort{}, fmt.Errorf("IP6T_SO_ORIGINAL_DST: %w", err)
	}
	return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), portFromNet(sa.Port)), nil
}

// portFromNet converts a sockaddr port, stored in network byte order, to a
// host integer.
func portFromNet(p uint16) uint16 {
	var b [2]byte
	*(*uint16)(unsafe.Pointer(&b[0])) = p
	return binary.BigEndian.Uint16(b[:])
}

func getsockopt(fd, level, name int, val unsafe.Pointer, size uintptr) error {
	l := uint32(size)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name),
		uintptr(val), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}
