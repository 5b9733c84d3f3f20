// Package logtest is a concurrency-safe buffer for tests that capture the
// output of slog handlers, subprocesses or servers and search it.
package logtest

import (
	"bytes"
	"strings"
	"sync"
)

// Buffer collects writes from any goroutine. The zero value is ready.
type Buffer struct {
	// OnWrite, if set, is called after each write with everything written
	// so far (under the buffer's lock: it must not call back into it).
	OnWrite func(all string)

	mu  sync.Mutex
	buf bytes.Buffer
}

// Write appends p.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n, err := b.buf.Write(p)
	if b.OnWrite != nil {
		b.OnWrite(b.buf.String())
	}
	return n, err
}

// String returns everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Lines returns the non-empty lines written so far.
func (b *Buffer) Lines() []string {
	var out []string
	for l := range strings.SplitSeq(b.String(), "\n") {
		if l != "" {
			out = append(out, l)
		}
	}
	return out
}

// Find returns the first line containing every one of want.
func (b *Buffer) Find(want ...string) (string, bool) {
next:
	for _, l := range b.Lines() {
		for _, w := range want {
			if !strings.Contains(l, w) {
				continue next
			}
		}
		return l, true
	}
	return "", false
}
