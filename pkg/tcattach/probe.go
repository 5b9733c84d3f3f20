//go:build linux

package tcattach

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// bpfLinkCreate is the bpf(2) command BPF_LINK_CREATE.
const bpfLinkCreate = 28

// linkCreateAttr is the head of union bpf_attr for BPF_LINK_CREATE:
// prog_fd, target_ifindex, attach_type, flags, and room for the rest
// (zero: no relative program, no expected revision).
type linkCreateAttr struct {
	progFD        uint32
	targetIfindex uint32
	attachType    uint32
	flags         uint32
	_             [6]uint64
}

var tcx = sync.OnceValues(probeTCX)

// HaveTCX reports whether the running kernel can attach TC programs as tcx
// links (Linux 6.6). It asks the kernel, once per process: a tiny SchedCLS
// program is linked to tcx ingress of ifindex 0, which a kernel with tcx
// refuses for the device (ENODEV) and one without for the attach type
// (EINVAL). Nothing is attached either way. An error means the probe could
// not run (no BPF rights, say); HaveTCX is then false.
func HaveTCX() (bool, error) { return tcx() }

func probeTCX() (bool, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "ambpf_tcx_probe",
		Type:         ebpf.SchedCLS,
		License:      "Dual BSD/GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return false, fmt.Errorf("probe tcx: load a SchedCLS program: %w", err)
	}
	defer prog.Close()
	attr := linkCreateAttr{progFD: uint32(prog.FD()), attachType: uint32(ebpf.AttachTCXIngress)}
	fd, _, errno := unix.Syscall(unix.SYS_BPF, bpfLinkCreate, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	switch {
	case errno == 0:
		unix.Close(int(fd))
		return false, errors.New("probe tcx: a link to ifindex 0 was created")
	case errors.Is(errno, unix.ENODEV):
		return true, nil
	case errors.Is(errno, unix.EINVAL):
		return false, nil
	}
	return false, fmt.Errorf("probe tcx: link create: %w", errno)
}
