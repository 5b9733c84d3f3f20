package copybuf

import (
	"io"
	"syscall"
)

// TryWriter is a destination that a producer which must never block
// (an HTTP/2 read loop serving many streams) can write to itself.
// TryWrite writes what the destination takes at once and returns
// n < len(p) with a nil error when the rest would block; Write is the
// ordinary, blocking write, for whoever may wait.
type TryWriter interface {
	io.Writer
	TryWrite(p []byte) (int, error)
}

// Direct returns w as a TryWriter: w itself when it is one, a writer on
// its socket when w is a syscall.Conn (a *net.TCPConn), or nil.
func Direct(w io.Writer) TryWriter {
	if tw, ok := w.(TryWriter); ok {
		return tw
	}
	if sc, ok := w.(syscall.Conn); ok {
		rc, err := sc.SyscallConn()
		if err == nil {
			return &socketWriter{Writer: w, rc: rc}
		}
	}
	return nil
}

// socketWriter writes to a socket without blocking through its RawConn:
// the runtime keeps the descriptor open and serialises writers while
// the write runs, and the callback never asks to wait.
type socketWriter struct {
	io.Writer
	rc syscall.RawConn
}

func (s *socketWriter) TryWrite(p []byte) (int, error) {
	n := 0
	var werr error
	err := s.rc.Write(func(fd uintptr) bool {
		for n < len(p) {
			m, err := syscall.Write(int(fd), p[n:])
			switch {
			case err == syscall.EINTR:
				continue
			case err == syscall.EAGAIN:
				return true // the rest would block: the caller queues it
			case err != nil:
				werr = err
				return true
			case m == 0:
				werr = io.ErrShortWrite
				return true
			}
			n += m
		}
		return true
	})
	if err == nil {
		err = werr
	}
	return n, err
}
