//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nlretry"
)

// The policy rule and route Istio installs in every pod, reproduced with
// netlink: packets carrying the local-route mark are delivered locally.
const (
	localRouteTable = meshconst.LocalRouteTable
	localRulePref   = meshconst.LocalRoutePriority
)

// sysctls the datapath needs in the pod, in the order of pod_info.orig_sysctl.
// %s is the pod's interface.
//
//   - accept_local/rp_filter on the interface: outbound packets the egress
//     program sends back into ingress have the pod's own source address,
//     which the stack otherwise drops as martian.
//   - lo accept_local/route_localnet: captured DNS enters lo with the pod's
//     source and a 127.0.0.1 destination and no route attached yet.
//
// The per-device ones (dev set) are written through netlink (RTM_SETLINK,
// IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF), not /proc/sys: the container
// runtime mounts /proc/sys read-only in a non-privileged container, and
// netlink needs only CAP_NET_ADMIN. conf/all has no device and no netlink
// setter: it is written through /proc/sys, which a new network namespace
// makes unnecessary on most nodes (it inherits the node's conf/all, and
// rp_filter is 0 there by default).
var sysctls = [numSysctls]struct {
	path, want string
	// dev is the device the entry belongs to ("%s": the pod's
	// interface), empty for conf/all; devconf its IPV4_DEVCONF_* id.
	dev     string
	devconf uint16
}{
	{"net/ipv4/conf/%s/accept_local", "1", "%s", ipv4DevconfAcceptLocal},
	{"net/ipv4/conf/%s/rp_filter", "0", "%s", ipv4DevconfRPFilter},
	{"net/ipv4/conf/all/rp_filter", "0", "", 0},
	{"net/ipv4/conf/lo/accept_local", "1", "lo", ipv4DevconfAcceptLocal},
	{"net/ipv4/conf/lo/route_localnet", "1", "lo", ipv4DevconfRouteLocalnet},
	{"net/ipv4/conf/lo/rp_filter", "0", "lo", ipv4DevconfRPFilter},
}

const numSysctls = 6

// IPV4_DEVCONF_* of include/uapi/linux/ip.h (not in x/sys/unix).
const (
	ipv4DevconfRPFilter      = 8
	ipv4DevconfAcceptLocal   = 23
	ipv4DevconfRouteLocalnet = 26
)

func sysctlPath(tmpl, ifname string) string {
	if strings.Contains(tmpl, "%s") {
		tmpl = fmt.Sprintf(tmpl, ifname)
	}
	return "/proc/sys/" + tmpl
}

// writeSysctl sets sysctl i to v in the current network namespace:
// through netlink for a device's, through /proc/sys for conf/all.
func writeSysctl(i int, ifname string, v int) error {
	s := sysctls[i]
	if s.dev == "" {
		p := sysctlPath(s.path, ifname)
		if err := os.WriteFile(p, []byte(strconv.Itoa(v)), 0o644); err != nil {
			if errors.Is(err, unix.EROFS) {
				return fmt.Errorf("write sysctl %s: %w (/proc/sys is read-only in a non-privileged container; "+
					"set it on the node, whose value new network namespaces inherit, or run the agent privileged)", p, err)
			}
			return fmt.Errorf("write sysctl %s: %w", p, err)
		}
		return nil
	}
	dev := s.dev
	if dev == "%s" {
		dev = ifname
	}
	if err := setDevconf(dev, s.devconf, uint32(v)); err != nil {
		return fmt.Errorf("set %s=%d through netlink: %w", strings.ReplaceAll(strings.TrimPrefix(sysctlPath(s.path, ifname), "/proc/sys/"), "/", "."), v, err)
	}
	return nil
}

// setDevconf sets one IPv4 devconf value of a device with RTM_SETLINK
// (the kernel's inet_set_link_af), in the current network namespace.
func setDevconf(dev string, id uint16, v uint32) error {
	link, err := nlretry.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("find %s: %w", dev, err)
	}
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(link.Attrs().Index)
	req.AddData(msg)
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	conf := spec.AddRtAttr(unix.AF_INET, nil).AddRtAttr(unix.IFLA_INET_CONF, nil)
	conf.AddRtAttr(int(id), nl.Uint32Attr(v))
	req.AddData(spec)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return err
	}
	return nil
}

// setupNetns makes the pod's routing and sysctls ready for the programs and
// records in info what it changed. It must run inside the pod's netns. On
// error it undoes what it did.
func setupNetns(info *capturePodInfo, ifname string) (err error) {
	for i := range info.OrigSysctl {
		info.OrigSysctl[i] = -1
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, teardownNetns(info, ifname))
		}
	}()
	for i, s := range sysctls {
		p := sysctlPath(s.path, ifname)
		old, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("read sysctl %s: %w", p, err)
		}
		cur := strings.TrimSpace(string(old))
		if cur == s.want {
			continue
		}
		v, err := strconv.Atoi(cur)
		if err != nil {
			return fmt.Errorf("parse sysctl %s=%q: %w", p, cur, err)
		}
		want, _ := strconv.Atoi(s.want)
		if err := writeSysctl(i, ifname, want); err != nil {
			return err
		}
		info.OrigSysctl[i] = int8(v)
	}
	lo, err := netlink.LinkByIndex(1)
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	for _, fam := range []struct {
		family     int
		rule, rte  uint32
		everywhere *net.IPNet
	}{
		{unix.AF_INET, setupRule4, setupRoute4, &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}},
		{unix.AF_INET6, setupRule6, setupRoute6, &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}},
	} {
		added, err := ensureRule(fam.family)
		if err != nil {
			return err
		}
		if added {
			info.Setup |= fam.rule
		}
		added, err = ensureLocalRoute(lo.Attrs().Index, fam.family, fam.everywhere)
		if err != nil {
			return err
		}
		if added {
			info.Setup |= fam.rte
		}
	}
	return nil
}

const (
	setupRule4     = 1 << 0
	setupRule6     = 1 << 1
	setupRoute4    = 1 << 2
	setupRoute6    = 1 << 3
	setupQdiscEth  = 1 << 4
	setupQdiscLo   = 1 << 5
	localRouteMask = meshconst.MarkMask
)

func localRule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Mark = meshconst.LocalRouteMark
	mask := uint32(localRouteMask)
	r.Mask = &mask
	r.Priority = localRulePref
	r.Table = localRouteTable
	return r
}

// ensureRule adds the fwmark rule unless an identical one exists (for
// example from an earlier iptables-based setup); added tells which.
func ensureRule(family int) (added bool, err error) {
	rules, err := nlretry.RuleList(family)
	if err != nil {
		return false, fmt.Errorf("list rules: %w", err)
	}
	for _, r := range rules {
		if r.Mark == meshconst.LocalRouteMark && r.Table == localRouteTable && r.Priority == localRulePref {
			return false, nil
		}
	}
	if err := netlink.RuleAdd(localRule(family)); err != nil {
		return false, fmt.Errorf("add rule fwmark %#x lookup %d (family %d): %w", meshconst.LocalRouteMark, localRouteTable, family, err)
	}
	return true, nil
}

func localRoute(loIndex, family int, dst *net.IPNet) *netlink.Route {
	return &netlink.Route{
		LinkIndex: loIndex,
		Dst:       dst,
		Table:     localRouteTable,
		Type:      unix.RTN_LOCAL,
		Scope:     netlink.SCOPE_HOST,
		Family:    family,
	}
}

func ensureLocalRoute(loIndex, family int, dst *net.IPNet) (added bool, err error) {
	filter := &netlink.Route{Table: localRouteTable}
	routes, err := nlretry.RouteListFiltered(family, filter, netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("list table %d: %w", localRouteTable, err)
	}
	for _, r := range routes {
		if r.Type == unix.RTN_LOCAL && r.LinkIndex == loIndex && (r.Dst == nil || r.Dst.String() == dst.String()) {
			return false, nil
		}
	}
	if err := netlink.RouteAdd(localRoute(loIndex, family, dst)); err != nil {
		return false, fmt.Errorf("add local %s dev lo table %d: %w", dst, localRouteTable, err)
	}
	return true, nil
}

// teardownNetns undoes what setupNetns recorded in info. It must run inside
// the pod's netns.
func teardownNetns(info *capturePodInfo, ifname string) error {
	var errs []error
	if info.Setup&(setupRoute4|setupRoute6) != 0 {
		for _, fam := range []struct {
			bit    uint32
			family int
			dst    *net.IPNet
		}{
			{setupRoute4, unix.AF_INET, &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}},
			{setupRoute6, unix.AF_INET6, &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}},
		} {
			if info.Setup&fam.bit == 0 {
				continue
			}
			if err := netlink.RouteDel(localRoute(1, fam.family, fam.dst)); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("delete local route table %d: %w", localRouteTable, err))
			}
		}
	}
	for _, fam := range []struct {
		bit    uint32
		family int
	}{{setupRule4, unix.AF_INET}, {setupRule6, unix.AF_INET6}} {
		if info.Setup&fam.bit == 0 {
			continue
		}
		if err := netlink.RuleDel(localRule(fam.family)); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete rule fwmark %#x: %w", meshconst.LocalRouteMark, err))
		}
	}
	info.Setup &^= setupRule4 | setupRule6 | setupRoute4 | setupRoute6
	for i := range sysctls {
		if info.OrigSysctl[i] < 0 {
			continue
		}
		if err := writeSysctl(i, ifname, int(info.OrigSysctl[i])); err != nil {
			errs = append(errs, fmt.Errorf("restore: %w", err))
			continue
		}
		info.OrigSysctl[i] = -1
	}
	return errors.Join(errs...)
}
