//go:build linux

// Package bpffs holds what ambpf's loaders do the same way with their
// pins on a bpf filesystem: checking that the pin root is on one, taking
// the cross-process lock on a pin directory, reading one-entry array maps,
// and converting the fixed-size C strings of map values.
package bpffs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Check returns an error unless root is, or would be once created, on a
// bpf filesystem: the nearest existing ancestor tells.
func Check(root string) error {
	for dir := root; ; dir = filepath.Dir(dir) {
		var st unix.Statfs_t
		err := unix.Statfs(dir, &st)
		if err == nil {
			if st.Type != unix.BPF_FS_MAGIC {
				return fmt.Errorf("%s is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)", root)
			}
			return nil
		}
		if !errors.Is(err, unix.ENOENT) || filepath.Dir(dir) == dir {
			return fmt.Errorf("statfs %s: %w", dir, err)
		}
	}
}

// Lock takes an exclusive flock on the directory dir, waiting for other
// holders (in this or any other process). The caller must call unlock.
func Lock(dir string) (unlock func(), err error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
}

// ErrBusy is returned by TryLockName when another holder has the lock.
var ErrBusy = errors.New("locked by another holder")

// NameLock is a lock held on a name (LockName, TryLockName).
type NameLock struct {
	f    *os.File
	path string
}

// LockName takes an exclusive flock on the directory dir/name, creating
// it, and waiting for other holders in this or any other process. The
// directory may be removed by its holder (Unlock(true)); a waiter that
// then wakes up on the removed directory notices and locks the new one,
// so two holders never think they hold the same name.
func LockName(dir, name string) (*NameLock, error) { return lockName(dir, name, unix.LOCK_EX) }

// TryLockName is LockName without waiting: ErrBusy when someone holds it.
func TryLockName(dir, name string) (*NameLock, error) {
	return lockName(dir, name, unix.LOCK_EX|unix.LOCK_NB)
}

func lockName(dir, name string, how int) (*NameLock, error) {
	path := filepath.Join(dir, name)
	for {
		if err := os.Mkdir(path, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("create lock %s: %w", path, err)
		}
		f, err := os.Open(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed by its holder meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("open lock %s: %w", path, err)
		}
		if err := unix.Flock(int(f.Fd()), how); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("lock %s: %w", path, ErrBusy)
			}
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		// Still the directory at path? Its holder may have removed it
		// while we waited.
		var held, now unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) == nil && unix.Stat(path, &now) == nil && held.Ino == now.Ino {
			return &NameLock{f: f, path: path}, nil
		}
		f.Close()
	}
}

// Unlock releases the lock; with remove, the lock's directory goes first
// (for names that come and go, like pods).
func (l *NameLock) Unlock(remove bool) {
	if remove {
		os.Remove(l.path)
	}
	unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
	l.f.Close()
}

// ReadSingle reads entry 0 of the array map pinned at dir/name (the
// programs' one-entry config, counter and meta maps) into out. A missing
// pin gives an error wrapping fs.ErrNotExist.
func ReadSingle(dir, name string, out any) error {
	return ReadIndex(filepath.Join(dir, name), 0, out)
}

// ReadIndex reads entry idx of the array map pinned at path into out.
func ReadIndex(path string, idx uint32, out any) error {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return fmt.Errorf("open %s: %w", filepath.Base(path), err)
	}
	defer m.Close()
	if err := m.Lookup(idx, out); err != nil {
		return fmt.Errorf("read %s[%d]: %w", filepath.Base(path), idx, err)
	}
	return nil
}

// WriteIndex writes v to entry idx of the array map pinned at path.
func WriteIndex(path string, idx uint32, v any) error {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return fmt.Errorf("open %s: %w", filepath.Base(path), err)
	}
	defer m.Close()
	if err := m.Put(idx, v); err != nil {
		return fmt.Errorf("write %s[%d]: %w", filepath.Base(path), idx, err)
	}
	return nil
}

// MissingAs wraps err with sentinel when err says a pin does not exist
// (fs.ErrNotExist), so a loader can turn a missing pin into its own
// "not attached" error; any other err is returned unchanged.
func MissingAs(err, sentinel error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %w", sentinel, err)
	}
	return err
}

// CopyCString copies s into the C char array dst (a bpf2go char[N]),
// truncated so a terminating NUL always fits. dst must start zeroed.
func CopyCString(dst []int8, s string) {
	for i := 0; i < len(dst)-1 && i < len(s); i++ {
		dst[i] = int8(s[i])
	}
}

// CString returns the C char array b up to its first NUL.
func CString(b []int8) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		out = append(out, byte(c))
	}
	return string(out)
}
