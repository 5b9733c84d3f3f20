//go:build linux

// Package nlretry repeats netlink dumps that the kernel interrupted.
//
// A netlink dump (links, addresses, routes, rules, qdiscs, filters) spans
// several messages; when the table changes between two of them the kernel
// flags the reply NLM_F_DUMP_INTR, and vishvananda/netlink (v1.3.1) returns
// what it parsed so far together with netlink.ErrDumpInterrupted. Those
// results may miss entries or hold stale ones, so they are never used: Do
// discards them and asks again. On a busy node (pods coming and going,
// veths and addresses added and removed) an interrupted dump is routine,
// not a failure; every dump in the project goes through this package.
// (Lookups by index, netlink.LinkByIndex, are single requests, not dumps:
// the kernel never flags them.)
package nlretry

import (
	"errors"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
)

// Attempts bounds how often Do runs a dump that keeps being interrupted.
// A dump takes well under a millisecond, so only a table that changes
// continuously for the whole retry window exhausts it.
const Attempts = 20

// maxBackoff caps the pause between attempts; with the linear growth
// below, all attempts together wait under 50 ms.
const maxBackoff = 5 * time.Millisecond

// sleep is replaced in tests to count the pauses.
var sleep = time.Sleep

// Do runs dump until it returns without netlink.ErrDumpInterrupted, at most
// Attempts times, pausing briefly between attempts so the change that
// interrupted it can finish. Results returned with ErrDumpInterrupted are
// discarded. Any other error is returned at once, as is. When every
// attempt is interrupted, Do returns the zero T and an error wrapping
// netlink.ErrDumpInterrupted.
func Do[T any](dump func() (T, error)) (T, error) {
	var zero T
	for i := 1; ; i++ {
		v, err := dump()
		if err == nil || !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
		if i == Attempts {
			return zero, fmt.Errorf("netlink dump interrupted %d times in a row: %w", Attempts, err)
		}
		sleep(min(time.Duration(i)*250*time.Microsecond, maxBackoff))
	}
}

// Handle makes the dumps on one netlink.Handle's sockets. A handle made
// in a namespace (netlink.NewHandle inside it, or NewHandleAt) keeps
// working there from any thread, so a caller that makes many requests in
// one pod's namespace opens one socket, not one per request, and need not
// enter the namespace for each. The zero Handle (On(nil)) is the netlink
// package's default: a new socket per request, in the calling thread's
// namespace.
type Handle struct{ h *netlink.Handle }

// On returns the retried dumps made on h; nil is the package default.
func On(h *netlink.Handle) Handle {
	if h == nil {
		h = &netlink.Handle{}
	}
	return Handle{h}
}

// LinkList is netlink.LinkList, retried.
func LinkList() ([]netlink.Link, error) { return On(nil).LinkList() }

// LinkList is Handle.LinkList, retried.
func (n Handle) LinkList() ([]netlink.Link, error) {
	return Do(n.h.LinkList)
}

// LinkByName is netlink.LinkByName, retried: on kernels without
// IFLA_IFNAME lookups the library falls back to a dump of all links.
func LinkByName(name string) (netlink.Link, error) { return On(nil).LinkByName(name) }

// LinkByName is Handle.LinkByName, retried (see the function LinkByName).
func (n Handle) LinkByName(name string) (netlink.Link, error) {
	return Do(func() (netlink.Link, error) { return n.h.LinkByName(name) })
}

// AddrList is netlink.AddrList, retried.
func AddrList(link netlink.Link, family int) ([]netlink.Addr, error) {
	return Do(func() ([]netlink.Addr, error) { return netlink.AddrList(link, family) })
}

// RouteList is netlink.RouteList, retried.
func RouteList(link netlink.Link, family int) ([]netlink.Route, error) {
	return Do(func() ([]netlink.Route, error) { return netlink.RouteList(link, family) })
}

// RouteListFiltered is netlink.RouteListFiltered, retried.
func RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	return On(nil).RouteListFiltered(family, filter, mask)
}

// RouteListFiltered is Handle.RouteListFiltered, retried.
func (n Handle) RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	return Do(func() ([]netlink.Route, error) { return n.h.RouteListFiltered(family, filter, mask) })
}

// RuleList is netlink.RuleList, retried.
func RuleList(family int) ([]netlink.Rule, error) { return On(nil).RuleList(family) }

// RuleList is Handle.RuleList, retried.
func (n Handle) RuleList(family int) ([]netlink.Rule, error) {
	return Do(func() ([]netlink.Rule, error) { return n.h.RuleList(family) })
}

// QdiscList is netlink.QdiscList, retried. The kernel dumps every qdisc of
// the namespace (the library filters by link), so link churn anywhere in
// the namespace can interrupt it.
func QdiscList(link netlink.Link) ([]netlink.Qdisc, error) { return On(nil).QdiscList(link) }

// QdiscList is Handle.QdiscList, retried (see the function QdiscList).
func (n Handle) QdiscList(link netlink.Link) ([]netlink.Qdisc, error) {
	return Do(func() ([]netlink.Qdisc, error) { return n.h.QdiscList(link) })
}

// FilterList is netlink.FilterList, retried.
func FilterList(link netlink.Link, parent uint32) ([]netlink.Filter, error) {
	return On(nil).FilterList(link, parent)
}

// FilterList is Handle.FilterList, retried.
func (n Handle) FilterList(link netlink.Link, parent uint32) ([]netlink.Filter, error) {
	return Do(func() ([]netlink.Filter, error) { return n.h.FilterList(link, parent) })
}
