//go:build linux

package bpfobj

import (
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// ProgramID is the kernel's ID of p, from one BPF_OBJ_GET_INFO_BY_FD that
// asks for the first two fields of struct bpf_prog_info only (type, id).
// p.Info() makes the same call for the whole struct and then also reads
// and parses /proc/self/fdinfo, which was a twentieth of a pod's
// enrolment when its status named its three programs.
func ProgramID(p *ebpf.Program) (ebpf.ProgramID, error) {
	var info struct{ Type, ID uint32 }
	// The union bpf_attr's info member: the pointer is a __aligned_u64
	// (64-bit platforms, as the embedded objects are), kept as a pointer
	// so the runtime updates it if the stack moves before the call.
	attr := struct {
		FD, InfoLen uint32
		Info        unsafe.Pointer
	}{FD: uint32(p.FD()), InfoLen: uint32(unsafe.Sizeof(info)), Info: unsafe.Pointer(&info)}
	_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET_INFO_BY_FD, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	if errno != 0 {
		return 0, fmt.Errorf("program info: %w", errno)
	}
	return ebpf.ProgramID(info.ID), nil
}
