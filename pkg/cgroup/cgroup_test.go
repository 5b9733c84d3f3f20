//go:build linux

package cgroup

import "testing"

func TestMountIn(t *testing.T) {
	hybrid := []byte(`25 30 0:23 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/cpu rw,nosuid shared:11 - cgroup cgroup rw,cpu
`)
	if got, err := mountIn(hybrid); err != nil || got != "/sys/fs/cgroup/unified" {
		t.Errorf("hybrid: %q, %v", got, err)
	}
	if _, err := mountIn([]byte("27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")); err == nil {
		t.Error("v1 only: want an error")
	}
}

func TestV2Path(t *testing.T) {
	hybrid := []byte("4:memory:/user.slice\n1:name=systemd:/user.slice/x\n0::/kubepods/pod1/c1\n")
	if got, err := v2Path(hybrid); err != nil || got != "/kubepods/pod1/c1" {
		t.Errorf("hybrid: %q, %v", got, err)
	}
	for name, in := range map[string]string{
		"v1 only": "4:memory:/user.slice\n",
		"deleted": "0::/gone (deleted)\n",
	} {
		if got, err := v2Path([]byte(in)); err == nil {
			t.Errorf("%s: %q, want an error", name, got)
		}
	}
}
