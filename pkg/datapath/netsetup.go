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
var sysctls = [numSysctls]struct{ path, want string }{
	{"net/ipv4/conf/%s/accept_local", "1"},
	{"net/ipv4/conf/%s/rp_filter", "0"},
	{"net/ipv4/conf/all/rp_filter", "0"},
	{"net/ipv4/conf/lo/accept_local", "1"},
	{"net/ipv4/conf/lo/route_localnet", "1"},
	{"net/ipv4/conf/lo/rp_filter", "0"},
}

const numSysctls = 6

func sysctlPath(tmpl, ifname string) string {
	if strings.Contains(tmpl, "%s") {
		tmpl = fmt.Sprintf(tmpl, ifname)
	}
	return "/proc/sys/" + tmpl
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
		if err := os.WriteFile(p, []byte(s.want), 0o644); err != nil {
			return fmt.Errorf("write sysctl %s: %w", p, err)
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
	for i, s := range sysctls {
		if info.OrigSysctl[i] < 0 {
			continue
		}
		p := sysctlPath(s.path, ifname)
		if err := os.WriteFile(p, []byte(strconv.Itoa(int(info.OrigSysctl[i]))), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore sysctl %s: %w", p, err))
			continue
		}
		info.OrigSysctl[i] = -1
	}
	return errors.Join(errs...)
}
