//go:build linux

package podwatch

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/nlretry"
)

// ErrNotFound: no process of the pod (or no cgroup) was found.
var ErrNotFound = errors.New("not found")

// maxCgroupDepth bounds the cgroup tree walk: kubelet's pod cgroups sit
// two or three levels below the root (kubepods/<qos>/pod<uid>).
const maxCgroupDepth = 6

// Finder finds a running pod's network namespace and cgroup through
// /proc and the cgroup2 tree, the way a node agent that did not see the
// pod's CNI ADD must.
type Finder struct {
	// ProcRoot is the host's /proc (the agent mounts it at /host/proc).
	ProcRoot string
	// CgroupRoot is the cgroup2 mount as the agent sees it.
	CgroupRoot string
}

// uidMarkers are the ways a cgroup path names a pod UID: kubelet's
// cgroupfs driver writes pod<uid>, the systemd driver pod<uid with
// underscores> (kubepods-besteffort-pod1a2b_..._.slice).
func uidMarkers(uid string) []string {
	return []string{"pod" + uid, "pod" + strings.ReplaceAll(uid, "-", "_")}
}

// Netns returns /proc/<pid>/ns/net of a process whose cgroup names the pod
// UID and whose network namespace holds one of ips (any, when ips is
// empty), and that process's pod-level cgroup directory ("" when not on
// cgroup2). ErrNotFound when there is none.
func (f Finder) Netns(uid string, ips []netip.Addr) (path, cgroup string, err error) {
	entries, err := os.ReadDir(f.ProcRoot)
	if err != nil {
		return "", "", fmt.Errorf("read %s: %w", f.ProcRoot, err)
	}
	markers := uidMarkers(uid)
	seen := map[netns.ID]bool{}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		dir := filepath.Join(f.ProcRoot, e.Name())
		cg, ok := podCgroup(filepath.Join(dir, "cgroup"), markers)
		if !ok {
			continue
		}
		nsPath := filepath.Join(dir, "ns", "net")
		ns, err := netns.Open(nsPath)
		if err != nil {
			continue // exited meanwhile, or a kernel thread
		}
		id, err := ns.ID()
		if err != nil || seen[id] {
			ns.Close()
			continue
		}
		seen[id] = true
		holds, err := holdsAny(ns, ips)
		ns.Close()
		if err != nil || !holds {
			continue
		}
		if cg != "" && f.CgroupRoot != "" {
			cg = filepath.Join(f.CgroupRoot, cg)
		}
		return nsPath, cg, nil
	}
	return "", "", fmt.Errorf("pod %s: no process in its cgroup holds its addresses %v: %w", uid, ips, ErrNotFound)
}

// podCgroup reads a /proc/<pid>/cgroup file and reports whether any line
// names a marker; the returned path is the cgroup2 ("0::") path cut after
// the component naming the pod, or "" when only a v1 hierarchy names it.
func podCgroup(file string, markers []string) (string, bool) {
	data, err := os.ReadFile(file)
	if err != nil {
		return "", false
	}
	found := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		// hierarchy-ID:controllers:path; cgroup2 is "0::path".
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		comps := strings.Split(parts[2], "/")
		for i, c := range comps {
			if !containsAny(c, markers) {
				continue
			}
			found = true
			if parts[0] == "0" && parts[1] == "" {
				return strings.Join(comps[:i+1], "/"), true
			}
		}
	}
	return "", found
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// holdsAny reports whether an interface of ns carries one of ips (true
// for no ips).
func holdsAny(ns *netns.NS, ips []netip.Addr) (bool, error) {
	if len(ips) == 0 {
		return true, nil
	}
	var found bool
	err := ns.Do(func() error {
		addrs, err := nlretry.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("list addresses: %w", err)
		}
		for _, a := range addrs {
			got, ok := netip.AddrFromSlice(a.IP)
			if !ok {
				continue
			}
			for _, ip := range ips {
				if got.Unmap() == ip.Unmap() {
					found = true
					return nil
				}
			}
		}
		return nil
	})
	return found, err
}

// Cgroup returns the pod's cgroup v2 directory by walking the cgroup tree
// for a directory named after the pod UID. It works before any process of
// the pod runs (kubelet creates the pod cgroup before the sandbox, so it
// is there at CNI ADD). ErrNotFound when there is none.
func (f Finder) Cgroup(uid string) (string, error) {
	if f.CgroupRoot == "" {
		return "", fmt.Errorf("pod %s cgroup: no cgroup2 mount: %w", uid, ErrNotFound)
	}
	markers := uidMarkers(uid)
	var found string
	root := filepath.Clean(f.CgroupRoot)
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if path == root {
				return err
			}
			return fs.SkipDir // a cgroup removed meanwhile
		}
		if !d.IsDir() {
			return nil
		}
		if path != root && containsAny(d.Name(), markers) {
			found = path
			return fs.SkipAll
		}
		if strings.Count(strings.TrimPrefix(path, root), "/") >= maxCgroupDepth {
			return fs.SkipDir
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("walk %s: %w", root, err)
	}
	if found == "" {
		return "", fmt.Errorf("pod %s: no cgroup under %s: %w", uid, root, ErrNotFound)
	}
	return found, nil
}
