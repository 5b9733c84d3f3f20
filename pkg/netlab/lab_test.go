//go:build linux

package netlab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and cgroups")
	}
}

func testPrefix() string {
	var b [3]byte
	rand.Read(b[:])
	return "nl" + hex.EncodeToString(b[:]) + "-"
}

// leftovers lists the netns and cgroups whose names start with prefix.
func leftovers(t *testing.T, prefix string) []string {
	t.Helper()
	var left []string
	dirs := []string{"/run/netns"}
	if mnt, err := Cgroup2Mount(); err == nil {
		dirs = append(dirs, mnt)
	}
	for _, dir := range dirs {
		entries, err := os.ReadDir(dir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), prefix) {
				left = append(left, filepath.Join(dir, e.Name()))
			}
		}
	}
	return left
}

func TestBuildNamedPodsAndClose(t *testing.T) {
	requireRoot(t)
	prefix := testPrefix()
	lab, err := Build(Options{Prefix: prefix, Pods: []string{"app-a", "outside"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	a, out := lab.PodNamed("app-a"), lab.PodNamed("outside")
	if a == nil || out == nil || lab.PodNamed("nope") != nil {
		t.Fatalf("PodNamed: %v %v", a, out)
	}
	if a.NSName != prefix+lab.ID+"-app-a" || lab.Role(out.IPv6) != "outside" || lab.Role(BridgeV4) != "node" {
		t.Errorf("names: netns %q, role %q", a.NSName, lab.Role(out.IPv6))
	}

	l, err := out.Listen("tcp", "[::]:7001")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Write([]byte(c.RemoteAddr().String()))
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := a.Dial(ctx, "tcp", net.JoinHostPort(out.IPv4.String(), "7001"))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, _ := c.Read(buf)
	c.Close()
	if !strings.HasPrefix(string(buf[:n]), a.IPv4.String()+":") {
		t.Errorf("peer seen by outside = %q, want %s", buf[:n], a.IPv4)
	}

	cg, err := a.Cgroup()
	if err != nil {
		t.Fatal(err)
	}
	if lab.CgroupRoot() != filepath.Dir(cg) || !strings.HasPrefix(filepath.Base(lab.CgroupRoot()), prefix) {
		t.Errorf("cgroup %s not under the lab's root %s", cg, lab.CgroupRoot())
	}
	sleep := a.Command(context.Background(), "sleep", "300")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	ran := false
	lab.Cleanup(func() error { ran = true; return nil })

	if err := lab.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	// Close killed the process left in the pod's cgroup.
	if err := sleep.Wait(); err == nil {
		t.Error("process in the pod's cgroup survived Close")
	}
	if !ran {
		t.Error("registered cleanup did not run")
	}
	if left := leftovers(t, prefix); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
	if err := lab.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	late := false
	lab.Cleanup(func() error { late = true; return nil })
	if !late {
		t.Error("cleanup registered after Close did not run at once")
	}
	if _, err := a.Cgroup(); err == nil {
		t.Error("Cgroup after Close succeeded")
	}
}

// TestBuildFailureLeavesNothing makes Build fail after the node exists
// (a pod's netns name is too long for `ip netns add`) and checks that the
// partial lab is removed.
func TestBuildFailureLeavesNothing(t *testing.T) {
	requireRoot(t)
	prefix := testPrefix()
	long := prefix + strings.Repeat("x", 230-len(prefix))
	_, err := Build(Options{Prefix: long, Pods: []string{strings.Repeat("p", 31)}})
	if err == nil {
		t.Fatal("Build with a 270-character pod netns name succeeded")
	}
	t.Logf("Build: %v", err)
	if left := leftovers(t, prefix); len(left) > 0 {
		t.Errorf("partial lab left behind: %v", left)
	}
}

func TestBuildRejectsBadNames(t *testing.T) {
	for _, pods := range [][]string{{"Bad"}, {"a", "a"}, {"node"}, {""}, {"a/b"}} {
		if _, err := Build(Options{Pods: pods}); err == nil {
			t.Errorf("Build(%q) succeeded", pods)
		}
	}
}
