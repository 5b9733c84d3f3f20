//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/pinset"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// loopbackIndex is lo's ifindex in every network namespace.
const loopbackIndex = pinset.LoopbackIfindex

// hooks is the datapath's hook table: a pod's three TC entry programs in
// attach order (eth0 ingress, eth0 egress, lo egress), with their tcx link
// pins in the pod's directory, and the datapath's private clsact priority
// and handle.
var hooks = pinset.Table{
	Hooks: []pinset.Hook{
		{Program: podentryProgEntryIngress, Dir: tcattach.Ingress, LinkPin: "link_tc_ingress"},
		{Program: podentryProgEntryEgress, Dir: tcattach.Egress, LinkPin: "link_tc_egress"},
		{Program: podentryProgEntryLoEgress, Dir: tcattach.Egress, Loopback: true, LinkPin: "link_tc_lo_egress"},
	},
	Filters: tcattach.Filters{Priority: 0x1ee7, Handle: 0xa6b},
}

// ownedQdisc pairs a device with the pod_info.setup bit recording that the
// loader created its clsact qdisc (and so may delete it).
type ownedQdisc struct {
	ifindex int
	bit     capturePodSetup
}

func ownedQdiscs(ifindex int) []ownedQdisc {
	return []ownedQdisc{{ifindex, setupQdiscEth}, {loopbackIndex, setupQdiscLo}}
}

// clsactAttach adds (or atomically replaces) the three filters, creating
// clsact qdiscs where there are none and recording that in info. tc's
// handle must be of the pod's netns.
func clsactAttach(tc tcattach.TC, info *capturePodInfo, ifindex int, e *entry) error {
	for _, q := range ownedQdiscs(ifindex) {
		created, err := tc.EnsureQdisc(q.ifindex)
		if err != nil {
			return err
		}
		if created {
			info.Setup |= q.bit
		}
	}
	_, err := hooks.Attach(tc, ModeClsact, ifindex, e.get)
	return err
}

// clsactDetach deletes our filters and the clsact qdiscs we created (only
// if nobody else's filters remain on them). tc's handle must be of the
// pod's netns.
func clsactDetach(tc tcattach.TC, info *capturePodInfo) error {
	errs := []error{hooks.DeleteFilters(tc, int(info.Ifindex))}
	for _, q := range ownedQdiscs(int(info.Ifindex)) {
		if info.Setup&q.bit == 0 {
			continue
		}
		gone, err := tc.RemoveQdiscIfUnused(q.ifindex)
		errs = append(errs, err)
		if gone {
			info.Setup &^= q.bit
		}
	}
	return errors.Join(errs...)
}

// Direct flow lifetimes, as bpf/capture.c has them (DIRECT_IDLE_NS).
const directIdle = 24 * time.Hour

// Origins of a direct_flows entry (DIRECT_* in bpf/include/ambpf.h).
const (
	directAttached = 1
	directInbound  = 2
)

// monotonicNow is the clock of bpf_ktime_get_ns (CLOCK_MONOTONIC), which
// direct_flows expiry times are on.
func monotonicNow() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic(fmt.Sprintf("clock_gettime(CLOCK_MONOTONIC): %v", err)) // cannot fail on Linux
	}
	return uint64(ts.Nano())
}

// recordPreexisting stores every TCP flow open in the pod at idx (the
// caller is in its netns) so its packets keep flowing directly instead of
// being taken for packets of a proxy flow that does not exist, and returns
// how many it stored. The flows expire like any direct flow
// (bpf/capture.c). A pod with more open flows than its share of the map
// (max) or the map holds keeps the first ones; the rest are dropped from
// then on, as iptables resets them (logged, not an error: the pod is still
// enrolled).
func recordPreexisting(m *ebpf.Map, idx, max uint32, log *slog.Logger) (int, error) {
	// A pod enrolled at creation (CNI ADD) has no socket yet. The dump
	// below walks the kernel's whole TCP hash, which every namespace
	// shares (about 5 ms of CPU here however few sockets the pod has), so
	// it is skipped when the namespace's own count says there is nothing.
	if n, err := tcpSocketsInUse(); err == nil && n == 0 {
		return 0, nil
	}
	expires := monotonicNow() + uint64(directIdle)
	left, stored := 0, 0
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := netlink.SocketDiagTCP(family)
		if err != nil {
			return stored, fmt.Errorf("list open TCP sockets: %w", err)
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
			f.Pod = idx
			if stored >= int(max) {
				left++
				continue
			}
			err := m.Update(f, captureDirectFlow{ExpiresNs: expires, Origin: directAttached}, ebpf.UpdateNoExist)
			if errors.Is(err, unix.E2BIG) {
				left++
				continue
			}
			if errors.Is(err, ebpf.ErrKeyExist) {
				continue // listed twice (v4-mapped)
			}
			if err != nil {
				return stored, fmt.Errorf("record open flow %s -> %s: %w", local, remote, err)
			}
			stored++
		}
	}
	if left > 0 {
		log.Warn("direct_flows full (the node's, or the pod's share): open flows not recorded, their packets will be dropped", "flows", left)
	}
	return stored, nil
}

// tcpSocketsInUse is the number of TCP sockets (v4 and v6, any state but
// TIME_WAIT) in the calling thread's network namespace, from the kernel's
// per-namespace counters in sockstat.
func tcpSocketsInUse() (int, error) {
	total := 0
	for _, f := range []struct{ path, label string }{
		{"/proc/thread-self/net/sockstat", "TCP:"}, {"/proc/thread-self/net/sockstat6", "TCP6:"},
	} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			return 0, err
		}
		n, err := sockstatInUse(string(b), f.label)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", f.path, err)
		}
		total += n
	}
	return total, nil
}

// sockstatInUse reads the "inuse" count of the line starting with label.
func sockstatInUse(sockstat, label string) (int, error) {
	for _, line := range strings.Split(sockstat, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != label {
			continue
		}
		for i := 1; i+1 < len(f); i += 2 {
			if f[i] == "inuse" {
				return strconv.Atoi(f[i+1])
			}
		}
	}
	return 0, fmt.Errorf("no %s inuse count", label)
}

// ExpireFlows deletes the pod's direct_flows entries that are past their
// expiry: flows that ended without a FIN or RST the programs saw. The
// programs ignore such entries already; sweeping them keeps the map from
// filling up, so new bypassed inbound flows can still be recorded. Verify
// sweeps every pod's. It returns how many it deleted.
func (l *Loader) ExpireFlows(uid string) (int, error) {
	if !uidPattern.MatchString(uid) {
		return 0, fmt.Errorf("%w: %q", ErrBadUID, uid)
	}
	pl, err := l.lockAttached(uid)
	if err != nil {
		return 0, fmt.Errorf("expire flows: %w", err)
	}
	defer pl.Unlock(false)
	rec, err := l.record(l.PodDir(uid))
	if err != nil {
		return 0, fmt.Errorf("expire flows of %s: %w", uid, err)
	}
	n, err := l.openNode()
	if err != nil {
		return 0, fmt.Errorf("expire flows of %s: %w", uid, err)
	}
	defer n.Close()
	return n.expirePod(rec.index, monotonicNow())
}

// expirePod deletes the expired direct flows of the pod at idx and takes
// them off its count. The caller holds the pod's lock (the count's
// loader part, config.direct_adjust, has no other writer).
func (n *nodeMaps) expirePod(idx uint32, now uint64) (int, error) {
	deleted, err := expireFlows(n.flows, now, func(f *captureFlow) bool { return f.Pod == idx })
	if deleted > 0 {
		if aerr := n.adjustDirect(idx, -int64(deleted)); aerr != nil {
			err = errors.Join(err, aerr)
		}
	}
	return deleted, err
}

// adjustDirect adds delta to the loader's part of the pod's direct_flows
// count. The caller holds the pod's lock.
func (n *nodeMaps) adjustDirect(idx uint32, delta int64) error {
	var cfg captureConfig
	if err := n.config.Lookup(idx, &cfg); err != nil {
		return fmt.Errorf("read pod_config[%d]: %w", idx, err)
	}
	cfg.DirectAdjust += delta
	if err := n.config.Put(idx, cfg); err != nil {
		return fmt.Errorf("write pod_config[%d]: %w", idx, err)
	}
	return nil
}

// expireFlows deletes the entries of the direct_flows map m past their
// expiry at now, of the flows match selects (all when nil), and returns
// how many it deleted (entries the programs deleted first do not count).
func expireFlows(m *ebpf.Map, now uint64, match func(*captureFlow) bool) (int, error) {
	var (
		f       captureFlow
		v       captureDirectFlow
		expired []captureFlow
	)
	it := m.Iterate()
	for it.Next(&f, &v) {
		if v.ExpiresNs < now && (match == nil || match(&f)) {
			expired = append(expired, f)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("read direct_flows: %w", err)
	}
	n := 0
	for _, f := range expired {
		err := m.Delete(f)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue // deleted meanwhile by the programs, which counted it
		}
		if err != nil {
			return n, fmt.Errorf("delete expired flow: %w", err)
		}
		n++
	}
	return n, nil
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

// rememberNetns notes where the namespace of a pod this process attached
// was opened from, so finding it again (detach, status, upgrade) is one
// stat instead of a walk over every named namespace and process. Only a
// hint: findNetns checks the identity before using it.
func (l *Loader) rememberNetns(id netns.ID, ns *netns.NS) {
	path := ns.File().Name()
	if !filepath.IsAbs(path) || strings.HasPrefix(path, "/proc/self/") || strings.HasPrefix(path, "/proc/thread-self/") {
		return // a name that means another namespace from elsewhere
	}
	l.nsPaths.Store(id, path)
}

// findNetns opens the network namespace with the given identity, looking
// first where this process last opened it (rememberNetns), then in the
// places namespaces are kept: named netns mounts and the processes
// holding one. errNetnsGone when none matches.
func (l *Loader) findNetns(id netns.ID) (*netns.NS, error) {
	open := func(path string) *netns.NS {
		var st unix.Stat_t
		if unix.Stat(path, &st) != nil || st.Dev != id.Dev || st.Ino != id.Ino {
			return nil
		}
		ns, _ := netns.Open(path)
		return ns
	}
	if hint, ok := l.nsPaths.Load(id); ok {
		if ns := open(hint.(string)); ns != nil {
			return ns, nil
		}
		l.nsPaths.Delete(id)
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

// inNetns runs fn inside ns with a netlink handle of ns, made once for all
// of fn's requests (see tcattach.TC). The handle is closed when inNetns
// returns.
func inNetns(ns *netns.NS, fn func(nl *netlink.Handle) error) error {
	return ns.Do(func() error {
		nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("netlink socket in the pod's netns: %w", err)
		}
		defer nl.Close()
		return fn(nl)
	})
}
