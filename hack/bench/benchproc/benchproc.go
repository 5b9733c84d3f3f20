//go:build linux

// Package benchproc runs the installed binaries (ambpf-agent, ambpf-proxy,
// iperf3, ...) for the benchmarks under hack/bench: built once per test
// process, started in a network namespace with their output in a log
// file, stopped at the end of the benchmark, and measured from outside
// (CPU from schedstat, memory from /proc/<pid>/status).
package benchproc

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

// Process is a command running in a network namespace (nsenter execs it,
// so the pid is the command's), its output in a log file.
type Process struct {
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error
}

// Start runs bin with args in the network namespace ns, with env added to this process's
// environment and its output in a log file in dir. It is stopped
// (SIGTERM, then SIGKILL after 10 s) when tb ends, and killed if this
// process dies.
func Start(tb testing.TB, ns *nettest.Netns, dir string, env []string, bin string, args ...string) *Process {
	tb.Helper()
	p := &Process{logPath: filepath.Join(dir, fmt.Sprintf("%s-%s-%d.log", filepath.Base(bin), ns.Name, time.Now().UnixNano())), done: make(chan struct{})}
	f, err := os.Create(p.logPath)
	if err != nil {
		tb.Fatal(err)
	}
	// nsenter keeps the mount namespace (the agent finds cgroup2 there).
	p.cmd = exec.Command("nsenter", append([]string{"--net=" + ns.NSPath, bin}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		f.Close()
		tb.Fatalf("start %s: %v", bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		f.Close()
		close(p.done)
	}()
	tb.Cleanup(func() {
		if p.Exited() {
			return
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// Pid is the command's process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the command has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is how the command ended (nil while it runs, or when it exited 0).
func (p *Process) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.err
}

// Tail returns the last n lines of the command's output.
func (p *Process) Tail(n int) string {
	bs, err := os.ReadFile(p.logPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(bs), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// CPU is the on-CPU time of all of p's threads so far, in ns resolution
// (schedstat), not the 10 ms ticks of /proc/<pid>/stat.
func (p *Process) CPU(tb testing.TB) time.Duration {
	tb.Helper()
	dir := fmt.Sprintf("/proc/%d/task", p.Pid())
	tasks, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatalf("threads of %d: %v", p.Pid(), err)
	}
	var sum time.Duration
	for _, t := range tasks {
		bs, err := os.ReadFile(filepath.Join(dir, t.Name(), "schedstat"))
		if err != nil {
			continue // exited meanwhile
		}
		f := strings.Fields(string(bs))
		if len(f) == 0 {
			continue
		}
		ns, _ := strconv.ParseInt(f[0], 10, 64)
		sum += time.Duration(ns)
	}
	return sum
}

// RSS is the process's resident set size now (VmRSS of
// /proc/<pid>/status), in bytes.
func (p *Process) RSS() (int64, error) {
	return StatusField(p.Pid(), "VmRSS")
}

// StatusField reads a "kB" field of /proc/<pid>/status, in bytes.
func StatusField(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != field {
			continue
		}
		v := strings.Fields(rest)
		if len(v) != 2 || v[1] != "kB" {
			return 0, fmt.Errorf("/proc/%d/status: %s: %q", pid, field, rest)
		}
		kb, err := strconv.ParseInt(v[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/status: %s: %w", pid, field, err)
		}
		return kb * 1024, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("/proc/%d/status: no %s", pid, field)
}

// Build builds ./cmd/<name> of the repository the test runs in, for each
// name, into a temporary directory it returns (removed when tb ends). Go's
// build cache makes a second build in one process quick.
func Build(tb testing.TB, names ...string) string {
	tb.Helper()
	wd, err := os.Getwd()
	if err != nil {
		tb.Fatal(err)
	}
	root, err := nodelab.RepoRoot(wd)
	if err != nil {
		tb.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "ambpf-benchbin-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	args := []string{"build", "-o", dir + "/"}
	for _, n := range names {
		args = append(args, "./cmd/"+n)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}
