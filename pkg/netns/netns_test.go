//go:build linux

package netns

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// newNS makes a network namespace with lo up; it lives as long as the
// returned handle is open.
func newNS(t *testing.T) *NS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_SYS_ADMIN) to make a network namespace")
	}
	type result struct {
		ns  *NS
		err error
	}
	done := make(chan result, 1)
	go func() {
		// The thread goes back to the process's namespace afterwards, or
		// stays locked and dies with the goroutine; it may be the main
		// thread, which the runtime never discards, so it must go back.
		runtime.LockOSThread()
		home, err := processNS()
		if err != nil {
			done <- result{nil, err}
			return
		}
		defer func() {
			if unix.Setns(home.Fd(), unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			}
		}()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			done <- result{nil, fmt.Errorf("unshare: %w", err)}
			return
		}
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			done <- result{nil, fmt.Errorf("lo up: %w", err)}
			return
		}
		ns, err := Current()
		done <- result{ns, err}
	}()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.ns.Close() })
	return r.ns
}

// socketNS is the namespace a socket belongs to (SIOCGSKNS).
func socketNS(t *testing.T, c syscall.Conn) ID {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var id ID
	var ierr error
	rc.Control(func(fd uintptr) {
		nsfd, err := unix.IoctlRetInt(int(fd), unix.SIOCGSKNS)
		if err != nil {
			ierr = err
			return
		}
		f := os.NewFile(uintptr(nsfd), "socket-netns")
		defer f.Close()
		id, ierr = (&NS{f: f}).ID()
	})
	if ierr != nil {
		t.Fatal(ierr)
	}
	return id
}

// threadsInProcessNS reports whether every thread of the process is in
// the namespace the process started in.
func threadsInProcessNS() error {
	home, err := processNS()
	if err != nil {
		return err
	}
	want, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", home.Fd()))
	if err != nil {
		return err
	}
	tasks, err := filepath.Glob("/proc/self/task/*/ns/net")
	if err != nil {
		return err
	}
	for _, p := range tasks {
		got, err := os.Readlink(p)
		if err != nil {
			continue // the thread exited meanwhile
		}
		if got != want {
			return fmt.Errorf("%s is %s, want %s", p, got, want)
		}
	}
	return nil
}

// TestDialContext: the socket of a DialContext is made inside the
// namespace (it reaches a listener only that namespace has, and
// SIOCGSKNS names the namespace), the Dialer's Control runs on it, a
// failing dial is an error, and afterwards every thread of the process
// is back in the process's namespace.
func TestDialContext(t *testing.T) {
	ns := newNS(t)
	nsID, err := ns.ID()
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	if err := ns.Do(func() (err error) { ln, err = net.Listen("tcp4", "127.0.0.1:0"); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	const mark = 0x539
	d := &net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		rc.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
		return err
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Go(func() {
			c, err := ns.DialContext(ctx, d, "tcp4", ln.Addr().String())
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if id := socketNS(t, c.(*net.TCPConn)); id != nsID {
				errs <- fmt.Errorf("dial %d: socket in namespace %v, want %v", i, id, nsID)
				return
			}
			rc, _ := c.(*net.TCPConn).SyscallConn()
			var got int
			rc.Control(func(fd uintptr) { got, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) })
			if got != mark {
				errs <- fmt.Errorf("dial %d: SO_MARK %#x, want %#x (Control not applied)", i, got, mark)
				return
			}
			msg := []byte{byte(i)}
			buf := make([]byte, 1)
			if _, err := c.Write(msg); err != nil {
				errs <- err
				return
			}
			if _, err := io.ReadFull(c, buf); err != nil || buf[0] != msg[0] {
				errs <- fmt.Errorf("dial %d: echo %v, %v", i, buf, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// Nothing listens on another port of the namespace's loopback.
	probe, err := net.Listen("tcp4", "127.0.0.1:0") // a port free here says nothing about ns
	if err != nil {
		t.Fatal(err)
	}
	port := probe.Addr().(*net.TCPAddr).Port
	probe.Close()
	if _, err := ns.DialContext(ctx, d, "tcp4", fmt.Sprintf("127.0.0.1:%d", port)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial to a closed port in the namespace: %v, want connection refused", err)
	}
	if _, err := ns.DialContext(ctx, &net.Dialer{ControlContext: func(context.Context, string, string, syscall.RawConn) error { return nil }}, "tcp4", ln.Addr().String()); err == nil {
		t.Error("a Dialer with ControlContext was accepted")
	}

	deadline := time.Now().Add(10 * time.Second)
	for {
		err := threadsInProcessNS()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the dials: %v", err)
		}
		time.Sleep(10 * time.Millisecond) // a thread may still be exiting
	}
}
