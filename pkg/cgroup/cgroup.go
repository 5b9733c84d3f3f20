// Package cgroup finds the cgroup v2 hierarchy, a process's place in it, and
// the ids the kernel gives its directories (what bpf_skb_cgroup_id returns).
package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
)

// Mount returns the mount point of the cgroup2 hierarchy, read from
// /proc/self/mountinfo: on hybrid hosts it is /sys/fs/cgroup/unified, not
// /sys/fs/cgroup. A process whose own mount namespace has none (`ip netns
// exec` remounts /sys without it) gets the init process's, reached through
// /proc/1/root.
func Mount() (string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	mnt, err := mountIn(data)
	if err == nil {
		return mnt, nil
	}
	if init, ierr := os.ReadFile("/proc/1/mountinfo"); ierr == nil {
		if m, ierr := mountIn(init); ierr == nil {
			if _, ierr := os.Stat("/proc/1/root" + m); ierr == nil {
				return "/proc/1/root" + m, nil
			}
		}
	}
	return "", fmt.Errorf("%w (in this mount namespace or init's: `ip netns exec` hides it, `nsenter --net` does not)", err)
}

func mountIn(mountinfo []byte) (string, error) {
	sc := bufio.NewScanner(bytes.NewReader(mountinfo))
	for sc.Scan() {
		// Fields: id parent maj:min root mountpoint opts [optional...] - fstype source superopts
		fields := strings.Fields(sc.Text())
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return fields[4], nil
			}
		}
	}
	return "", errors.New("no cgroup2 mount in /proc/self/mountinfo")
}
