// Package closers tracks a server's open connections and sockets so that
// closing the server closes them all, including ones added while it closes.
package closers

import (
	"io"
	"sync"
)

// Set is a set of open resources. The zero value is ready to use.
type Set struct {
	mu     sync.Mutex
	closed bool
	m      map[io.Closer]struct{}
}

// Add registers c. Once the set is closed it closes c instead and returns
// false: the caller must stop using c.
func (s *Set) Add(c io.Closer) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.Close()
		return false
	}
	if s.m == nil {
		s.m = map[io.Closer]struct{}{}
	}
	s.m[c] = struct{}{}
	return true
}

// Remove forgets c and closes it.
func (s *Set) Remove(c io.Closer) {
	s.mu.Lock()
	delete(s.m, c)
	s.mu.Unlock()
	c.Close()
}

// Close closes everything registered and makes later Adds close at once.
// Errors from closing are ignored: the resources are going away either way.
func (s *Set) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for c := range s.m {
		c.Close()
	}
	s.m = nil
}

// Closed reports whether Close has been called.
func (s *Set) Closed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}
