package logtest

import (
	"fmt"
	"sync"
	"testing"
)

func TestBuffer(t *testing.T) {
	var b Buffer
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() { defer wg.Done(); fmt.Fprintf(&b, "line %d level=info\n", i) }()
	}
	wg.Wait()
	if n := len(b.Lines()); n != 10 {
		t.Errorf("%d lines, want 10", n)
	}
	if l, ok := b.Find("line 7", "level=info"); !ok || l != "line 7 level=info" {
		t.Errorf("Find: %q %t", l, ok)
	}
	if _, ok := b.Find("line 7", "level=error"); ok {
		t.Error("Find matched a line lacking one of the strings")
	}
	var seen string
	c := Buffer{OnWrite: func(all string) { seen = all }}
	c.Write([]byte("x"))
	if seen != "x" {
		t.Errorf("OnWrite saw %q", seen)
	}
}
