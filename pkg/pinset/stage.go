//go:build linux

package pinset

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Stage is an attachment being made. Its pins go into a fresh directory
// under a staging root, and Publish renames that directory to its final
// place in one step, so a reader finds an attachment complete or not at
// all, and a crash leaves only a staging directory (for the family's
// verify to remove). Until Publish, every step registers how it is undone
// (OnUndo), and Abort undoes them in reverse order.
//
// A Stage is used by one goroutine.
type Stage struct {
	dir       string
	undo      []func() error
	published bool
}

// NewStage makes a staging directory under root, named prefix followed by
// a random suffix (so the verify of the family can tell whose it is).
func NewStage(root, prefix string) (*Stage, error) {
	dir, err := os.MkdirTemp(root, prefix)
	if err != nil {
		return nil, fmt.Errorf("create pin dir: %w", err)
	}
	return &Stage{dir: dir}, nil
}

// Dir is the staging directory.
func (s *Stage) Dir() string { return s.dir }

// Path is the path of a pin named name in the staging directory.
func (s *Stage) Path(name string) string { return filepath.Join(s.dir, name) }

// OnUndo registers how to undo a step just done. Abort runs the
// registered functions last first; they run only when the attachment
// fails.
func (s *Stage) OnUndo(f func() error) { s.undo = append(s.undo, f) }

// Publish renames the staging directory to final. After it the pins are
// the attachment and Abort does nothing.
func (s *Stage) Publish(final string) error {
	if err := os.Rename(s.dir, final); err != nil {
		return fmt.Errorf("publish pins: %w", err)
	}
	s.published = true
	return nil
}

// Abort undoes an attachment that failed with err: the staging directory
// goes first (its pins hold nothing open that the undo steps need), then
// the registered steps run, last first. It returns err, with what the
// undo could not do added. A nil err, or a published Stage, is returned
// as it is, with nothing undone; so Abort can be deferred on a named
// error result.
func (s *Stage) Abort(err error) error {
	if err == nil || s.published {
		return err
	}
	errs := []error{os.RemoveAll(s.dir)}
	for i := len(s.undo) - 1; i >= 0; i-- {
		errs = append(errs, s.undo[i]())
	}
	if cerr := errors.Join(errs...); cerr != nil {
		return fmt.Errorf("%w (cleanup: %v)", err, cerr)
	}
	return err
}
