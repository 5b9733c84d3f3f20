//go:build linux

package probesnat

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// clsact filters use a private priority and handle, distinct from
// pkg/datapath's, so they never collide with (or remove) anyone else's
// filters on a node device, which CNIs and other agents also use.
const (
	clsactPriority = 0x1ee8
	clsactHandle   = 0xa6c
)

// tcxAttach attaches the SNAT program to the device's egress and the
// reverse program to its ingress, in that order. It must run inside the
// node netns. On error it returns the links made so far for the caller to
// undo.
func tcxAttach(ifindex int, o *hostprobeObjects) ([]link.Link, error) {
	var links []link.Link
	for _, a := range []struct {
		prog   *ebpf.Program
		attach ebpf.AttachType
		what   string
	}{
		{o.ProbeSnat, ebpf.AttachTCXEgress, "egress"},
		{o.ProbeUnsnat, ebpf.AttachTCXIngress, "ingress"},
	} {
		lk, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: a.prog, Attach: a.attach})
		if err != nil {
			return links, fmt.Errorf("attach tcx %s (ifindex %d): %w", a.what, ifindex, err)
		}
		links = append(links, lk)
	}
	return links, nil
}

// tcxAttached reports whether the pinned tcx link at path is still attached
// to a device.
func tcxAttached(path string) bool {
	lk, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		return false
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		return false
	}
	t := info.TCX()
	return t != nil && t.Ifindex != 0
}

type clsactSlot struct {
	parent uint32
	prog   *ebpf.Program
	name   string
}

func clsactSlots(o *hostprobeObjects) []clsactSlot {
	var egress, ingress *ebpf.Program
	if o != nil {
		egress, ingress = o.ProbeSnat, o.ProbeUnsnat
	}
	return []clsactSlot{
		{netlink.HANDLE_MIN_EGRESS, egress, "ambpf_" + hostprobeProgProbeSnat},
		{netlink.HANDLE_MIN_INGRESS, ingress, "ambpf_" + hostprobeProgProbeUnsnat},
	}
}

func clsactFilter(ifindex int, s clsactSlot) *netlink.BpfFilter {
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    s.parent,
			Handle:    clsactHandle,
			Priority:  clsactPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Name:         s.name,
		DirectAction: true,
	}
	if s.prog != nil {
		f.Fd = s.prog.FD()
	}
	return f
}

// clsactAttach adds (or atomically replaces) the two filters, creating the
// clsact qdisc when there is none and recording that in info. It must run
// inside the node netns.
func clsactAttach(info *hostprobeProbeInfo, ifindex int, o *hostprobeObjects) error {
	q, err := findClsact(ifindex)
	if err != nil {
		return err
	}
	if q == nil {
		err = netlink.QdiscAdd(&netlink.GenericQdisc{
			QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
			QdiscType:  "clsact",
		})
		if err != nil {
			return fmt.Errorf("add clsact qdisc (ifindex %d): %w", ifindex, err)
		}
		info.Setup |= setupQdisc
	}
	for _, s := range clsactSlots(o) {
		if err := netlink.FilterReplace(clsactFilter(ifindex, s)); err != nil {
			return fmt.Errorf("add clsact filter %s (ifindex %d): %w", s.name, ifindex, err)
		}
	}
	return nil
}

// clsactDetach deletes our filters, and the clsact qdisc when we created it
// and no other filter remains on it. It must run inside the node netns. A
// device that is gone, or whose ifindex now belongs to another device,
// has nothing of ours left.
func clsactDetach(info *hostprobeProbeInfo) error {
	ifindex := int(info.Ifindex)
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil || lk.Attrs().Name != cString(info.Ifname[:]) {
		return nil
	}
	var errs []error
	for _, s := range clsactSlots(nil) {
		err := netlink.FilterDel(clsactFilter(ifindex, s))
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete clsact filter %s: %w", s.name, err))
		}
	}
	if info.Setup&setupQdisc == 0 || len(errs) > 0 {
		return errors.Join(errs...)
	}
	n, err := filterCount(lk)
	if err != nil || n > 0 {
		return err
	}
	q, err := findClsact(ifindex)
	if err == nil && q != nil {
		err = netlink.QdiscDel(q)
	}
	if err != nil {
		return fmt.Errorf("delete clsact qdisc (ifindex %d): %w", ifindex, err)
	}
	info.Setup &^= setupQdisc
	return nil
}

func findClsact(ifindex int) (netlink.Qdisc, error) {
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil, fmt.Errorf("find link %d: %w", ifindex, err)
	}
	qs, err := netlink.QdiscList(lk)
	if err != nil {
		return nil, fmt.Errorf("list qdiscs of %s: %w", lk.Attrs().Name, err)
	}
	for _, q := range qs {
		if q.Type() == "clsact" {
			return q, nil
		}
	}
	return nil, nil
}

func filterCount(lk netlink.Link) (int, error) {
	n := 0
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := netlink.FilterList(lk, parent)
		if err != nil {
			return 0, fmt.Errorf("list filters of %s: %w", lk.Attrs().Name, err)
		}
		n += len(fs)
	}
	return n, nil
}

// clsactPresent counts our filters on the device. It must run inside the
// node netns.
func clsactPresent(ifindex int) (int, error) {
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return 0, fmt.Errorf("find link %d: %w", ifindex, err)
	}
	n := 0
	for _, s := range clsactSlots(nil) {
		fs, err := netlink.FilterList(lk, s.parent)
		if err != nil {
			return 0, fmt.Errorf("list filters of %s: %w", lk.Attrs().Name, err)
		}
		for _, f := range fs {
			if _, ok := f.(*netlink.BpfFilter); ok && f.Attrs().Priority == clsactPriority && f.Attrs().Handle == clsactHandle {
				n++
			}
		}
	}
	return n, nil
}
