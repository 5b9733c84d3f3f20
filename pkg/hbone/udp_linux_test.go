//go:build linux

package hbone

import (
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestTuneUDP: as root (SO_RCVBUFFORCE) the buffers reach what quic-go
// wants whatever net.core.rmem_max says.
func TestTuneUDP(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("forcing socket buffers past net.core.rmem_max needs CAP_NET_ADMIN")
	}
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	gso, err := TuneUDP(c)
	if err != nil {
		t.Fatalf("TuneUDP as root: %v", err)
	}
	t.Logf("gso %v", gso)
	rc, _ := c.SyscallConn()
	rc.Control(func(fd uintptr) {
		for _, opt := range []int{unix.SO_RCVBUF, unix.SO_SNDBUF} {
			if got, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, opt); err != nil || got < UDPBufferSize {
				t.Errorf("buffer option %d = %d (%v), want >= %d", opt, got, err, UDPBufferSize)
			}
		}
	})
}
