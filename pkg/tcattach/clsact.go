//go:build linux

package tcattach

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/nlretry"
)

// Filters is the identity of one program family's clsact filters: a
// priority and handle no one else uses, so its filters never collide with
// (or remove) anyone else's on the same device.
type Filters struct {
	Priority uint16
	Handle   uint32
}

func (fl Filters) filter(h Hook) *netlink.BpfFilter {
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: h.Ifindex,
			Parent:    h.Dir.clsactParent(),
			Handle:    fl.Handle,
			Priority:  fl.Priority,
			Protocol:  unix.ETH_P_ALL,
		},
		Name:         h.Name,
		DirectAction: true,
	}
	if h.Program != nil {
		f.Fd = h.Program.FD()
	}
	return f
}

// Replace adds each hook's filter, or atomically replaces the one there,
// so no packet goes unfiltered during an upgrade. The devices need a
// clsact qdisc (EnsureQdisc).
func (fl Filters) Replace(hooks []Hook) error {
	for _, h := range hooks {
		if err := netlink.FilterReplace(fl.filter(h)); err != nil {
			return fmt.Errorf("add clsact filter %s (ifindex %d): %w", h.Name, h.Ifindex, err)
		}
	}
	return nil
}

// Delete deletes the hooks' filters; filters (or devices) already gone are
// fine.
func (fl Filters) Delete(hooks []Hook) error {
	var errs []error
	for _, h := range hooks {
		err := netlink.FilterDel(fl.filter(h))
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete clsact filter %s (ifindex %d): %w", h.Name, h.Ifindex, err))
		}
	}
	return errors.Join(errs...)
}

// Present reports which of the hooks' filters exist, as the ID of the
// program each runs, keyed by hook name.
func (fl Filters) Present(hooks []Hook) (map[string]uint32, error) {
	out := map[string]uint32{}
	for _, h := range hooks {
		lk, err := netlink.LinkByIndex(h.Ifindex)
		if err != nil {
			return nil, fmt.Errorf("find link %d: %w", h.Ifindex, err)
		}
		fs, err := nlretry.FilterList(lk, h.Dir.clsactParent())
		if err != nil {
			return nil, fmt.Errorf("list filters of %s: %w", lk.Attrs().Name, err)
		}
		for _, f := range fs {
			bf, ok := f.(*netlink.BpfFilter)
			if ok && f.Attrs().Priority == fl.Priority && f.Attrs().Handle == fl.Handle {
				out[h.Name] = uint32(bf.Id)
			}
		}
	}
	return out, nil
}

func findQdisc(ifindex int) (netlink.Qdisc, error) {
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil, fmt.Errorf("find link %d: %w", ifindex, err)
	}
	qs, err := nlretry.QdiscList(lk)
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

// EnsureQdisc adds a clsact qdisc to the device unless it has one. created
// reports whether it did: only a qdisc the caller created is the caller's
// to remove (RemoveQdiscIfUnused).
func EnsureQdisc(ifindex int) (created bool, err error) {
	q, err := findQdisc(ifindex)
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

// RemoveQdiscIfUnused deletes the device's clsact qdisc unless filters
// (anyone's) remain on it. gone reports that the device has no clsact
// qdisc any more: deleted now, or already absent.
func RemoveQdiscIfUnused(ifindex int) (gone bool, err error) {
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return false, fmt.Errorf("find link %d: %w", ifindex, err)
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := nlretry.FilterList(lk, parent)
		if err != nil {
			return false, fmt.Errorf("list filters of %s: %w", lk.Attrs().Name, err)
		}
		if len(fs) > 0 {
			return false, nil
		}
	}
	q, err := findQdisc(ifindex)
	if err == nil && q != nil {
		err = netlink.QdiscDel(q)
	}
	if err != nil {
		return false, fmt.Errorf("delete clsact qdisc of %s: %w", lk.Attrs().Name, err)
	}
	return true, nil
}
