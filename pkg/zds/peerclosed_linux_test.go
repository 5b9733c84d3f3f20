package zds

import (
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPeerClosedAfterRecvDeadline: a Recv's read deadline that has passed
// must not make the idle check take a live peer for gone (it did, on the
// real node: the agent dropped the proxy every idle period).
func TestPeerClosedAfterRecvDeadline(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *Conn {
		f := os.NewFile(uintptr(fd), "zds-pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return &Conn{uc: c.(*net.UnixConn)}
	}
	a, b := conn(fds[0]), conn(fds[1])
	if _, _, err := a.Recv(time.Now().Add(10 * time.Millisecond)); err == nil {
		t.Fatal("Recv with nothing sent returned no error")
	}
	closed, pending, err := a.peerClosed()
	if closed || pending || err != nil {
		t.Fatalf("live idle peer after a passed deadline: closed=%v pending=%v err=%v", closed, pending, err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if closed, _, err := a.peerClosed(); !closed {
		t.Fatalf("closed peer not seen as closed (err %v)", err)
	}
}
