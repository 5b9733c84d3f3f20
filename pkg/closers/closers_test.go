package closers

import "testing"

type fake struct{ closed int }

func (f *fake) Close() error { f.closed++; return nil }

func TestSet(t *testing.T) {
	var s Set
	a, b, late := &fake{}, &fake{}, &fake{}
	if !s.Add(a) || !s.Add(b) {
		t.Fatal("Add refused before Close")
	}
	s.Remove(a)
	if a.closed != 1 {
		t.Errorf("Remove closed a %d times, want 1", a.closed)
	}
	s.Close()
	if b.closed != 1 || a.closed != 1 || !s.Closed() {
		t.Errorf("Close: a %d, b %d closed, Closed %t", a.closed, b.closed, s.Closed())
	}
	if s.Add(late) || late.closed != 1 {
		t.Errorf("Add after Close: must refuse and close (closed %d)", late.closed)
	}
}
