//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/netns"
)

// loopbackIndex is lo's ifindex in every network namespace.
const loopbackIndex = 1

// clsact filters use a private priority and handle so they never collide
// with (or remove) anyone else's filters on the same device.
const (
	clsactPriority = 0x1ee7
	clsactHandle   = 0xa6b
)

func interfaceIndex(name string) (int, error) {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return 0, fmt.Errorf("find interface %s in pod: %w", name, err)
	}
	return ifc.Index, nil
}

// tcxAttach attaches the three TC programs as tcx links, in the order
// ingress, egress, lo egress. It must run inside the pod's netns (ifindexes
// are resolved there). On error it returns the links made so far for the
// caller to close.
func tcxAttach(ifindex int, o *objects) ([]link.Link, error) {
	var links []link.Link
	for _, a := range []struct {
		ifindex int
		prog    *ebpf.Program
		attach  ebpf.AttachType
		what    string
	}{
		{ifindex, o.CaptureIngress, ebpf.AttachTCXIngress, "ingress"},
		{ifindex, o.CaptureEgress, ebpf.AttachTCXEgress, "egress"},
		{loopbackIndex, o.DnsReply, ebpf.AttachTCXEgress, "lo egress"},
	} {
		lk, err := link.AttachTCX(link.TCXOptions{Interface: a.ifindex, Program: a.prog, Attach: a.attach})
		if err != nil {
			return links, fmt.Errorf("attach tcx %s (ifindex %d): %w", a.what, a.ifindex, err)
		}
		links = append(links, lk)
	}
	return links, nil
}

type clsactSlot struct {
	ifindex int
	parent  uint32
	prog    *ebpf.Program
	name    string
}

func clsactSlots(ifindex int, o *objects) []clsactSlot {
	var ingress, egress, lo *ebpf.Program
	if o != nil {
		ingress, egress, lo = o.CaptureIngress, o.CaptureEgress, o.DnsReply
	}
	return []clsactSlot{
		{ifindex, netlink.HANDLE_MIN_INGRESS, ingress, "ambpf_" + captureProgCaptureIngress},
		{ifindex, netlink.HANDLE_MIN_EGRESS, egress, "ambpf_" + captureProgCaptureEgress},
		{loopbackIndex, netlink.HANDLE_MIN_EGRESS, lo, "ambpf_" + captureProgDnsReply},
	}
}

func clsactFilter(s clsactSlot) *netlink.BpfFilter {
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: s.ifindex,
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

// clsactAttach adds (or atomically replaces) the three filters, creating
// clsact qdiscs where there are none and recording that in info. It must
// run inside the pod's netns.
func clsactAttach(info *capturePodInfo, ifindex int, o *objects) error {
	for _, q := range []struct {
		ifindex int
		bit     uint32
	}{{ifindex, setupQdiscEth}, {loopbackIndex, setupQdiscLo}} {
		created, err := ensureClsact(q.ifindex)
		if err != nil {
			return err
		}
		if created {
			info.Setup |= q.bit
		}
	}
	for _, s := range clsactSlots(ifindex, o) {
		if err := netlink.FilterReplace(clsactFilter(s)); err != nil {
			return fmt.Errorf("add clsact filter %s (ifindex %d): %w", s.name, s.ifindex, err)
		}
	}
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

func ensureClsact(ifindex int) (created bool, err error) {
	q, err := findClsact(ifindex)
	if err != nil || q != nil {
		return false, err
	}
	err = netlink.QdiscAdd(&netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	})
	if err != nil {
		return false, fmt.Errorf("add clsact qdisc (ifindex %d): %w", ifindex, err)
	}
	return true, nil
}

// clsactDetach deletes our filters and the clsact qdiscs we created (only
// if nobody else's filters remain on them). It must run in the pod netns.
func clsactDetach(info *capturePodInfo) error {
	var errs []error
	for _, s := range clsactSlots(int(info.Ifindex), nil) {
		err := netlink.FilterDel(clsactFilter(s))
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete clsact filter %s: %w", s.name, err))
		}
	}
	for _, q := range []struct {
		ifindex int
		bit     uint32
	}{{int(info.Ifindex), setupQdiscEth}, {loopbackIndex, setupQdiscLo}} {
		if info.Setup&q.bit == 0 {
			continue
		}
		if busy, err := hasFilters(q.ifindex); err != nil || busy {
			errs = append(errs, err)
			continue
		}
		qd, err := findClsact(q.ifindex)
		if err == nil && qd != nil {
			err = netlink.QdiscDel(qd)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("delete clsact qdisc (ifindex %d): %w", q.ifindex, err))
			continue
		}
		info.Setup &^= q.bit
	}
	return errors.Join(errs...)
}

func hasFilters(ifindex int) (bool, error) {
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return false, fmt.Errorf("find link %d: %w", ifindex, err)
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := netlink.FilterList(lk, parent)
		if err != nil {
			return false, fmt.Errorf("list filters of %s: %w", lk.Attrs().Name, err)
		}
		if len(fs) > 0 {
			return true, nil
		}
	}
	return false, nil
}

// clsactAttached reports which of our filters are present, with the ID of
// the program each runs. It must run in the pod netns.
func clsactAttached(info *capturePodInfo) (map[string]uint32, error) {
	out := map[string]uint32{}
	for _, s := range clsactSlots(int(info.Ifindex), nil) {
		lk, err := netlink.LinkByIndex(s.ifindex)
		if err != nil {
			return nil, fmt.Errorf("find link %d: %w", s.ifindex, err)
		}
		fs, err := netlink.FilterList(lk, s.parent)
		if err != nil {
			return nil, fmt.Errorf("list filters: %w", err)
		}
		for _, f := range fs {
			a := f.Attrs()
			bf, ok := f.(*netlink.BpfFilter)
			if ok && a.Priority == clsactPriority && a.Handle == clsactHandle {
				out[s.name] = uint32(bf.Id)
			}
		}
	}
	return out, nil
}

// recordPreexisting stores every TCP flow open in the pod (the caller is in
// its netns) so its packets keep flowing directly instead of being taken
// for packets of a proxy flow that does not exist.
func recordPreexisting(m *ebpf.Map) error {
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := netlink.SocketDiagTCP(family)
		if err != nil {
			return fmt.Errorf("list open TCP sockets: %w", err)
		}
		for _, s := range socks {
			switch s.State {
			case tcpListen, tcpClose, tcpTimeWait:
				continue
			}
			local, ok1 := netip.AddrFromSlice(s.ID.Source)
			remote, ok2 := netip.AddrFromSlice(s.ID.Destination)
			if !ok1 || !ok2 {
				continue
			}
			f := flowKey(local.Unmap(), s.ID.SourcePort, remote.Unmap(), s.ID.DestinationPort)
			if err := m.Put(f, uint64(1)); err != nil {
				return fmt.Errorf("record open flow %s -> %s: %w", local, remote, err)
			}
		}
	}
	return nil
}

// TCP states from include/net/tcp_states.h.
const (
	tcpTimeWait = 6
	tcpClose    = 7
	tcpListen   = 10
)

func addrBytes(a netip.Addr) captureAddr {
	var out captureAddr
	if a.Is4() {
		b := a.As4()
		copy(out.B[:], b[:])
	} else {
		b := a.As16()
		copy(out.B[:], b[:])
	}
	return out
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func flowKey(local netip.Addr, lport uint16, remote netip.Addr, rport uint16) captureFlow {
	fam := uint8(unix.AF_INET6)
	if local.Is4() {
		fam = unix.AF_INET
	}
	return captureFlow{
		Local: addrBytes(local), Remote: addrBytes(remote),
		LocalPort: htons(lport), RemotePort: htons(rport), Family: fam,
	}
}

var errNetnsGone = errors.New("network namespace gone")

// findNetns opens the network namespace with the given identity, looking
// in the places namespaces are kept: named netns mounts and the processes
// holding one. errNetnsGone when none matches.
func findNetns(id netns.ID) (*netns.NS, error) {
	var candidates []string
	for _, dir := range []string{"/run/netns", "/var/run/netns"} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			candidates = append(candidates, filepath.Join(dir, e.Name()))
		}
	}
	procs, _ := os.ReadDir("/proc")
	for _, e := range procs {
		if _, err := strconv.Atoi(e.Name()); err == nil {
			candidates = append(candidates, filepath.Join("/proc", e.Name(), "ns", "net"))
		}
	}
	for _, c := range candidates {
		var st unix.Stat_t
		if unix.Stat(c, &st) != nil || st.Dev != id.Dev || st.Ino != id.Ino {
			continue
		}
		if ns, err := netns.Open(c); err == nil {
			return ns, nil
		}
	}
	return nil, fmt.Errorf("netns dev=%d ino=%d: %w", id.Dev, id.Ino, errNetnsGone)
}
