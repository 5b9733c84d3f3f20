package main

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// errUnsupported marks a kernel without io_uring socket commands (6.7+)
// or with io_uring turned off.
var errUnsupported = errors.New("unsupported")

// The io_uring ABI pieces used here (include/uapi/linux/io_uring.h).
const (
	sysIOUringSetup    = 425
	sysIOUringEnter    = 426
	opURingCmd         = 46 // IORING_OP_URING_CMD
	socketOpSetsockopt = 3  // SOCKET_URING_OP_SETSOCKOPT
	enterGetEvents     = 1
	offSQRing          = 0
	offCQRing          = 0x8000000
	offSQEs            = 0x10000000
	featSingleMmap     = 1
)

type sqOffsets struct {
	Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
	UserAddr                                                        uint64
}

type cqOffsets struct {
	Head, Tail, RingMask, RingEntries, Overflow, Cqes, Flags, Resv1 uint32
	UserAddr                                                        uint64
}

type uringParams struct {
	SqEntries, CqEntries, Flags, SqThreadCPU, SqThreadIdle, Features, WqFd uint32
	Resv                                                                   [3]uint32
	SqOff                                                                  sqOffsets
	CqOff                                                                  cqOffsets
}

// uringSetsockoptInt is setsockopt(fd, level, name, v) submitted as an
// io_uring socket command: a route to SO_MARK that is not the setsockopt
// system call.
func uringSetsockoptInt(fd, level, name, v int) error {
	var p uringParams
	rfd, _, e := syscall.Syscall(sysIOUringSetup, 1, uintptr(unsafe.Pointer(&p)), 0)
	if e != 0 {
		return fmt.Errorf("%w: io_uring_setup: %v", errUnsupported, e)
	}
	ring := int(rfd)
	defer syscall.Close(ring)
	sqSize := int(p.SqOff.Array + p.SqEntries*4)
	cqSize := int(p.CqOff.Cqes + p.CqEntries*16)
	if p.Features&featSingleMmap == 0 {
		return fmt.Errorf("%w: no IORING_FEAT_SINGLE_MMAP", errUnsupported)
	}
	size := max(sqSize, cqSize)
	rings, err := syscall.Mmap(ring, offSQRing, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED|syscall.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap rings: %w", err)
	}
	defer syscall.Munmap(rings)
	sqes, err := syscall.Mmap(ring, offSQEs, int(p.SqEntries)*64, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED|syscall.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap sqes: %w", err)
	}
	defer syscall.Munmap(sqes)

	val := new(int32)
	*val = int32(v)
	sqe := sqes[:64]
	for i := range sqe {
		sqe[i] = 0
	}
	sqe[0] = opURingCmd
	*(*int32)(unsafe.Pointer(&sqe[4])) = int32(fd)
	*(*uint32)(unsafe.Pointer(&sqe[8])) = socketOpSetsockopt
	*(*uint32)(unsafe.Pointer(&sqe[16])) = uint32(level)
	*(*uint32)(unsafe.Pointer(&sqe[20])) = uint32(name)
	*(*uint64)(unsafe.Pointer(&sqe[32])) = 1 // user_data
	*(*uint32)(unsafe.Pointer(&sqe[44])) = 4 // optlen
	*(*uint64)(unsafe.Pointer(&sqe[48])) = uint64(uintptr(unsafe.Pointer(val)))

	u32 := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&rings[off])) }
	tail := atomic.LoadUint32(u32(p.SqOff.Tail))
	*u32(p.SqOff.Array + (tail&*u32(p.SqOff.RingMask))*4) = 0
	atomic.StoreUint32(u32(p.SqOff.Tail), tail+1)
	if _, _, e := syscall.Syscall6(sysIOUringEnter, uintptr(ring), 1, 1, enterGetEvents, 0, 0); e != 0 {
		return fmt.Errorf("io_uring_enter: %v", e)
	}
	runtime.KeepAlive(val)
	head := atomic.LoadUint32(u32(p.CqOff.Head))
	if head == atomic.LoadUint32(u32(p.CqOff.Tail)) {
		return errors.New("io_uring: no completion")
	}
	cqe := p.CqOff.Cqes + (head&*u32(p.CqOff.RingMask))*16
	res := *(*int32)(unsafe.Pointer(&rings[cqe+8]))
	atomic.StoreUint32(u32(p.CqOff.Head), head+1)
	switch {
	case res == -int32(syscall.EINVAL) || res == -int32(syscall.EOPNOTSUPP):
		return fmt.Errorf("%w: socket command: %v", errUnsupported, syscall.Errno(-res))
	case res < 0:
		return syscall.Errno(-res)
	}
	return nil
}
