//go:build linux

package probesnat

import (
	"github.com/vishvananda/netlink"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// clsactFilters is a private priority and handle, distinct from
// pkg/datapath's, so the filters never collide with (or remove) anyone
// else's on a node device, which CNIs and other agents also use.
var clsactFilters = tcattach.Filters{Priority: 0x1ee8, Handle: 0xa6c}

// tcHooks are the SNAT program on the device's egress and the reverse
// program on its ingress, in attach order (the order of the link pins).
// p may be zero to name the hooks only (detach, status).
func tcHooks(ifindex int, p programs) []tcattach.Hook {
	egress, ingress := p.snat, p.unsnat
	return []tcattach.Hook{
		{Ifindex: ifindex, Dir: tcattach.Egress, Program: egress, Name: "ambpf_" + hostprobeProgProbeSnat},
		{Ifindex: ifindex, Dir: tcattach.Ingress, Program: ingress, Name: "ambpf_" + hostprobeProgProbeUnsnat},
	}
}

// clsactAttach adds (or atomically replaces) the two filters, creating the
// clsact qdisc when there is none and recording that in info. It must run
// inside the node netns.
func clsactAttach(info *hostprobeProbeInfo, ifindex int, p programs) error {
	created, err := tcattach.EnsureQdisc(ifindex)
	if err != nil {
		return err
	}
	if created {
		info.Setup |= setupQdisc
	}
	return clsactFilters.Replace(tcHooks(ifindex, p))
}

// clsactDetach deletes our filters, and the clsact qdisc when we created it
// and no other filter remains on it. It must run inside the node netns. A
// device that is gone, or whose ifindex now belongs to another device,
// has nothing of ours left.
func clsactDetach(info *hostprobeProbeInfo) error {
	ifindex := int(info.Ifindex)
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil || lk.Attrs().Name != bpffs.CString(info.Ifname[:]) {
		return nil
	}
	if err := clsactFilters.Delete(tcHooks(ifindex, programs{})); err != nil || info.Setup&setupQdisc == 0 {
		return err
	}
	gone, err := tcattach.RemoveQdiscIfUnused(ifindex)
	if gone {
		info.Setup &^= setupQdisc
	}
	return err
}

// clsactPresent counts our filters on the device. It must run inside the
// node netns.
func clsactPresent(ifindex int) (int, error) {
	present, err := clsactFilters.Present(tcHooks(ifindex, programs{}))
	return len(present), err
}
