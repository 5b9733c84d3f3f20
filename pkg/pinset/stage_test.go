//go:build linux

package pinset

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestStageAbortUndoesLastFirst: a failed attachment removes its staging
// directory, then undoes its steps in reverse order, and reports what the
// undo could not do beside the original error.
func TestStageAbortUndoesLastFirst(t *testing.T) {
	root := t.TempDir()
	s, err := NewStage(root, "pod-")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(filepath.Base(s.Dir()), "pod-") {
		t.Errorf("staging dir %s, want prefix pod-", s.Dir())
	}
	if err := os.WriteFile(s.Path("pin"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	var order []string
	s.OnUndo(func() error { order = append(order, "first"); return nil })
	s.OnUndo(func() error {
		if _, err := os.Stat(s.Dir()); err == nil {
			order = append(order, "dir still there")
		}
		order = append(order, "second")
		return errors.New("undo failed")
	})
	failed := errors.New("attach failed")
	err = s.Abort(failed)
	if !errors.Is(err, failed) || !strings.Contains(err.Error(), "undo failed") {
		t.Errorf("Abort = %v, want the attach error with the undo's", err)
	}
	if want := []string{"second", "first"}; !reflect.DeepEqual(order, want) {
		t.Errorf("undo order %v, want %v", order, want)
	}
	if left, _ := os.ReadDir(root); len(left) != 0 {
		t.Errorf("left under the staging root: %v", left)
	}
}

// TestStagePublish: a published attachment is in its final place, and a
// later Abort (deferred on the error result) undoes nothing.
func TestStagePublish(t *testing.T) {
	root, final := t.TempDir(), filepath.Join(t.TempDir(), "pod")
	s, err := NewStage(root, "pod-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.Path("pin"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	undone := false
	s.OnUndo(func() error { undone = true; return nil })
	if err := s.Publish(final); err != nil {
		t.Fatal(err)
	}
	if err := s.Abort(errors.New("late")); err == nil || undone {
		t.Errorf("Abort after Publish: %v, undone %t; want the error back and nothing undone", err, undone)
	}
	if _, err := os.Stat(filepath.Join(final, "pin")); err != nil {
		t.Errorf("published pin: %v", err)
	}
	if s.Abort(nil) != nil || undone {
		t.Error("Abort(nil) undid something")
	}
}
