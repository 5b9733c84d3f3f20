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
	"github.com/vishvananda/netns"
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
// The paths are relative to sysctlConfDir. They are read there and
// written there too where /proc/sys is writable. Where it is not (the
// container runtime mounts it read-only in a non-privileged container,
// as the chart's agent has it), the per-device ones (dev set) are written
// through netlink instead (RTM_SETLINK, IFLA_AF_SPEC/AF_INET/
// IFLA_INET_CONF), which needs only CAP_NET_ADMIN. /proc/sys comes first
// because an RTM_SETLINK always announces the device as changed
// (NETDEV_CHANGE), and IPv6 answers that by sending the device's MLD
// reports again, which an L2 bridge floods to every pod on it: in a burst
// of enrolments on a bridge that was a quarter of the node's CPU, in
// kernel workers, and grew with the pods (docs/BENCHMARKS.md, "Burst
// enrolment, third round"); it also takes RTNL, which a /proc/sys write
// of these values does not. conf/all has no device and no netlink
// setter: it is written through /proc/sys only, which a new network
// namespace makes unnecessary on most nodes (it inherits the node's
// conf/all, and rp_filter is 0 there by default).
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

// procSysRefused reports whether a write error says /proc/sys cannot be
// written here (a read-only mount, or a container's masked or
// unprivileged view), so netlink must set the value instead.
func procSysRefused(err error) bool {
	return errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM)
}

// sysctlWrites are values to write, by entry of sysctls.
type sysctlWrites map[int]int

// apply writes w in the current network namespace through /proc/sys,
// and where that is read-only, each device's values in one RTM_SETLINK
// (the kernel's inet_set_link_af checks them all, then sets them all),
// all on one netlink socket (see sysctls for why in that order). ifindex
// is the pod interface's index (lo's is fixed). It returns the entries
// written; on error, the entries of a device whose request failed are not
// among them.
//
// One request per device, by index, rather than one per value: a value
// each, with the device looked up by name and a netlink socket made for
// each request, was a seventh of the CPU of an enrol+remove cycle
// (docs/BENCHMARKS.md, "Burst enrolment").
func (w sysctlWrites) apply(conf sysctlConf, ifname string, ifindex int) (done []int, err error) {
	var errs []error
	byDev := map[int][]int{} // ifindex -> entries of sysctls
	readOnly := false        // /proc/sys refused a write: netlink from then on
	for i := range sysctls { // in table order, so requests and errors are reproducible
		v, ok := w[i]
		if !ok {
			continue
		}
		if !readOnly || sysctls[i].dev == "" {
			err := conf.put(sysctlRel(sysctls[i].path, ifname), strconv.Itoa(v))
			if err == nil {
				done = append(done, i)
				continue
			}
			if sysctls[i].dev == "" || !procSysRefused(err) {
				errs = append(errs, err)
				continue
			}
			readOnly = true
		}
		switch sysctls[i].dev {
		case "lo":
			byDev[loopbackIndex] = append(byDev[loopbackIndex], i)
		default:
			byDev[ifindex] = append(byDev[ifindex], i)
		}
	}
	if len(byDev) == 0 {
		return done, errors.Join(errs...)
	}
	if entries, ok := byDev[0]; ok { // a record without the device's index
		lk, err := netlink.LinkByName(ifname)
		if err != nil {
			return done, errors.Join(append(errs, fmt.Errorf("find %s: %w", ifname, err))...)
		}
		delete(byDev, 0)
		ifindex = lk.Attrs().Index
		byDev[ifindex] = entries
	}
	sock, err := nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return done, errors.Join(append(errs, fmt.Errorf("netlink socket for sysctls: %w", err))...)
	}
	defer sock.Close()
	socks := map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: {Socket: sock}}
	for _, dev := range []int{ifindex, loopbackIndex} {
		entries := byDev[dev]
		if len(entries) == 0 {
			continue
		}
		if err := setDevconf(socks, dev, entries, w); err != nil {
			var names []string
			for _, i := range entries {
				names = append(names, fmt.Sprintf("net.ipv4.conf.%s=%d", strings.ReplaceAll(sysctlRel(sysctls[i].path, ifname), "/", "."), w[i]))
			}
			errs = append(errs, fmt.Errorf("set %s through netlink: %w", strings.Join(names, " "), err))
			continue
		}
		done = append(done, entries...)
	}
	return done, errors.Join(errs...)
}

// setDevconf sets the IPv4 devconf values of entries (of sysctls, to
// their values in w) of device ifindex with one RTM_SETLINK on socks.
func setDevconf(socks map[int]*nl.SocketHandle, ifindex int, entries []int, w sysctlWrites) error {
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	req.Sockets = socks
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(ifindex)
	req.AddData(msg)
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	conf := spec.AddRtAttr(unix.AF_INET, nil).AddRtAttr(unix.IFLA_INET_CONF, nil)
	for _, i := range entries {
		conf.AddRtAttr(int(sysctls[i].devconf), nl.Uint32Attr(uint32(w[i])))
	}
	req.AddData(spec)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// setupNetns makes the pod's routing and sysctls ready for the programs and
// records in info what it changed. It must run inside the pod's netns, nl
// being a netlink handle of that netns, with info.Ifindex set to ifname's
// index. On error it undoes what it did.
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
	writes, orig := sysctlWrites{}, map[int]int{}
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
		writes[i], orig[i] = want, old
	}
	done, err := writes.apply(conf, ifname, int(info.Ifindex))
	for _, i := range done {
		info.OrigSysctl[i] = int8(orig[i])
	}
	if err != nil {
		return err
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
// example from an earlier iptables-based setup); added tells which. The
// rule is added first: the kernel refuses an identical rule with EEXIST
// (NLM_F_EXCL), so the common case, a new pod, costs one request and no
// dump of the rules.
func ensureRule(nl *netlink.Handle, family int) (added bool, err error) {
	err = nl.RuleAdd(localRule(family))
	if err == nil {
		return true, nil
	}
	if errors.Is(err, unix.EEXIST) {
		return false, nil
	}
	return false, fmt.Errorf("add rule fwmark %#x lookup %d (family %d): %w", meshconst.LocalRouteMark, localRouteTable, family, err)
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

// ensureLocalRoute adds the local route for dst to lo in the local-route
// table unless it is there; added tells which. As with the rule, the route
// is added first; only when the kernel finds a route for dst there already
// (EEXIST) is the table read, to tell ours (nothing to do) from another
// route, which is an error.
func ensureLocalRoute(nl *netlink.Handle, family int, dst *net.IPNet) (added bool, err error) {
	err = nl.RouteAdd(localRoute(loopbackIndex, family, dst))
	if err == nil {
		return true, nil
	}
	if !errors.Is(err, unix.EEXIST) {
		return false, fmt.Errorf("add local %s dev lo table %d: %w", dst, localRouteTable, err)
	}
	filter := &netlink.Route{Table: localRouteTable}
	routes, lerr := nlretry.On(nl).RouteListFiltered(family, filter, netlink.RT_FILTER_TABLE)
	if lerr != nil {
		return false, fmt.Errorf("add local %s dev lo table %d: %w; list the table: %w", dst, localRouteTable, err, lerr)
	}
	for _, r := range routes {
		if r.Type == unix.RTN_LOCAL && r.LinkIndex == loopbackIndex && (r.Dst == nil || r.Dst.String() == dst.String()) {
			return false, nil
		}
	}
	return false, fmt.Errorf("add local %s dev lo table %d: %w (another route for %s is there)", dst, localRouteTable, err, dst)
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
	restore := sysctlWrites{}
	for i := range sysctls {
		if info.OrigSysctl[i] >= 0 {
			restore[i] = int(info.OrigSysctl[i])
		}
	}
	done, err := restore.apply(conf, ifname, int(info.Ifindex))
	for _, i := range done {
		info.OrigSysctl[i] = -1
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("restore: %w", err))
	}
	return errors.Join(errs...)
}
