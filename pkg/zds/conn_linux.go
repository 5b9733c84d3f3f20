//go:build linux

package zds

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// DefaultPath is where the agent listens and the proxy connects.
	DefaultPath = "/var/run/ztunnel/ztunnel.sock"
	// MaxMessageSize bounds every ZDS datagram; a larger one is truncated
	// on receive and refused on send.
	MaxMessageSize = 1024
	// DefaultTimeout is the per-operation deadline: each write, and each
	// wait for an ack or a hello.
	DefaultTimeout = 5 * time.Second

	// maxRecvFDs sizes the control buffer so that a sender passing a few
	// fds too many is seen (and refused) as such rather than as MSG_CTRUNC.
	maxRecvFDs = 8
)

// Conn is one ZDS connection: a SOCK_SEQPACKET unix socket carrying one
// message per datagram. Send and Recv may be called concurrently with each
// other but not with themselves.
type Conn struct {
	uc *net.UnixConn
}

// Dial connects to the ZDS socket at path.
func Dial(ctx context.Context, path string) (*Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		return nil, fmt.Errorf("dial zds %s: %w", path, err)
	}
	return &Conn{uc: c.(*net.UnixConn)}, nil
}

// peer returns the credentials the kernel recorded for the other end.
func (c *Conn) peer() (Peer, error) {
	raw, err := c.uc.SyscallConn()
	if err != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	var (
		cred *unix.Ucred
		gerr error
	)
	if err := raw.Control(func(fd uintptr) {
		cred, gerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	if gerr != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", gerr)
	}
	return Peer{PID: int(cred.Pid), UID: int(cred.Uid), GID: int(cred.Gid)}, nil
}

// Close closes the connection; a blocked Send or Recv returns.
func (c *Conn) Close() error { return c.uc.Close() }

// Send writes msg as one datagram and, when fd is not nil, fd as the one
// SCM_RIGHTS descriptor (the kernel duplicates it; the caller keeps fd).
// A zero deadline means none.
func (c *Conn) Send(msg []byte, fd *os.File, deadline time.Time) error {
	if len(msg) > MaxMessageSize {
		return fmt.Errorf("send %d bytes: %w", len(msg), ErrTooLarge)
	}
	if err := c.uc.SetWriteDeadline(deadline); err != nil {
		return fmt.Errorf("set write deadline: %w", err)
	}
	if fd == nil {
		return c.write(msg, nil)
	}
	// Control keeps fd open for the duration of the write without
	// switching it to blocking mode as File.Fd would.
	rc, err := fd.SyscallConn()
	if err != nil {
		return fmt.Errorf("send fd %s: %w", fd.Name(), err)
	}
	var werr error
	if err := rc.Control(func(raw uintptr) {
		werr = c.write(msg, unix.UnixRights(int(raw)))
	}); err != nil {
		return fmt.Errorf("send fd %s: %w", fd.Name(), err)
	}
	return werr
}

func (c *Conn) write(msg, oob []byte) error {
	n, _, err := c.uc.WriteMsgUnix(msg, oob, nil)
	if err != nil {
		return fmt.Errorf("send zds message: %w", err)
	}
	if n != len(msg) {
		return fmt.Errorf("send zds message: short write %d of %d", n, len(msg))
	}
	return nil
}

// Recv reads one datagram and the descriptors that came with it, which
// the caller then owns. On error no descriptor is returned: any received
// is closed. A datagram or control data that did not fit gives
// ErrTruncated; a closed peer gives io.EOF (an empty datagram looks the
// same on SOCK_SEQPACKET, and no valid ZDS message is empty). A zero
// deadline means none.
func (c *Conn) Recv(deadline time.Time) ([]byte, []*os.File, error) {
	if err := c.uc.SetReadDeadline(deadline); err != nil {
		return nil, nil, fmt.Errorf("set read deadline: %w", err)
	}
	buf := make([]byte, MaxMessageSize)
	oob := make([]byte, unix.CmsgSpace(4*maxRecvFDs))
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(buf, oob)
	fds, ferr := parseRights(oob[:oobn])
	if err == nil && flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		err = fmt.Errorf("recv zds message (flags %#x): %w", flags, ErrTruncated)
	}
	if err == nil && ferr != nil {
		err = fmt.Errorf("recv zds message: %w", ferr)
	}
	if err == nil && n == 0 && oobn == 0 {
		err = io.EOF
	}
	if err != nil {
		closeAll(fds)
		return nil, nil, err
	}
	return buf[:n], fds, nil
}

// parseRights returns the descriptors in SCM_RIGHTS control messages as
// files. It returns every descriptor it could find even with an error, so
// that the caller can close them.
func parseRights(oob []byte) ([]*os.File, error) {
	var files []*os.File
	for len(oob) > 0 {
		hdr, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return files, fmt.Errorf("parse control message: %w", err)
		}
		oob = rest
		if hdr.Level != unix.SOL_SOCKET || hdr.Type != unix.SCM_RIGHTS {
			continue
		}
		for ; len(data) >= 4; data = data[4:] {
			fd := int(int32(binary.NativeEndian.Uint32(data)))
			files = append(files, os.NewFile(uintptr(fd), fmt.Sprintf("zds-fd-%d", fd)))
		}
	}
	return files, nil
}

// peerClosed reports, without blocking or consuming anything, whether the
// peer has closed the connection; pending reports that a datagram is
// waiting to be read.
func (c *Conn) peerClosed() (closed, pending bool, err error) {
	rc, err := c.uc.SyscallConn()
	if err != nil {
		return false, false, fmt.Errorf("probe peer: %w", err)
	}
	var n int
	var perr error
	// Control, not Read: Read honours the read deadline the last Recv set,
	// so once that has passed (any idle check after the first ack's
	// timeout) it fails with "i/o timeout" and a live proxy would be taken
	// for gone. MSG_DONTWAIT keeps this from blocking.
	if err := rc.Control(func(fd uintptr) {
		var b [1]byte
		n, _, perr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	}); err != nil {
		return false, false, fmt.Errorf("probe peer: %w", err)
	}
	switch {
	case errors.Is(perr, unix.EAGAIN):
		return false, false, nil
	case perr != nil:
		return true, false, fmt.Errorf("probe peer: %w", perr)
	case n == 0:
		return true, false, nil
	}
	return false, true, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}
