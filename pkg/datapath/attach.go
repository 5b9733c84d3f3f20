//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// loopbackIndex is lo's ifindex in every network namespace.
const loopbackIndex = 1

// clsactFilters is the datapath's private clsact priority and handle.
var clsactFilters = tcattach.Filters{Priority: 0x1ee7, Handle: 0xa6b}

// tcHooks are the three TC programs in attach order: eth ingress, eth
// egress, lo egress. o may be nil to name the hooks only (detach, status).
func tcHooks(ifindex int, o *objects) []tcattach.Hook {
	var ingress, egress, lo *ebpf.Program
	if o != nil {
		ingress, egress, lo = o.CaptureIngress, o.CaptureEgress, o.DnsReply
	}
	return []tcattach.Hook{
		{Ifindex: ifindex, Dir: tcattach.Ingress, Program: ingress, Name: "ambpf_" + captureProgCaptureIngress},
		{Ifindex: ifindex, Dir: tcattach.Egress, Program: egress, Name: "ambpf_" + captureProgCaptureEgress},
		{Ifindex: loopbackIndex, Dir: tcattach.Egress, Program: lo, Name: "ambpf_" + captureProgDnsReply},
	}
}

// ownedQdisc pairs a device with the pod_info.setup bit recording that the
// loader created its clsact qdisc (and so may delete it).
type ownedQdisc struct {
	ifindex int
	bit     uint32
}

func ownedQdiscs(ifindex int) []ownedQdisc {
	return []ownedQdisc{{ifindex, setupQdiscEth}, {loopbackIndex, setupQdiscLo}}
}

// clsactAttach adds (or atomically replaces) the three filters, creating
// clsact qdiscs where there are none and recording that in info. It must
// run inside the pod's netns.
func clsactAttach(info *capturePodInfo, ifindex int, o *objects) error {
	for _, q := range ownedQdiscs(ifindex) {
		created, err := tcattach.EnsureQdisc(q.ifindex)
		if err != nil {
			return err
		}
		if created {
			info.Setup |= q.bit
		}
	}
	return clsactFilters.Replace(tcHooks(ifindex, o))
}

// clsactDetach deletes our filters and the clsact qdiscs we created (only
// if nobody else's filters remain on them). It must run in the pod netns.
func clsactDetach(info *capturePodInfo) error {
	errs := []error{clsactFilters.Delete(tcHooks(int(info.Ifindex), nil))}
	for _, q := range ownedQdiscs(int(info.Ifindex)) {
		if info.Setup&q.bit == 0 {
			continue
		}
		gone, err := tcattach.RemoveQdiscIfUnused(q.ifindex)
		errs = append(errs, err)
		if gone {
			info.Setup &^= q.bit
		}
	}
	return errors.Join(errs...)
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
	open := func(path string) *netns.NS {
		var st unix.Stat_t
		if unix.Stat(path, &st) != nil || st.Dev != id.Dev || st.Ino != id.Ino {
			return nil
		}
		ns, _ := netns.Open(path)
		return ns
	}
	// Named namespaces first: a few entries, and where pods usually are;
	// /proc (every process) only when none matches.
	for _, dir := range []string{"/run/netns", "/var/run/netns", "/proc"} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			path := filepath.Join(dir, e.Name())
			if dir == "/proc" {
				if _, err := strconv.Atoi(e.Name()); err != nil {
					continue
				}
				path = filepath.Join(path, "ns", "net")
			}
			if ns := open(path); ns != nil {
				return ns, nil
			}
		}
	}
	return nil, fmt.Errorf("netns dev=%d ino=%d: %w", id.Dev, id.Ino, errNetnsGone)
}
