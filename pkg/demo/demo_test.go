//go:build linux

package demo

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/logtest"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

// built is this package's ambpf binaries, built once per test run.
var built = nodelab.BinaryCache{Prefix: "ambpf-demo-bin-"}

// binaries returns the ambpf binaries and the CNI tools, built once.
func binaries(t *testing.T) (bins, tools string) { return built.Get(t) }

func TestMain(m *testing.M) {
	code := m.Run()
	built.Remove()
	os.Exit(code)
}

// testConfig gives each test its own name prefix and state directory, so
// the leak checks see only what this test created.
func testConfig(t *testing.T) Config {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the demo needs root: network namespaces, BPF programs, a bpffs mount")
	}
	bins, tools := binaries(t)
	return Config{
		Prefix:   "ambpf-dt" + nodelab.RandomID() + "-",
		StateDir: filepath.Join(t.TempDir(), "state"),
		BinDir:   bins,
		ToolsDir: tools,
	}
}

func TestDemoEndToEnd(t *testing.T) {
	cfg := testConfig(t)
	links := rootLinks(t)
	out := &logtest.Buffer{}
	cfg.Out = out
	err := Run(context.Background(), cfg)
	t.Logf("demo output:\n%s", out)
	if err != nil {
		t.Fatalf("demo failed: %v", err)
	}
	for _, want := range []string{
		"enrolled by ambpf-cni: enabled, datapath attached true",
		"app=app-b peer=10.78.0.10",
		"app=app-c peer=10.78.0.10",
		"node2 proxy inbound  10.78.0.10:",
		"app-a -> app-c:15008 [inter-node link]",
		`"app=app-c peer=" (app-c's answer to app-a, sent over HBONE across nodes) in the capture: false`,
		"pods:      1 enrolled, 1 enabled, 0 pending",
		"node1 proxy outbound 10.78.0.10:",
		"mutual TLS spiffe://cluster.local/ns/demo/sa/default -> spiffe://cluster.local/ns/demo/sa/default",
		"app=outside peer=10.78.0.10",
		"app=app-a peer=10.78.0.100",
		"app=app-a peer=169.254.7.127",
		"translated+1",
		"app-a -> app-b:15008",
		`"app=app-b peer=" (app-b's answer to app-a, sent over HBONE) in the capture: false`,
		"pods:      2 enrolled, 2 enabled, 0 pending",
		"reporter=source app-a -> app-b security=mutual_tls",
		"reporter=destination app-a -> app-c security=mutual_tls",
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
	assertNothingLeft(t, cfg, links)
}

// TestDemoInterrupted cancels the demo in the middle of the traffic step,
// as Ctrl-C does, and checks that it fails and still removes everything.
func TestDemoInterrupted(t *testing.T) {
	cfg := testConfig(t)
	links := rootLinks(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &logtest.Buffer{OnWrite: func(s string) {
		if strings.Contains(s, "app-a -> outside:8080") {
			cancel()
		}
	}}
	cfg.Out = out
	err := Run(ctx, cfg)
	t.Logf("demo output:\n%s", out)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Run after cancel = %v, want context.Canceled", err)
	}
	if strings.Contains(out.String(), "[4/6]") {
		t.Error("the demo went on to the next step after the cancel")
	}
	if !strings.Contains(out.String(), "nothing left behind") {
		t.Error("no cleanup report after the cancel")
	}
	assertNothingLeft(t, cfg, links)
}

// rootLinks lists the devices of the test's own network namespace: the
// demo must not add any.
func rootLinks(t *testing.T) []string {
	t.Helper()
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, i := range ifs {
		out = append(out, i.Name)
	}
	slices.Sort(out)
	return out
}

// assertNothingLeft checks for what a demo run creates: network
// namespaces with its prefix, devices in the caller's namespace, mounts
// under its state directory (the bpffs and its pins), the state
// directory itself, libcni's cached results of its networks, and child
// processes (agent, proxy, tcpdump).
func assertNothingLeft(t *testing.T, cfg Config, linksBefore []string) {
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
	for _, l := range rootLinks(t) {
		if !slices.Contains(linksBefore, l) {
			t.Errorf("device appeared in the caller's netns: %s", l)
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
	if cached, _ := filepath.Glob(filepath.Join("/var/lib/cni/results", cfg.Prefix+"*")); len(cached) > 0 {
		t.Errorf("CNI cache files left behind: %v", cached)
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
