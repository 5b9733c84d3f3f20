//go:build linux

package hbone

import (
	"errors"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// UDPBufferSize is the socket buffer size quic-go asks for in each
// direction (its desiredBufferSize on Linux).
const UDPBufferSize = 7 << 20

// TuneUDP prepares a socket for QUIC as quic-go recommends: receive and
// send buffers of UDPBufferSize (SO_RCVBUF/SO_SNDBUF, then the FORCE
// variants, which need CAP_NET_ADMIN, when net.core.rmem_max/wmem_max
// are lower). It reports whether the kernel segments UDP for the socket
// (UDP_SEGMENT, GSO), which quic-go then uses on its own. The error names
// what the kernel limited; the socket stays usable, only slower.
func TuneUDP(c *net.UDPConn) (gso bool, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return false, fmt.Errorf("tune udp socket: %w", err)
	}
	var errs []error
	cerr := rc.Control(func(fd uintptr) {
		for _, b := range []struct {
			name        string
			opt, forced int
			sysctl      string
		}{
			{"receive", unix.SO_RCVBUF, unix.SO_RCVBUFFORCE, "net.core.rmem_max"},
			{"send", unix.SO_SNDBUF, unix.SO_SNDBUFFORCE, "net.core.wmem_max"},
		} {
			if err := growBuffer(int(fd), b.opt, b.forced); err != nil {
				errs = append(errs, fmt.Errorf("udp %s buffer: %w (raise %s to %d)", b.name, err, b.sysctl, UDPBufferSize))
			}
		}
		_, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT)
		gso = err == nil
	})
	if cerr != nil {
		return false, fmt.Errorf("tune udp socket: %w", cerr)
	}
	return gso, errors.Join(errs...)
}

// growBuffer raises one buffer to UDPBufferSize unless it is already
// there. Linux reports twice the size set (bookkeeping overhead), which
// quic-go's check counts as well.
func growBuffer(fd, opt, forced int) error {
	if got, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt); err == nil && got >= UDPBufferSize {
		return nil
	}
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, UDPBufferSize)
	if got, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt); err == nil && got >= UDPBufferSize {
		return nil
	}
	ferr := unix.SetsockoptInt(fd, unix.SOL_SOCKET, forced, UDPBufferSize)
	got, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt)
	if err != nil {
		return err
	}
	if got < UDPBufferSize {
		return fmt.Errorf("kernel allows %d KiB, want %d KiB (forcing: %v)", got/1024, UDPBufferSize/1024, ferr)
	}
	return nil
}
