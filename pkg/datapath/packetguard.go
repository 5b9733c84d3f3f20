//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ambpf/ambpf/pkg/bpfobj"
)

// pinLinkPacketGuard is the packet-socket guard's cgroup link (bpf/sockguard.c).
const pinLinkPacketGuard = "link_cgroup_lsm_socket_create"

// cgroupGuards are the pod-cgroup attachments a pod directory may hold,
// for status: pin, program, hook.
var cgroupGuards = []struct{ pin, prog, hook string }{
	{pinLinkSockopt, captureProgGuardMark, "cgroup setsockopt"},
	{pinLinkPacketGuard, sockguardProgGuardPacketSocket, "cgroup lsm socket_create"},
}

// loadPacketGuard loads a fresh instance of the packet-socket guard.
func loadPacketGuard() (*sockguardObjects, error) {
	spec, err := loadSockguard()
	if err != nil {
		return nil, fmt.Errorf("load embedded packet guard: %w", err)
	}
	var o sockguardObjects
	if err := bpfobj.Load(spec, &o, nil, "packet guard"); err != nil {
		return nil, err
	}
	return &o, nil
}

// attachPacketGuard refuses AF_PACKET sockets to the processes of the
// cgroup at path and returns the link. It needs BPF_LSM_CGROUP (6.0+) and
// the bpf LSM in the kernel's active set (lsm= on the command line); where
// either is missing it fails and the caller carries on without the guard.
func attachPacketGuard(cgroupPath string) (link.Link, error) {
	o, err := loadPacketGuard()
	if err != nil {
		return nil, err
	}
	defer o.Close()
	lk, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: ebpf.AttachLSMCgroup, Program: o.GuardPacketSocket})
	if err != nil {
		return nil, fmt.Errorf("attach packet-socket guard to %s: %w", cgroupPath, err)
	}
	return lk, nil
}

// upgradePacketGuard swaps the pod's packet guard for this build's, when it
// has one.
func upgradePacketGuard(dir string) error {
	path := filepath.Join(dir, pinLinkPacketGuard)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	o, err := loadPacketGuard()
	if err != nil {
		return err
	}
	defer o.Close()
	return updatePinnedLink(path, o.GuardPacketSocket)
}
