//go:build linux

package netlab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"

	"golang.org/x/sys/unix"
)

// A socket belongs to the network namespace and the cgroup of the task
// that created it, for good: a cgroup's sockops and setsockopt programs
// judge it by that cgroup whoever uses it later. A SocketFactory is a
// process of a pod (in the pod's netns and cgroup) that creates TCP
// sockets on request and passes them back over SCM_RIGHTS, so a test
// process can drive the app side of an exchange with its own code while
// the kernel treats the socket as the pod's.
//
// The factory process is the test binary itself, run again with
// SocketFactoryEnv set: its TestMain must start with
//
//	if netlab.IsSocketFactory() {
//		os.Exit(netlab.ServeSocketFactory())
//	}

// SocketFactoryEnv, set to "1", makes a test binary serve as a socket
// factory (see IsSocketFactory).
const SocketFactoryEnv = "AMBPF_NETLAB_SOCKET_FACTORY"

// IsSocketFactory reports whether this process was started as a socket
// factory by StartSocketFactory.
func IsSocketFactory() bool { return os.Getenv(SocketFactoryEnv) == "1" }

// ServeSocketFactory serves the requests on descriptor 3 until it reaches
// EOF, and returns the exit code: '4' or '6' is answered with a fresh TCP
// socket of that family, 'm' with the errno (0: allowed) of setting
// SO_MARK 0x539 on a socket of its own, as the mark guard judges the
// calling task's cgroup.
func ServeSocketFactory() int {
	fd := 3
	req := make([]byte, 1)
	for {
		n, err := unix.Read(fd, req)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if n != 1 || err != nil {
			return 0
		}
		if req[0] == 'm' {
			s, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err == nil {
				err = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_MARK, 0x539)
				unix.Close(s)
			}
			var errno unix.Errno
			errors.As(err, &errno)
			unix.Write(fd, []byte{byte(errno)})
			continue
		}
		family := unix.AF_INET
		if req[0] == '6' {
			family = unix.AF_INET6
		}
		s, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, "socket:", err)
			return 1
		}
		if err := unix.Sendmsg(fd, []byte{'s'}, unix.UnixRights(s), nil, 0); err != nil {
			fmt.Fprintln(os.Stderr, "send fd:", err)
			return 1
		}
		unix.Close(s)
	}
}

// SocketFactory hands out sockets created inside a pod. Its methods are
// safe for concurrent use.
type SocketFactory struct {
	mu  sync.Mutex
	ctl int
	cmd *exec.Cmd
}

// StartSocketFactory starts this binary as a socket factory in p's netns
// and cgroup. The caller closes it.
func StartSocketFactory(p *Pod) (*SocketFactory, error) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket factory: %w", err)
	}
	child := os.NewFile(uintptr(pair[1]), "factory")
	defer child.Close()
	// -test.run=^$: a binary that lacks the TestMain hook runs no test
	// (and no factory), rather than its tests again.
	cmd := p.Command(context.Background(), os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), SocketFactoryEnv+"=1")
	cmd.ExtraFiles = []*os.File{child}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		unix.Close(pair[0])
		return nil, fmt.Errorf("start socket factory in %s: %w", p.Name, err)
	}
	return &SocketFactory{ctl: pair[0], cmd: cmd}, nil
}

// Close ends the factory (EOF on its requests) and waits for it.
func (f *SocketFactory) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ctl < 0 {
		return nil
	}
	unix.Close(f.ctl)
	f.ctl = -1
	if err := f.cmd.Wait(); err != nil {
		return fmt.Errorf("socket factory: %w", err)
	}
	return nil
}

// MarkErrno asks the factory, a process of the pod, to set the proxy mark
// on a socket; 0 means it was allowed.
func (f *SocketFactory) MarkErrno() (unix.Errno, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := unix.Write(f.ctl, []byte{'m'}); err != nil {
		return 0, fmt.Errorf("socket factory: %w", err)
	}
	b := make([]byte, 1)
	if _, err := unix.Read(f.ctl, b); err != nil {
		return 0, fmt.Errorf("socket factory: %w", err)
	}
	return unix.Errno(b[0]), nil
}

// Socket returns a new blocking TCP socket of the pod (IPv6 when v6), not
// connected; the caller owns the descriptor.
func (f *SocketFactory) Socket(v6 bool) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	req := []byte{'4'}
	if v6 {
		req[0] = '6'
	}
	if _, err := unix.Write(f.ctl, req); err != nil {
		return -1, fmt.Errorf("ask for a socket: %w", err)
	}
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(f.ctl, buf, oob, 0)
	if err != nil {
		return -1, fmt.Errorf("receive socket: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return -1, fmt.Errorf("receive socket: bad control message (%v)", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return -1, fmt.Errorf("receive socket: %v", err)
	}
	return fds[0], nil
}
