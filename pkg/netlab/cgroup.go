//go:build linux

package netlab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ambpf/ambpf/pkg/cgroup"
)

// Cgroup2Mount returns the mount point of the cgroup2 hierarchy (see
// cgroup.Mount).
func Cgroup2Mount() (string, error) { return cgroup.Mount() }

// cgroupTree is <cgroup2>/<prefix><id>, holding one child per pod (and
// per other container the lab was asked for).
type cgroupTree struct {
	root string
	pods []string
}

// CgroupRoot returns the lab's parent cgroup directory, <cgroup2>/<prefix><id>,
// or "" when no pod cgroup has been created yet.
func (l *Lab) CgroupRoot() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cgroup == nil {
		return ""
	}
	return l.cgroup.root
}

// Cgroup returns the pod's cgroup v2 directory, <cgroup2>/<prefix><id>/<name>,
// creating it (and the lab's parent cgroup) on first use. The lab's Close
// kills whatever still runs in it and removes it.
func (p *Pod) Cgroup() (string, error) {
	dir, err := p.lab.Cgroup(p.Name)
	if err != nil {
		return "", fmt.Errorf("cgroup of %s: %w", p.Name, err)
	}
	return dir, nil
}

// Cgroup returns the cgroup v2 directory <cgroup2>/<prefix><id>/<name>,
// creating it (and the lab's parent cgroup) on first use: a pod's (named
// as the pod), or another container's of the node, such as the proxy's
// (a name no pod has). The lab's Close kills whatever still runs in it
// and removes it.
func (l *Lab) Cgroup(name string) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return "", errors.New("lab closed")
	}
	if !podNamePattern.MatchString(name) {
		return "", fmt.Errorf("invalid cgroup name %q", name)
	}
	if l.cgroup == nil {
		mnt, err := Cgroup2Mount()
		if err != nil {
			return "", err
		}
		root := filepath.Join(mnt, l.Prefix+l.ID)
		if err := os.Mkdir(root, 0o755); err != nil {
			return "", fmt.Errorf("create cgroup %s: %w", root, err)
		}
		l.cgroup = &cgroupTree{root: root}
	}
	dir := filepath.Join(l.cgroup.root, name)
	if err := os.Mkdir(dir, 0o755); err == nil {
		l.cgroup.pods = append(l.cgroup.pods, dir)
	} else if !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	return dir, nil
}

// Command returns a command that runs inside the pod's network namespace
// (through `ip netns exec`) and in the pod's cgroup from its first
// instruction (clone into the cgroup). If the cgroup cannot be created,
// the error is returned by Start/Run. The lab's Close kills the process if
// it still runs; the caller still owns Wait.
func (p *Pod) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", p.NSName, name}, args...)...)
	dir, err := p.Cgroup()
	if err != nil {
		cmd.Err = err
		return cmd
	}
	f, err := os.Open(dir)
	if err != nil {
		cmd.Err = fmt.Errorf("open cgroup %s: %w", dir, err)
		return cmd
	}
	// The descriptor must stay open until Start; it is closed with the
	// lab (before the cgroup is removed) rather than per command.
	p.lab.Cleanup(f.Close)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	return cmd
}

// remove kills every process left in the pod cgroups and removes them and
// the parent.
func (c *cgroupTree) remove() error {
	var errs []error
	for _, dir := range c.pods {
		errs = append(errs, removeCgroup(dir))
	}
	errs = append(errs, removeCgroup(c.root))
	return errors.Join(errs...)
}

func removeCgroup(dir string) error {
	if err := killCgroup(dir); err != nil {
		return err
	}
	// Killed processes leave asynchronously; rmdir fails with EBUSY
	// until they are gone.
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// killCgroup SIGKILLs every process in dir: through cgroup.kill (5.14+),
// else one by one from cgroup.procs. (Opened without O_CREAT: on cgroupfs
// a missing file then answers EACCES, not ENOENT.)
func killCgroup(dir string) error {
	f, err := os.OpenFile(filepath.Join(dir, "cgroup.kill"), os.O_WRONLY, 0)
	if err == nil {
		_, err = f.Write([]byte("1"))
		f.Close()
		if err != nil {
			return fmt.Errorf("kill cgroup %s: %w", dir, err)
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) && !errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("kill cgroup %s: %w", dir, err)
	}
	procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("list cgroup %s: %w", dir, err)
	}
	for _, f := range strings.Fields(string(procs)) {
		if pid, err := strconv.Atoi(f); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}
