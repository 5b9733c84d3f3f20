package zds

import (
	"context"
	"sync"
)

// signal is a flag that can be waited for. The zero value is clear.
type signal struct {
	mu sync.Mutex
	on bool
	ch chan struct{} // closed while on; nil until first needed
}

// channel returns the channel closed while the flag is on; s.mu is held.
func (s *signal) channel() chan struct{} {
	if s.ch == nil {
		s.ch = make(chan struct{})
	}
	return s.ch
}

func (s *signal) set() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.on {
		s.on = true
		close(s.channel())
	}
}

func (s *signal) clear() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.on {
		s.on = false
		s.ch = make(chan struct{})
	}
}

func (s *signal) isSet() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.on
}

// wait returns nil once the flag is on, or ctx's error.
func (s *signal) wait(ctx context.Context) error {
	s.mu.Lock()
	ch := s.channel()
	s.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
