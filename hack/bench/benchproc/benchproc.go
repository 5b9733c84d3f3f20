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
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

// Process is one of the binaries running in a network namespace
// (netlab.Process: nsenter execs it, so the pid is the binary's), its
// output in a log file, with what the benchmarks measure of it.
type Process struct {
	*netlab.Process
}

// Start runs bin with args in the network namespace ns, with env added to
// this process's environment and its output in a log file in dir. It is
// stopped (SIGTERM, then SIGKILL after 10 s) when tb ends, and killed if
// this process dies.
func Start(tb testing.TB, ns *nettest.Netns, dir string, env []string, bin string, args ...string) *Process {
	tb.Helper()
	p, err := netlab.StartProcess(netlab.ProcessConfig{
		Name:      filepath.Base(bin),
		NetnsPath: ns.NSPath,
		Bin:       bin,
		Args:      args,
		Env:       env,
		LogPath:   filepath.Join(dir, fmt.Sprintf("%s-%s-%d.log", filepath.Base(bin), ns.Name, time.Now().UnixNano())),
		StopWait:  10 * time.Second,
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if !p.Exited() {
			p.Stop() // its exit status says nothing about the benchmark
		}
	})
	return &Process{p}
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
	return build(tb, func(root, dir string) error { return nodelab.BuildCommands(root, dir, names...) })
}

// BuildPackages is Build for main packages given by their path from the
// repository's root (./hack/bench/relay).
func BuildPackages(tb testing.TB, pkgs ...string) string {
	tb.Helper()
	return build(tb, func(root, dir string) error { return nodelab.BuildPackages(root, dir, pkgs...) })
}

// build runs fn with the repository's root and a new temporary directory
// removed when tb ends, and returns the directory.
func build(tb testing.TB, fn func(root, dir string) error) string {
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
	if err := fn(root, dir); err != nil {
		tb.Fatal(err)
	}
	return dir
}
