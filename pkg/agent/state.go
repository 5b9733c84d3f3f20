//go:build linux

package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/agentapi"
)

const (
	stateFileName = "state.json"
	lockFileName  = "agent.lock"
	stateVersion  = 1
)

// stateFile is the agent's record of the pods it enrolled, one JSON file
// replaced atomically (temp file, fsync, rename), so a crash leaves either
// the old or the new content and never a torn one.
type stateFile struct {
	dir  string
	lock *os.File
}

type stateDoc struct {
	Version int                 `json:"version"`
	Pods    []agentapi.PodState `json:"pods"`
}

// openState creates dir if needed and takes an exclusive lock on it: two
// agents sharing a state directory would undo each other's work.
func openState(dir string) (*stateFile, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir %s: %w", dir, err)
	}
	f, err := os.OpenFile(filepath.Join(dir, lockFileName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open state lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("state dir %s is in use by another agent", dir)
		}
		return nil, fmt.Errorf("lock state dir %s: %w", dir, err)
	}
	return &stateFile{dir: dir, lock: f}, nil
}

// close releases the lock.
func (s *stateFile) close() error { return s.lock.Close() }

func (s *stateFile) path() string { return filepath.Join(s.dir, stateFileName) }

// load reads the pods; a missing file is an empty state.
func (s *stateFile) load() (map[string]agentapi.PodState, error) {
	pods := map[string]agentapi.PodState{}
	b, err := os.ReadFile(s.path())
	if errors.Is(err, fs.ErrNotExist) {
		return pods, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state: %w", err)
	}
	var doc stateDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		// Truncated or garbled (a disk that lied about fsync, a hand
		// edit): keep the bytes for whoever looks into it and start from
		// what the pins say.
		aside := fmt.Sprintf("%s.corrupt-%d", s.path(), time.Now().Unix())
		if rerr := os.Rename(s.path(), aside); rerr != nil {
			return nil, fmt.Errorf("parse state %s: %w (and it could not be moved aside: %w)", s.path(), err, rerr)
		}
		return pods, &corruptStateError{path: s.path(), aside: aside, err: err}
	}
	if doc.Version != stateVersion {
		return nil, fmt.Errorf("state %s has version %d, this agent reads %d", s.path(), doc.Version, stateVersion)
	}
	for _, p := range doc.Pods {
		pods[p.UID] = p
	}
	return pods, nil
}

// corruptStateError is load's error for a state file that does not parse;
// the file was moved to aside and load returned an empty state.
type corruptStateError struct {
	path, aside string
	err         error
}

func (e *corruptStateError) Error() string {
	return fmt.Sprintf("state file %s is corrupt (%v); moved to %s", e.path, e.err, e.aside)
}

func (e *corruptStateError) Unwrap() error { return e.err }

// save replaces the file with pods.
func (s *stateFile) save(pods map[string]agentapi.PodState) error {
	doc := stateDoc{Version: stateVersion, Pods: make([]agentapi.PodState, 0, len(pods))}
	for _, p := range pods {
		doc.Pods = append(doc.Pods, p)
	}
	sort.Slice(doc.Pods, func(i, j int) bool { return doc.Pods[i].UID < doc.Pods[j].UID })
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	tmp, err := os.CreateTemp(s.dir, stateFileName+".tmp-*")
	if err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	_, werr := tmp.Write(append(b, '\n'))
	serr := tmp.Sync()
	cerr := tmp.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write state: %w", err)
	}
	if err := os.Rename(tmp.Name(), s.path()); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write state: %w", err)
	}
	return nil
}
