//go:build linux

package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrRemoved is OfProcess's answer for a process whose cgroup was removed.
var ErrRemoved = errors.New("its cgroup was removed")

// ID returns the id of the cgroup v2 directory at path: its inode number,
// which is what the kernel's bpf_skb_cgroup_id and bpf_get_current_cgroup_id
// report for sockets and tasks in it. Ids are never reused while the system
// runs.
func ID(path string) (uint64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("statfs cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("%s is not a cgroup v2 directory", path)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}

// OfProcess returns the cgroup v2 directory of process pid, from the "0::"
// line of /proc/<pid>/cgroup under the cgroup2 mount.
func OfProcess(pid int) (string, error) {
	mnt, err := Mount()
	if err != nil {
		return "", err
	}
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return "", fmt.Errorf("cgroup of process %d: %w", pid, err)
	}
	rel, err := v2Path(data)
	if err != nil {
		return "", fmt.Errorf("cgroup of process %d: %w", pid, err)
	}
	return filepath.Join(mnt, rel), nil
}

// v2Path returns the cgroup2 path of a /proc/<pid>/cgroup file's contents.
func v2Path(procCgroup []byte) (string, error) {
	sc := bufio.NewScanner(bytes.NewReader(procCgroup))
	for sc.Scan() {
		if rel, ok := strings.CutPrefix(sc.Text(), "0::"); ok {
			// A process in a cgroup that was removed reads "/... (deleted)".
			if strings.HasSuffix(rel, " (deleted)") {
				return "", ErrRemoved
			}
			return rel, nil
		}
	}
	return "", errors.New("no cgroup v2 membership")
}
