//go:build linux

package node

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ambpf/ambpf/pkg/kubetest"
)

// Stop removes every pod through kubelet (so CNI DEL runs and containerd
// removes the pods' network namespaces), stops the node's processes and
// the containerd shims of this node, then removes what is left: mounts
// under Root, network namespaces containerd created, cgroups under
// CgroupRoot, the bridge and nft table, Root itself; and restores the
// kernel tunables. It is safe to call more than once; errors are joined,
// every step runs.
func (n *Node) Stop() error {
	if n.stopped {
		return nil
	}
	n.stopped = true
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if n.kubelet != nil && n.ControlPlane != nil && !n.kubelet.Exited() {
		add(n.drain())
	}
	for _, p := range []**kubetest.Process{&n.kubelet, &n.scheduler, &n.controller} {
		if *p != nil {
			add((*p).Stop(stopGrace))
			*p = nil
		}
	}
	if n.containerd != nil {
		// Containers kubelet did not get to stop (a failed drain).
		if out, err := n.ctr("tasks", "ls", "-q"); err == nil {
			for _, id := range strings.Fields(out) {
				n.ctr("tasks", "kill", "--signal", "SIGKILL", id)
			}
		}
	}
	add(n.killShims())
	if n.containerd != nil {
		add(n.containerd.Stop(stopGrace))
		n.containerd = nil
	}
	if n.ControlPlane != nil {
		add(n.ControlPlane.Stop())
		n.ControlPlane = nil
	}
	if n.Root != "" {
		add(unmountUnder(n.Root))
	}
	for _, d := range n.shimDirs {
		// Empty once every shim is gone; Remove refuses a non-empty one.
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			add(fmt.Errorf("remove %s: %w", d, err))
		}
	}
	add(n.removeNetns())
	add(removeCgroups())
	add(n.removeNetwork())
	add(n.restoreTunables())
	if n.Root != "" {
		add(os.RemoveAll(n.Root))
	}
	if n.unlock != nil {
		n.unlock()
	}
	return errors.Join(errs...)
}

// drain deletes every workload and pod and waits until containerd runs
// no pod sandbox any more.
func (n *Node) drain() error {
	ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	var errs []error
	if out, err := n.Run(ctx, "kubectl", "get", "ns", "-o", "jsonpath={.items[*].metadata.name}"); err == nil {
		for _, ns := range strings.Fields(out) {
			if _, err := n.Run(ctx, "kubectl", "delete", "daemonsets,deployments,replicasets,statefulsets,jobs,pods", "--all", "-n", ns, "--wait=false", "--grace-period=1"); err != nil {
				errs = append(errs, err)
			}
		}
	}
	err := waitFor(ctx, n.kubelet, drainTimeout, func() error {
		out, err := n.ctr("tasks", "ls", "-q")
		if err != nil {
			return err
		}
		if ids := strings.Fields(out); len(ids) > 0 {
			return fmt.Errorf("%d tasks still running", len(ids))
		}
		return nil
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("drain node: %w", err))
	}
	return errors.Join(errs...)
}

// killShims kills the containerd-shim-runc-v2 processes serving this
// node's containerd (they outlive containerd by design): found by the
// -address argument naming this node's socket.
func (n *Node) killShims() error {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("read /proc: %w", err)
	}
	var errs []error
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(bytes.TrimRight(cmdline, "\x00")), "\x00")
		if len(args) == 0 || !strings.HasPrefix(filepath.Base(args[0]), "containerd-shim") {
			continue
		}
		if i := slices.Index(args, "-address"); i < 0 || i+1 >= len(args) || args[i+1] != n.ContainerdSocket {
			continue
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill shim %d: %w", pid, err))
			continue
		}
		// Wait until it is gone: its cgroups and mounts go with it.
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
				break
			}
		}
	}
	return errors.Join(errs...)
}

// unmountUnder lazily unmounts every mount point at or below dir, deepest
// first (kubelet's volume tmpfs, containerd's overlay rootfs and shm).
func unmountUnder(dir string) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("open mountinfo: %w", err)
	}
	var points []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && (fields[4] == dir || strings.HasPrefix(fields[4], dir+"/")) {
			points = append(points, fields[4])
		}
	}
	f.Close()
	slices.SortFunc(points, func(a, b string) int { return len(b) - len(a) })
	var errs []error
	for _, p := range points {
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// removeNetns removes network namespaces containerd created for this
// node's pods (cni-<uuid> under /var/run/netns) that a failed drain left.
func (n *Node) removeNetns() error {
	ents, err := os.ReadDir("/var/run/netns")
	if err != nil {
		return nil
	}
	var errs []error
	for _, e := range ents {
		if n.netnsSeen == nil || n.netnsSeen[e.Name()] || !strings.HasPrefix(e.Name(), "cni-") {
			continue
		}
		p := filepath.Join("/var/run/netns", e.Name())
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
		}
		if err := os.Remove(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (n *Node) restoreTunables() error {
	var errs []error
	for k, v := range n.tunables {
		if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", k, err))
		}
	}
	return errors.Join(errs...)
}
