//go:build linux

package bpffs

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
)

func TestCString(t *testing.T) {
	var buf [8]int8
	CopyCString(buf[:], "eth0")
	if got := CString(buf[:]); got != "eth0" {
		t.Errorf("round trip: %q", got)
	}
	var short [4]int8
	CopyCString(short[:], "toolong")
	if got := CString(short[:]); got != "too" {
		t.Errorf("truncated to %q, want %q (room for the NUL)", got, "too")
	}
	full := []int8{'a', 'b'}
	if got := CString(full); got != "ab" {
		t.Errorf("unterminated: %q", got)
	}
}

func TestCheck(t *testing.T) {
	mnt := bpffstest.Mount(t)
	if err := Check(mnt); err != nil {
		t.Errorf("bpffs mount: %v", err)
	}
	if err := Check(filepath.Join(mnt, "not", "yet")); err != nil {
		t.Errorf("directory to be created on bpffs: %v", err)
	}
	err := Check(filepath.Join(t.TempDir(), "ambpf"))
	if err == nil || !strings.Contains(err.Error(), "not on a bpf filesystem") {
		t.Errorf("tmpfs directory: %v", err)
	}
}

func TestLockExcludes(t *testing.T) {
	dir := t.TempDir()
	unlock, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	other, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := unix.Flock(int(other.Fd()), unix.LOCK_EX|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Errorf("second lock while held: %v, want EWOULDBLOCK", err)
	}
	unlock()
	if err := unix.Flock(int(other.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Errorf("lock after unlock: %v", err)
	}
	if _, err := Lock(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("lock of a missing directory: %v", err)
	}
}

func TestReadSingle(t *testing.T) {
	mnt := bpffstest.Mount(t)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Put(uint32(0), uint64(42)); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(filepath.Join(mnt, "counters")); err != nil {
		t.Fatal(err)
	}
	var v uint64
	if err := ReadSingle(mnt, "counters", &v); err != nil || v != 42 {
		t.Errorf("read %d, %v; want 42", v, err)
	}
	if err := ReadSingle(mnt, "missing", &v); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing pin: %v, want fs.ErrNotExist", err)
	}
}

func TestMissingAs(t *testing.T) {
	sentinel := errors.New("not attached")
	missing := &fs.PathError{Op: "open", Path: "x", Err: fs.ErrNotExist}
	if err := MissingAs(missing, sentinel); !errors.Is(err, sentinel) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing pin: %v", err)
	}
	other := errors.New("permission denied")
	if err := MissingAs(other, sentinel); err != other {
		t.Errorf("other error changed to %v", err)
	}
}
