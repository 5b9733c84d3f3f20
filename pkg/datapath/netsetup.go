//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"net"
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
//
// The paths are relative to sysctlConfDir.
var sysctls = [numSysctls]struct{ path, want string }{
	{"%s/accept_local", "1"},
	{"%s/rp_filter", "0"},
	{"all/rp_filter", "0"},
	{"lo/accept_local", "1"},
	{"lo/route_localnet", "1"},
	{"lo/rp_filter", "0"},
}

const numSysctls = 6

const sysctlConfDir = "/proc/sys/net/ipv4/conf"

// sysctlRel is the sysctl's path relative to sysctlConfDir.
func sysctlRel(tmpl, ifname string) string {
	if strings.Contains(tmpl, "%s") {
		tmpl = fmt.Sprintf(tmpl, ifname)
	}
	return tmpl
}

// sysctlConf is sysctlConfDir of the calling thread's netns, opened once
// so the sysctls below it are opened relative to it. That saves the
// kernel a lookup of every path component, and the lookup of the
// per-namespace sysctl directories grows with the namespaces on the node:
// with a few hundred pods a file opened by its full path cost about
// 0.1 ms, a tenth of an enrolment (docs/BENCHMARKS.md).
type sysctlConf struct{ fd int }

// openSysctlConf opens sysctlConfDir; the caller is in the pod's netns.
func openSysctlConf() (sysctlConf, error) {
	fd, err := unix.Open(sysctlConfDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return sysctlConf{}, fmt.Errorf("open %s: %w", sysctlConfDir, err)
	}
	return sysctlConf{fd}, nil
}

func (c sysctlConf) Close() { unix.Close(c.fd) }

// set writes want to the sysctl at rel unless it holds that already, and
// returns the value it held (changed tells whether it wrote).
func (c sysctlConf) set(rel, want string) (old int, changed bool, err error) {
	fd, err := unix.Openat(c.fd, rel, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, false, fmt.Errorf("open sysctl %s/%s: %w", sysctlConfDir, rel, err)
	}
	defer unix.Close(fd)
	var buf [32]byte
	n, err := unix.Read(fd, buf[:])
	if err != nil {
		return 0, false, fmt.Errorf("read sysctl %s/%s: %w", sysctlConfDir, rel, err)
	}
	cur := strings.TrimSpace(string(buf[:max(n, 0)]))
	if cur == want {
		return 0, false, nil
	}
	v, err := strconv.Atoi(cur)
	if err != nil {
		return 0, false, fmt.Errorf("parse sysctl %s/%s=%q: %w", sysctlConfDir, rel, cur, err)
	}
	if err := c.write(fd, rel, want); err != nil {
		return 0, false, err
	}
	return v, true, nil
}

// write writes v at the start of the open sysctl fd (named rel in errors).
func (c sysctlConf) write(fd int, rel, v string) error {
	if _, err := unix.Pwrite(fd, []byte(v), 0); err != nil {
		return fmt.Errorf("write sysctl %s/%s: %w", sysctlConfDir, rel, err)
	}
	return nil
}

// restore writes v to the sysctl at rel.
func (c sysctlConf) restore(rel, v string) error {
	fd, err := unix.Openat(c.fd, rel, unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open sysctl %s/%s: %w", sysctlConfDir, rel, err)
	}
	defer unix.Close(fd)
	return c.write(fd, rel, v)
}

// setupNetns makes the pod's routing and sysctls ready for the programs and
// records in info what it changed. It must run inside the pod's netns, nl
// being a netlink handle of that netns. On error it undoes what it did.
func setupNetns(nl *netlink.Handle, info *capturePodInfo, ifname string) (err error) {
	for i := range info.OrigSysctl {
		info.OrigSysctl[i] = -1
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, teardownNetns(nl, info, ifname))
		}
	}()
	conf, err := openSysctlConf()
	if err != nil {
		return err
	}
	defer conf.Close()
	for i, s := range sysctls {
		old, changed, err := conf.set(sysctlRel(s.path, ifname), s.want)
		if err != nil {
			return err
		}
		if changed {
			info.OrigSysctl[i] = int8(old)
		}
	}
	for _, fam := range []struct {
		family     int
		rule, rte  uint32
		everywhere *net.IPNet
	}{
		{unix.AF_INET, setupRule4, setupRoute4, &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}},
		{unix.AF_INET6, setupRule6, setupRoute6, &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}},
	} {
		added, err := ensureRule(nl, fam.family)
		if err != nil {
			return err
		}
		if added {
			info.Setup |= fam.rule
		}
		added, err = ensureLocalRoute(nl, fam.family, fam.everywhere)
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
func ensureRule(nl *netlink.Handle, family int) (added bool, err error) {
	rules, err := nlretry.On(nl).RuleList(family)
	if err != nil {
		return false, fmt.Errorf("list rules: %w", err)
	}
	for _, r := range rules {
		if r.Mark == meshconst.LocalRouteMark && r.Table == localRouteTable && r.Priority == localRulePref {
			return false, nil
		}
	}
	if err := nl.RuleAdd(localRule(family)); err != nil {
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

func ensureLocalRoute(nl *netlink.Handle, family int, dst *net.IPNet) (added bool, err error) {
	filter := &netlink.Route{Table: localRouteTable}
	routes, err := nlretry.On(nl).RouteListFiltered(family, filter, netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("list table %d: %w", localRouteTable, err)
	}
	for _, r := range routes {
		if r.Type == unix.RTN_LOCAL && r.LinkIndex == loopbackIndex && (r.Dst == nil || r.Dst.String() == dst.String()) {
			return false, nil
		}
	}
	if err := nl.RouteAdd(localRoute(loopbackIndex, family, dst)); err != nil {
		return false, fmt.Errorf("add local %s dev lo table %d: %w", dst, localRouteTable, err)
	}
	return true, nil
}

// teardownNetns undoes what setupNetns recorded in info. It must run inside
// the pod's netns, nl being a netlink handle of that netns.
func teardownNetns(nl *netlink.Handle, info *capturePodInfo, ifname string) error {
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
			if err := nl.RouteDel(localRoute(loopbackIndex, fam.family, fam.dst)); err != nil && !errors.Is(err, unix.ESRCH) {
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
		if err := nl.RuleDel(localRule(fam.family)); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete rule fwmark %#x: %w", meshconst.LocalRouteMark, err))
		}
	}
	info.Setup &^= setupRule4 | setupRule6 | setupRoute4 | setupRoute6
	if !hasSysctls(info) {
		return errors.Join(errs...)
	}
	conf, err := openSysctlConf()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer conf.Close()
	for i, s := range sysctls {
		if info.OrigSysctl[i] < 0 {
			continue
		}
		if err := conf.restore(sysctlRel(s.path, ifname), strconv.Itoa(int(info.OrigSysctl[i]))); err != nil {
			errs = append(errs, fmt.Errorf("restore: %w", err))
			continue
		}
		info.OrigSysctl[i] = -1
	}
	return errors.Join(errs...)
}
