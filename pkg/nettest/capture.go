//go:build linux

package nettest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nlretry"
)

// CaptureOptions are the per-pod capture settings.
type CaptureOptions struct {
	// DNS redirects the pod's DNS (UDP and TCP port 53) to the proxy's
	// 15053 listeners.
	DNS bool
	// BypassInbound leaves inbound traffic uncaptured (outbound still is).
	BypassInbound bool
}

// Capture is a mechanism that makes a pod's traffic reach the in-pod proxy:
// Istio's iptables rules (IPTables), nothing (NoCapture), or the eBPF
// datapath. The scenario table runs the same checks against each.
type Capture interface {
	// Name identifies the mechanism in test names and reports.
	Name() string
	// Enroll starts capturing p's traffic.
	Enroll(p *Pod, o CaptureOptions) error
	// Unenroll stops capturing p's traffic and removes everything Enroll
	// installed.
	Unenroll(p *Pod) error
}

// Deviator may be implemented by a Capture that departs from the spec in
// known ways. KnownDeviations maps scenario names without the family
// suffix ("10-outbound-established-before-enroll") to the reason; Run logs
// those scenarios' failed expectations instead of failing the test.
type Deviator interface {
	KnownDeviations() map[string]string
}

// NoCapture captures nothing: with it the scenario table shows what a pod
// does without the mesh, and its expectations must fail.
type NoCapture struct{}

// Name implements Capture.
func (NoCapture) Name() string { return "none" }

// Enroll implements Capture; it does nothing.
func (NoCapture) Enroll(*Pod, CaptureOptions) error { return nil }

// Unenroll implements Capture; it does nothing.
func (NoCapture) Unenroll(*Pod) error { return nil }

// IPTables is the reference capture: the rules Istio (>= 1.24, REDIRECT
// form) writes into an ambient pod, applied with iptables-restore and
// ip6tables-restore inside the pod, plus the local-route policy rule and
// table.
type IPTables struct{}

// Name implements Capture.
func (IPTables) Name() string { return "iptables" }

// KnownDeviations implements Deviator. Conntrack is hooked into a network
// namespace only once a rule needs it, so a connection opened before the
// rules existed is unknown to it. The first packet after enrolment is
// picked up mid-stream as a new connection, REDIRECTed to a proxy
// listener that has no such connection, and answered with a reset.
func (IPTables) KnownDeviations() map[string]string {
	const why = "conntrack was not hooked before enrolment: the next packet is picked up as NEW, REDIRECTed and reset"
	return map[string]string{
		"10-outbound-established-before-enroll": why,
		"10-inbound-established-before-enroll":  why,
	}
}

// rulesFor returns the iptables-restore input for one family, as the
// datapath spec quotes it, and the tables it writes. It is applied with
// --noflush so it never touches rules it did not write. For tables in
// hooked (the chains exist already: a re-attach) only the chains' contents
// are replaced; the PREROUTING/OUTPUT jumps stay, so the nat hooks are
// never unregistered, which would make the kernel drop the NAT state of
// established connections.
func rulesFor(v6 bool, o CaptureOptions, hooked []string) (string, []string) {
	loopback, probe := "127.0.0.1/32", meshconst.ProbeSourceV4.String()
	if v6 {
		loopback, probe = "::1/128", meshconst.ProbeSourceV6.String()
	}
	pm := fmt.Sprintf("%#x/%#x", meshconst.ProxyMark, meshconst.MarkMask)
	lm := fmt.Sprintf("%#x/%#x", meshconst.LocalRouteMark, meshconst.MarkMask)
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	var tables []string
	// table starts a table: declaring a chain flushes it under --noflush.
	table := func(name string) {
		tables = append(tables, name)
		w("*%s", name)
		w(":ISTIO_PRERT - [0:0]")
		w(":ISTIO_OUTPUT - [0:0]")
		if !slices.Contains(hooked, name) {
			w("-A PREROUTING -j ISTIO_PRERT")
			w("-A OUTPUT -j ISTIO_OUTPUT")
		}
	}

	table("mangle")
	w("-A ISTIO_PRERT -m mark --mark %s -j CONNMARK --set-xmark %s", pm, lm)
	w("-A ISTIO_OUTPUT -m connmark --mark %s -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff", lm)
	w("COMMIT")

	table("nat")
	w("-A ISTIO_PRERT -s %s -p tcp -m tcp -j ACCEPT", probe)
	w("-A ISTIO_OUTPUT -d %s -p tcp -m tcp -j ACCEPT", probe)
	if !o.BypassInbound {
		w("-A ISTIO_PRERT ! -d %s -p tcp ! --dport %d -m mark ! --mark %s -j REDIRECT --to-ports %d",
			loopback, meshconst.InboundHBONEPort, pm, meshconst.InboundPlaintextPort)
	}
	if o.DNS {
		w("-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark %s -m udp --dport 53 -j REDIRECT --to-port %d", pm, meshconst.DNSPort)
		w("-A ISTIO_OUTPUT ! -d %s -p tcp --dport 53 -m mark ! --mark %s -j REDIRECT --to-ports %d", loopback, pm, meshconst.DNSPort)
	}
	w("-A ISTIO_OUTPUT -p tcp -m mark --mark %s -j ACCEPT", lm)
	w("-A ISTIO_OUTPUT ! -d %s -o lo -j ACCEPT", loopback)
	w("-A ISTIO_OUTPUT ! -d %s -p tcp -m mark ! --mark %s -j REDIRECT --to-ports %d", loopback, pm, meshconst.OutboundPort)
	w("COMMIT")

	if o.DNS {
		table("raw")
		w("-A ISTIO_OUTPUT -p udp -m mark --mark %s -m udp --dport 53 -j CT --zone 1", pm)
		w("-A ISTIO_PRERT -p udp -m mark ! --mark %s -m udp --sport 53 -j CT --zone 1", pm)
		w("COMMIT")
	}
	return b.String(), tables
}

// removalFor undoes rulesFor for one family: unhook, flush and delete the
// chains in every table that has them. Tables without the chains are
// skipped by checking first, so Unenroll is idempotent.
func removalFor(tables []string) string {
	var b strings.Builder
	for _, t := range tables {
		fmt.Fprintf(&b, "*%s\n-D PREROUTING -j ISTIO_PRERT\n-D OUTPUT -j ISTIO_OUTPUT\n", t)
		fmt.Fprintf(&b, "-F ISTIO_PRERT\n-F ISTIO_OUTPUT\n-X ISTIO_PRERT\n-X ISTIO_OUTPUT\nCOMMIT\n")
	}
	return b.String()
}

func restoreBin(v6 bool) string {
	if v6 {
		return "ip6tables-restore"
	}
	return "iptables-restore"
}

// restore feeds input to (ip6)iptables-restore --noflush inside p.
func restore(p *Pod, v6 bool, input string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", p.NSName, restoreBin(v6), "--noflush", "--wait")
	cmd.Stdin = strings.NewReader(input)
	if _, err := run(cmd); err != nil {
		return fmt.Errorf("in %s: %w", p.Name, err)
	}
	return nil
}

// Enroll implements Capture. Enrolling an enrolled pod again (a
// re-attach, possibly with other options) replaces the rules in place.
func (IPTables) Enroll(p *Pod, o CaptureOptions) error {
	for _, v6 := range []bool{false, true} {
		hooked := istioTables(p, v6)
		rules, tables := rulesFor(v6, o, hooked)
		if err := restore(p, v6, rules); err != nil {
			return fmt.Errorf("enroll %s: %w", p.Name, err)
		}
		var stale []string
		for _, t := range hooked {
			if !slices.Contains(tables, t) {
				stale = append(stale, t)
			}
		}
		if len(stale) > 0 {
			if err := restore(p, v6, removalFor(stale)); err != nil {
				return fmt.Errorf("enroll %s: %w", p.Name, err)
			}
		}
	}
	if err := p.Do(func() error { return localRouting(true) }); err != nil {
		return fmt.Errorf("enroll %s: %w", p.Name, err)
	}
	return nil
}

// Unenroll implements Capture.
func (IPTables) Unenroll(p *Pod) error {
	var errs []error
	for _, v6 := range []bool{false, true} {
		if tables := istioTables(p, v6); len(tables) > 0 {
			errs = append(errs, restore(p, v6, removalFor(tables)))
		}
	}
	errs = append(errs, p.Do(func() error { return localRouting(false) }))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("unenroll %s: %w", p.Name, err)
	}
	return nil
}

// istioTables lists the tables of one family that hold the ISTIO_PRERT
// chain in p.
func istioTables(p *Pod, v6 bool) []string {
	bin := "iptables"
	if v6 {
		bin = "ip6tables"
	}
	var tables []string
	for _, t := range []string{"mangle", "nat", "raw"} {
		cmd := exec.Command("ip", "netns", "exec", p.NSName, bin, "--wait", "-t", t, "-S", "ISTIO_PRERT")
		if err := cmd.Run(); err == nil {
			tables = append(tables, t)
		}
	}
	return tables
}

// localRouting adds (or removes) "fwmark 0x111/0xfff pref 32764 lookup 100"
// and the "local default dev lo" routes of table 100 for both families in
// the calling thread's namespace. Removal ignores what is already gone.
func localRouting(add bool) error {
	lo, err := nlretry.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	var errs []error
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rule := netlink.NewRule()
		rule.Family = fam
		rule.Mark = meshconst.LocalRouteMark
		m := meshconst.MarkMask
		rule.Mask = &m
		rule.Priority = meshconst.LocalRoutePriority
		rule.Table = meshconst.LocalRouteTable

		dst := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if fam == unix.AF_INET6 {
			dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		route := &netlink.Route{
			Family:    fam,
			LinkIndex: lo.Attrs().Index,
			Dst:       &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(0, dst.Addr().BitLen())},
			Table:     meshconst.LocalRouteTable,
			Type:      unix.RTN_LOCAL,
			Scope:     unix.RT_SCOPE_HOST,
		}
		if add {
			if err := netlink.RuleAdd(rule); err != nil && !errors.Is(err, unix.EEXIST) {
				errs = append(errs, fmt.Errorf("add rule family %d: %w", fam, err))
			}
			if err := netlink.RouteReplace(route); err != nil {
				errs = append(errs, fmt.Errorf("add local route %s table %d: %w", dst, meshconst.LocalRouteTable, err))
			}
			continue
		}
		if err := netlink.RuleDel(rule); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete rule family %d: %w", fam, err))
		}
		if err := netlink.RouteDel(route); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete local route %s: %w", dst, err))
		}
	}
	return errors.Join(errs...)
}
