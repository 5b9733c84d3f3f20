//go:build linux

package probesnat

import (
	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/pinset"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// hooks is the family's hook table: the SNAT program on the device's
// egress and the reverse program on its ingress, in attach order. Its
// clsact filters have a private priority and handle, distinct from
// pkg/datapath's, so they never collide with (or remove) anyone else's on
// a node device, which CNIs and other agents also use. The node directory
// pins the programs under the table's program pins.
var hooks = pinset.Table{
	Hooks: []pinset.Hook{
		{Program: hostprobeProgProbeSnat, Dir: tcattach.Egress, LinkPin: "link_tc_egress"},
		{Program: hostprobeProgProbeUnsnat, Dir: tcattach.Ingress, LinkPin: "link_tc_ingress"},
	},
	Filters: tcattach.Filters{Priority: 0x1ee8, Handle: 0xa6c},
}

// programs are the shared programs, by name in the object.
type programs map[string]*ebpf.Program

func (p programs) get(name string) *ebpf.Program { return p[name] }

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
	_, err = hooks.Attach(tcattach.On(nil), tcattach.ModeClsact, ifindex, p.get)
	return err
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
	if err := hooks.DeleteFilters(tcattach.On(nil), ifindex); err != nil || info.Setup&setupQdisc == 0 {
		return err
	}
	gone, err := tcattach.RemoveQdiscIfUnused(ifindex)
	if gone {
		info.Setup &^= setupQdisc
	}
	return err
}
