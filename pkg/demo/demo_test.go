//go:build linux

package demo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/ambpf/ambpf/pkg/netlab"
)

// testConfig gives each test its own name prefix and state directory, so
// the leak checks see only what this test created.
func testConfig(t *testing.T) Config {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the demo needs root: network namespaces, BPF programs, a bpffs mount")
	}
	var b [3]byte
	rand.Read(b[:])
	return Config{
		Prefix:   "ambpf-dt" + hex.EncodeToString(b[:]) + "-",
		StateDir: filepath.Join(t.TempDir(), "state"),
	}
}

// syncBuffer is an io.Writer that may call hook with everything written
// so far.
type syncBuffer struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	hook func(string)
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.buf.Write(p)
	if s.hook != nil {
		s.hook(s.buf.String())
	}
	return n, err
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

func TestDemoEndToEnd(t *testing.T) {
	cfg := testConfig(t)
	out := &syncBuffer{}
	cfg.Out = out
	err := Run(context.Background(), cfg)
	t.Logf("demo output:\n%s", out)
	if err != nil {
		t.Fatalf("demo failed: %v", err)
	}
	for _, want := range []string{
		"app-a proxy :15001 accepted",
		"original destination 10.77.0.12:8080",
		"app-b proxy :15006 accepted 10.77.0.10:",
		"app=app-a peer=10.77.0.12",
		"app=app-a peer=169.254.7.127",
		"answer from 10.77.0.1:53: dns-proxy",
		"dropped_no_listener+",
		"attach=",
		`"captured_out":`,
		"(no rules)",
		"nothing left behind",
		"Demo passed",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if strings.Contains(out.String(), "FAIL") {
		t.Error("output reports a failed check")
	}
	assertNothingLeft(t, cfg)
}

// TestDemoInterrupted cancels the demo in the middle of the traffic step,
// as Ctrl-C does, and checks that it fails and still removes everything.
func TestDemoInterrupted(t *testing.T) {
	cfg := testConfig(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &syncBuffer{hook: func(s string) {
		if strings.Contains(s, "app-a -> app-b:8080") {
			cancel()
		}
	}}
	cfg.Out = out
	err := Run(ctx, cfg)
	t.Logf("demo output:\n%s", out)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Run after cancel = %v, want context.Canceled", err)
	}
	if strings.Contains(out.String(), "[4/5]") {
		t.Error("the demo went on to the next step after the cancel")
	}
	if !strings.Contains(out.String(), "nothing left behind") {
		t.Error("no cleanup report after the cancel")
	}
	assertNothingLeft(t, cfg)
}

// assertNothingLeft checks for what a demo run creates: network
// namespaces and cgroups with its prefix, mounts under its state directory,
// the state directory itself, and child processes.
func assertNothingLeft(t *testing.T, cfg Config) {
	t.Helper()
	entries, err := os.ReadDir("/run/netns")
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), cfg.Prefix) {
			t.Errorf("netns left behind: /run/netns/%s", e.Name())
		}
	}
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mountinfo), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], cfg.StateDir) {
			t.Errorf("mount left behind: %s", line)
		}
	}
	if _, err := os.Stat(cfg.StateDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state directory %s left behind (stat: %v)", cfg.StateDir, err)
	}
	mnt, err := netlab.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	cgroups, err := os.ReadDir(mnt)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range cgroups {
		if strings.HasPrefix(e.Name(), cfg.Prefix) {
			t.Errorf("cgroup left behind: %s", filepath.Join(mnt, e.Name()))
		}
	}
	tasks, err := filepath.Glob("/proc/self/task/*/children")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range tasks {
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) != "" {
			t.Errorf("child processes left behind: %s: %s", f, b)
		}
	}
}
