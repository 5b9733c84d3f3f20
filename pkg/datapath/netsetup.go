//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"net"
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
// The paths are relative to sysctlConfDir. They are read there, and the
// per-device ones (dev set) are written through netlink (RTM_SETLINK,
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
	{"%s/accept_local", "1", "%s", ipv4DevconfAcceptLocal},
	{"%s/rp_filter", "0", "%s", ipv4DevconfRPFilter},
	{"all/rp_filter", "0", "", 0},
	{"lo/accept_local", "1", "lo", ipv4DevconfAcceptLocal},
	{"lo/route_localnet", "1", "lo", ipv4DevconfRouteLocalnet},
	{"lo/rp_filter", "0", "lo", ipv4DevconfRPFilter},
}

// IPV4_DEVCONF_* of include/uapi/linux/ip.h (not in x/sys/unix).
const (
	ipv4DevconfRPFilter      = 8
	ipv4DevconfAcceptLocal   = 23
	ipv4DevconfRouteLocalnet = 26
)

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

// get reads the sysctl at rel. Reading works where /proc/sys is mounted
// read-only.
func (c sysctlConf) get(rel string) (string, error) {
	fd, err := unix.Openat(c.fd, rel, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open sysctl %s/%s: %w", sysctlConfDir, rel, err)
	}
	defer unix.Close(fd)
	var buf [32]byte
	n, err := unix.Read(fd, buf[:])
	if err != nil {
		return "", fmt.Errorf("read sysctl %s/%s: %w", sysctlConfDir, rel, err)
	}
	return strings.TrimSpace(string(buf[:max(n, 0)])), nil
}

// put writes v to the sysctl at rel through /proc/sys.
func (c sysctlConf) put(rel, v string) error {
	fd, err := unix.Openat(c.fd, rel, unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err == nil {
		_, err = unix.Pwrite(fd, []byte(v), 0)
		unix.Close(fd)
	}
	if errors.Is(err, unix.EROFS) {
		return fmt.Errorf("write sysctl %s/%s: %w (/proc/sys is read-only in a non-privileged container; "+
			"set it on the node, whose value new network namespaces inherit, or run the agent privileged)", sysctlConfDir, rel, err)
	}
	if err != nil {
		return fmt.Errorf("write sysctl %s/%s: %w", sysctlConfDir, rel, err)
	}
	return nil
}

// writeSysctl sets sysctl i to v in the namespace of h and conf: through
// netlink for a device's, through /proc/sys for conf/all.
func writeSysctl(h *netlink.Handle, conf sysctlConf, i int, ifname string, v int) error {
	s := sysctls[i]
	rel := sysctlRel(s.path, ifname)
	if s.dev == "" {
		return conf.put(rel, strconv.Itoa(v))
	}
	dev := s.dev
	if dev == "%s" {
		dev = ifname
	}
	if err := setDevconf(h, dev, s.devconf, uint32(v)); err != nil {
		return fmt.Errorf("set net.ipv4.conf.%s=%d through netlink: %w", strings.ReplaceAll(rel, "/", "."), v, err)
	}
	return nil
}

// setDevconf sets one IPv4 devconf value of a device with RTM_SETLINK
// (the kernel's inet_set_link_af) in the namespace of h.
func setDevconf(h *netlink.Handle, dev string, id uint16, v uint32) error {
	link, err := h.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("find %s: %w", dev, err)
	}
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(link.Attrs().Index)
	req.AddData(msg)
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	spec.AddRtAttr(unix.AF_INET, nil).AddRtAttr(unix.IFLA_INET_CONF, nil).AddRtAttr(int(id), nl.Uint32Attr(v))
	req.AddData(spec)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return err
	}
	return nil
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
		rel := sysctlRel(s.path, ifname)
		cur, err := conf.get(rel)
		if err != nil {
			return err
		}
		if cur == s.want {
			continue
		}
		old, err := strconv.Atoi(cur)
		if err != nil {
			return fmt.Errorf("parse sysctl %s/%s=%q: %w", sysctlConfDir, rel, cur, err)
		}
		want, _ := strconv.Atoi(s.want)
		if err := writeSysctl(nl, conf, i, ifname, want); err != nil {
			return err
		}
		info.OrigSysctl[i] = int8(old)
	}
	for _, fam := range []struct {
		family     int
		rule, rte  capturePodSetup
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

// What the loader changed in a pod, the bits of pod_info.setup (enum
// pod_setup in bpf/include/ambpf.h; the values come from bpf2go).
const (
	setupRule4    = capturePodSetupSETUP_RULE4
	setupRule6    = capturePodSetupSETUP_RULE6
	setupRoute4   = capturePodSetupSETUP_ROUTE4
	setupRoute6   = capturePodSetupSETUP_ROUTE6
	setupQdiscEth = capturePodSetupSETUP_QDISC_ETH
	setupQdiscLo  = capturePodSetupSETUP_QDISC_LO
)

const localRouteMask = meshconst.MarkMask

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
			bit    capturePodSetup
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
		bit    capturePodSetup
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
	for i := range sysctls {
		if info.OrigSysctl[i] < 0 {
			continue
		}
		if err := writeSysctl(nl, conf, i, ifname, int(info.OrigSysctl[i])); err != nil {
			errs = append(errs, fmt.Errorf("restore: %w", err))
			continue
		}
		info.OrigSysctl[i] = -1
	}
	return errors.Join(errs...)
}
