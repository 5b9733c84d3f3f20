//go:build linux

package tcattach

import (
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/netns"
)

// Direction is the TC hook of a device.
type Direction int

const (
	Ingress Direction = iota
	Egress
)

func (d Direction) String() string {
	if d == Ingress {
		return "ingress"
	}
	return "egress"
}

func (d Direction) tcxAttach() ebpf.AttachType {
	if d == Ingress {
		return ebpf.AttachTCXIngress
	}
	return ebpf.AttachTCXEgress
}

func (d Direction) clsactParent() uint32 {
	if d == Ingress {
		return netlink.HANDLE_MIN_INGRESS
	}
	return netlink.HANDLE_MIN_EGRESS
}

// Hook is one program on one TC hook of one device.
type Hook struct {
	Ifindex int
	Dir     Direction
	// Program runs there; nil when only deleting or listing.
	Program *ebpf.Program
	// Name names the clsact filter (and the hook in errors); it is how
	// Present reports the hook.
	Name string
}

// InterfaceIndex returns the ifindex of the named device.
func InterfaceIndex(name string) (int, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return 0, fmt.Errorf("find interface %s: %w", name, err)
	}
	return ifc.Index, nil
}

// AttachTCX attaches each hook's program as a tcx link, in order. On error
// it returns the links made so far, for the caller to detach and close.
func AttachTCX(hooks []Hook) ([]link.Link, error) {
	var links []link.Link
	for _, h := range hooks {
		lk, err := link.AttachTCX(link.TCXOptions{Interface: h.Ifindex, Program: h.Program, Attach: h.Dir.tcxAttach()})
		if err != nil {
			return links, fmt.Errorf("attach tcx %s %s (ifindex %d): %w", h.Dir, h.Name, h.Ifindex, err)
		}
		links = append(links, lk)
	}
	return links, nil
}

// AttachTCXIn attaches each hook's program as a tcx link in the network
// namespace ns, all hooks at once. Creating (and detaching) a tcx link
// waits for an RCU grace period in the kernel (the device's program list
// is swapped, then the old one must be unused): about 10 ms each here.
// Made concurrently, the waits overlap, so a pod's three hooks cost one
// grace period instead of three. The links are returned in hook order;
// on error, the ones made (non-nil) are returned for the caller to detach
// and close.
func AttachTCXIn(ns *netns.NS, hooks []Hook) ([]link.Link, error) {
	links := make([]link.Link, len(hooks))
	errs := make([]error, len(hooks))
	var wg sync.WaitGroup
	for i, h := range hooks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = ns.Do(func() error {
				lk, err := link.AttachTCX(link.TCXOptions{Interface: h.Ifindex, Program: h.Program, Attach: h.Dir.tcxAttach()})
				if err != nil {
					return fmt.Errorf("attach tcx %s %s (ifindex %d): %w", h.Dir, h.Name, h.Ifindex, err)
				}
				links[i] = lk
				return nil
			})
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		var made []link.Link
		for _, lk := range links {
			if lk != nil {
				made = append(made, lk)
			}
		}
		return made, err
	}
	return links, nil
}

// DetachPinnedAll is DetachPinned for every path, all at once, so the
// kernel's grace-period waits of tcx links overlap (see AttachTCXIn).
func DetachPinnedAll(paths []string) error {
	errs := make([]error, len(paths))
	var wg sync.WaitGroup
	for i, p := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = DetachPinned(p)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// DetachPinned detaches the link pinned at path and closes it; the pin
// stays. Detaching explicitly matters: dropping the last reference to a
// link (unpinning) releases it from a kernel workqueue, so its program
// would keep running for a moment after the caller returned. A link whose
// device or cgroup is gone is already detached, which is fine.
func DetachPinned(path string) error {
	lk, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return fmt.Errorf("open link %s: %w", path, err)
	}
	defer lk.Close()
	if err := lk.Detach(); err != nil && !errors.Is(err, unix.ENOLINK) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("detach link %s: %w", path, err)
	}
	return nil
}

// LinkState is what a pinned link reports about itself.
type LinkState struct {
	LinkID    uint32
	ProgramID uint32
	// Attached is true while a tcx link has its device, or a cgroup link
	// its cgroup.
	Attached bool
}

// PinnedLinkState reads the link pinned at path. A pin that cannot be
// read gives the zero LinkState (not attached).
func PinnedLinkState(path string) LinkState {
	lk, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return LinkState{}
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		return LinkState{}
	}
	st := LinkState{LinkID: uint32(info.ID), ProgramID: uint32(info.Program)}
	if t := info.TCX(); t != nil {
		st.Attached = t.Ifindex != 0
	} else if c := info.Cgroup(); c != nil {
		st.Attached = c.CgroupId != 0
	}
	return st
}
