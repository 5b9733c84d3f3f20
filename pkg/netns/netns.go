//go:build linux

// Package netns opens Linux network namespaces and runs code inside them.
//
// Goroutines and setns(2) do not mix: the Go scheduler moves goroutines
// between OS threads, and a network namespace belongs to a thread. Do
// therefore runs the function on a fresh goroutine whose OS thread is
// locked for the whole call; when the thread cannot be switched back it
// stays locked, so the runtime discards it instead of reusing it.
package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// NS is an open network namespace. The zero value is not usable.
type NS struct {
	f *os.File
}

// Open opens the network namespace file at path (for example
// /var/run/netns/pod1 or /proc/1234/ns/net).
func Open(path string) (*NS, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	ns := &NS{f: f}
	if err := ns.check(); err != nil {
		f.Close()
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	return ns, nil
}

// FromFd returns a namespace for a duplicate of fd; the caller keeps
// ownership of fd.
func FromFd(fd int) (*NS, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup netns fd %d: %w", fd, err)
	}
	ns := &NS{f: os.NewFile(uintptr(nfd), fmt.Sprintf("netns-fd-%d", fd))}
	if err := ns.check(); err != nil {
		ns.f.Close()
		return nil, err
	}
	return ns, nil
}

// Current opens the network namespace of the calling thread.
func Current() (*NS, error) {
	return Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
}

// ErrNotNetns is wrapped by Open and FromFd when the file is not a
// network namespace: for a path that held one, a bind mount that was
// unmounted (the namespace's owner removed it) and left its mount point.
var ErrNotNetns = errors.New("not a network namespace")

// check verifies that the file really is a network namespace (nsfs
// inode of type CLONE_NEWNET), so a wrong path fails early with a clear
// error instead of at setns time.
func (n *NS) check() error {
	t, err := unix.IoctlRetInt(int(n.f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil {
		return fmt.Errorf("%w: not a namespace file: %w", ErrNotNetns, err)
	}
	if t != unix.CLONE_NEWNET {
		return ErrNotNetns
	}
	return nil
}

// Fd returns the namespace file descriptor; it stays owned by n.
func (n *NS) Fd() int { return int(n.f.Fd()) }

// File returns the namespace file; it stays owned by n.
func (n *NS) File() *os.File { return n.f }

// ID identifies a namespace: the device and inode of its nsfs file. Two
// handles refer to the same namespace exactly when their IDs are equal.
type ID struct {
	Dev uint64
	Ino uint64
}

// ID returns the namespace's identity.
func (n *NS) ID() (ID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(n.Fd(), &st); err != nil {
		return ID{}, fmt.Errorf("stat netns: %w", err)
	}
	return ID{Dev: st.Dev, Ino: st.Ino}, nil
}

// Close closes the namespace file.
func (n *NS) Close() error { return n.f.Close() }

// Do runs fn with the calling OS thread inside n and returns fn's error.
// fn must not start goroutines that expect to be in n: they run on other
// threads, in whatever namespace those threads are in. Sockets created by
// fn stay in n after Do returns.
func (n *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := Current()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := unix.Setns(n.Fd(), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(orig.Fd(), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: the runtime kills it when this
			// goroutine exits, so no other goroutine inherits n.
			errc <- errors.Join(ferr, fmt.Errorf("restore netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// SetSysctl sets the per-namespace sysctl key (a path under /proc/sys,
// "net/ipv4/tcp_migrate_req") to value inside n, unless it already has
// that value: a read works where /proc/sys is mounted read-only (a
// non-privileged container), so a value someone else set is no error
// there. /proc/sys/net shows the namespace of the thread that opens it.
func (n *NS) SetSysctl(key, value string) error {
	p := "/proc/sys/" + key
	return n.Do(func() error {
		cur, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("read %s: %w", p, err)
		}
		if strings.TrimSpace(string(cur)) == value {
			return nil
		}
		if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
		return nil
	})
}

// processNS is the network namespace the process started in, where
// DialContext returns its thread. It is opened at package
// initialisation, before any goroutine could enter another namespace:
// /proc/self/ns/net names the main thread's namespace, and the main
// thread need not stay in the process's (a goroutine locked to it that
// ends inside another namespace leaves it there, since the runtime
// cannot discard the main thread).
var processNS = func() func() (*NS, error) {
	ns, err := Open("/proc/self/ns/net")
	return func() (*NS, error) { return ns, err }
}()

// DialContext connects like d.DialContext from a socket created inside
// n, and costs less than the same dial inside Do: only socket(2) and
// d.Control (socket options) run with the thread inside n; binding and
// connecting do not need it (a socket stays in the namespace it was made
// in), so they run on an ordinary goroutine, waiting for the connection
// in the netpoller instead of holding a locked thread.
//
// The thread goes back to the namespace the process started in (opened
// once, at initialisation), so the threads of the process must all be
// in that namespace, as they are in a program that enters namespaces
// only through this package. d.ControlContext must be nil; network must name
// one family ("tcp4", "tcp6", "udp4", "udp6") and address be a literal
// IP, so that the dial makes exactly one socket, on the calling
// goroutine (a dial that would make it elsewhere fails instead of
// making it outside n).
func (n *NS) DialContext(ctx context.Context, d *net.Dialer, network, address string) (net.Conn, error) {
	if d.ControlContext != nil {
		return nil, errors.New("netns dial: ControlContext is not supported")
	}
	home, err := processNS()
	if err != nil {
		return nil, err
	}
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		// A fresh goroutine, as in Do: if the thread cannot leave n, it
		// stays locked and dies with this goroutine, and no caller ever
		// runs inside n.
		runtime.LockOSThread()
		tid := unix.Gettid()
		if err := unix.Setns(n.Fd(), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- result{nil, fmt.Errorf("setns: %w", err)}
			return
		}
		inside := true
		var restoreErr error
		leave := func() {
			if !inside {
				return
			}
			inside = false
			if err := unix.Setns(home.Fd(), unix.CLONE_NEWNET); err != nil {
				restoreErr = fmt.Errorf("restore netns: %w", err)
				return
			}
			runtime.UnlockOSThread()
		}
		dd := *d
		dd.Control = func(network, address string, c syscall.RawConn) error {
			if unix.Gettid() != tid {
				return errors.New("netns dial: socket made off the thread inside the namespace")
			}
			var err error
			if d.Control != nil {
				err = d.Control(network, address, c)
			}
			leave()
			return errors.Join(err, restoreErr)
		}
		c, err := dd.DialContext(ctx, network, address)
		if inside {
			leave() // the dial failed before making its socket
		}
		if restoreErr != nil && c != nil {
			c.Close()
			c = nil
		}
		done <- result{c, errors.Join(err, restoreErr)}
	}()
	r := <-done
	return r.c, r.err
}
