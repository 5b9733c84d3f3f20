//go:build linux

package podwatch

import (
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/netns"
)

// startIn starts `sleep` in the cgroup dir, inside the lab namespace
// nsName when set; the test's cleanup kills it.
func startIn(t *testing.T, dir, nsName string) {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	args := []string{"sleep", "1000000"}
	if nsName != "" {
		args = append([]string{"ip", "netns", "exec", nsName}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
}

// TestFinder: real processes in a real pod netns and a cgroup named as
// kubelet's systemd driver names pod cgroups. A decoy in the same cgroup
// but the host's netns does not hold the pod IP and is skipped.
func TestFinder(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and cgroups")
	}
	lab, err := netlab.Build(netlab.Options{Prefix: "ambpf-pw-", Pods: []string{"web"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	mnt, err := netlab.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(mnt, "ambpf-pw-"+lab.ID)
	uid := "0b7e5c1a-3f9d-4e2b-9a61-" + lab.ID + "abcd"
	dir := filepath.Join(root, "kubepods.slice", "kubepods-besteffort-pod"+strings.ReplaceAll(uid, "-", "_")+".slice")
	if err := os.MkdirAll(filepath.Join(dir, "cri-containerd-1.scope"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, d := range []string{filepath.Join(dir, "cri-containerd-1.scope"), dir, filepath.Dir(dir), root} {
			os.WriteFile(filepath.Join(d, "cgroup.kill"), []byte("1"), 0o644)
			for i := 0; i < 100 && os.Remove(d) != nil; i++ {
				time.Sleep(20 * time.Millisecond)
			}
		}
	})
	f := Finder{ProcRoot: "/proc", CgroupRoot: mnt}

	// Before any process: the cgroup is found by name (the CNI ADD case).
	cg, err := f.Cgroup(uid)
	if err != nil || cg != dir {
		t.Fatalf("Cgroup = %q, %v; want %s", cg, err, dir)
	}
	if _, _, err := f.Netns(uid, []netip.Addr{lab.Pods[0].IPv4}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Netns with no process = %v, want ErrNotFound", err)
	}

	pod := lab.Pods[0]
	startIn(t, dir, "") // decoy: the pod's cgroup, the host's netns
	startIn(t, filepath.Join(dir, "cri-containerd-1.scope"), pod.NSName)
	var path string
	deadline := time.Now().Add(5 * time.Second)
	for {
		path, cg, err = f.Netns(uid, []netip.Addr{pod.IPv6})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond) // ip netns exec has not exec'd sleep yet
	}
	if err != nil {
		t.Fatalf("Netns: %v", err)
	}
	if cg != dir {
		t.Errorf("Netns cgroup = %q, want the pod-level %s", cg, dir)
	}
	got, err := netns.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	gid, _ := got.ID()
	wid, _ := pod.NS.ID()
	if gid != wid {
		t.Errorf("Netns = %s (%v), not the pod's namespace %v", path, gid, wid)
	}
	if _, _, err := f.Netns(uid, []netip.Addr{netip.MustParseAddr("192.0.2.1")}); !errors.Is(err, ErrNotFound) {
		t.Errorf("Netns for an address the pod does not hold = %v, want ErrNotFound", err)
	}
	if _, err := f.Cgroup("11111111-2222-3333-4444-555555555555"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Cgroup of an unknown pod = %v, want ErrNotFound", err)
	}
}
