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

// TC makes the tc requests (qdiscs, filters) on one netlink handle. A
// handle made inside a pod's namespace keeps working there from any
// thread, and a whole enrolment then costs one netlink socket instead of
// one per request (see nlretry.Handle). The zero TC (On(nil)) opens a
// socket per request in the calling thread's namespace.
type TC struct {
	h  *netlink.Handle
	nl nlretry.Handle
}

// On returns the tc requests made on h; nil is the netlink default.
func On(h *netlink.Handle) TC {
	if h == nil {
		h = &netlink.Handle{}
	}
	return TC{h: h, nl: nlretry.On(h)}
}

// byIndex names a device by index only: all the qdisc and filter requests
// need, so no lookup of the device is made first.
func byIndex(ifindex int) netlink.Link {
	return &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
}

// Replace adds each hook's filter, or atomically replaces the one there,
// so no packet goes unfiltered during an upgrade. The devices need a
// clsact qdisc (EnsureQdisc).
func (fl Filters) Replace(hooks []Hook) error { return On(nil).Replace(fl, hooks) }

// Replace is Filters.Replace on t's handle.
func (t TC) Replace(fl Filters, hooks []Hook) error {
	for _, h := range hooks {
		if err := t.h.FilterReplace(fl.filter(h)); err != nil {
			return fmt.Errorf("add clsact filter %s (ifindex %d): %w", h.Name, h.Ifindex, err)
		}
	}
	return nil
}

// Delete deletes the hooks' filters; filters (or devices) already gone are
// fine.
func (fl Filters) Delete(hooks []Hook) error { return On(nil).Delete(fl, hooks) }

// Delete is Filters.Delete on t's handle.
func (t TC) Delete(fl Filters, hooks []Hook) error {
	var errs []error
	for _, h := range hooks {
		err := t.h.FilterDel(fl.filter(h))
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete clsact filter %s (ifindex %d): %w", h.Name, h.Ifindex, err))
		}
	}
	return errors.Join(errs...)
}

// Present reports which of the hooks' filters exist, as the ID of the
// program each runs, keyed by hook name.
func (fl Filters) Present(hooks []Hook) (map[string]uint32, error) { return On(nil).Present(fl, hooks) }

// Present is Filters.Present on t's handle.
func (t TC) Present(fl Filters, hooks []Hook) (map[string]uint32, error) {
	out := map[string]uint32{}
	for _, h := range hooks {
		fs, err := t.nl.FilterList(byIndex(h.Ifindex), h.Dir.clsactParent())
		if err != nil {
			return nil, fmt.Errorf("list filters of ifindex %d: %w", h.Ifindex, err)
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

func (t TC) findQdisc(ifindex int) (netlink.Qdisc, error) {
	qs, err := t.nl.QdiscList(byIndex(ifindex))
	if err != nil {
		return nil, fmt.Errorf("list qdiscs of ifindex %d: %w", ifindex, err)
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
func EnsureQdisc(ifindex int) (created bool, err error) { return On(nil).EnsureQdisc(ifindex) }

// EnsureQdisc is the function EnsureQdisc on t's handle. It asks for the
// qdisc exclusively instead of listing the device's qdiscs first: one
// request, and the kernel's EEXIST says one is there.
func (t TC) EnsureQdisc(ifindex int) (created bool, err error) {
	err = t.h.QdiscAdd(&netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	})
	if errors.Is(err, unix.EEXIST) {
		// A clsact qdisc, or an ingress one (same handle): with ingress,
		// adding the egress filters fails, as it must.
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("add clsact qdisc (ifindex %d): %w", ifindex, err)
	}
	return true, nil
}

// RemoveQdiscIfUnused deletes the device's clsact qdisc unless filters
// (anyone's) remain on it. gone reports that the device has no clsact
// qdisc any more: deleted now, or already absent.
func RemoveQdiscIfUnused(ifindex int) (gone bool, err error) {
	return On(nil).RemoveQdiscIfUnused(ifindex)
}

// RemoveQdiscIfUnused is the function RemoveQdiscIfUnused on t's handle.
func (t TC) RemoveQdiscIfUnused(ifindex int) (gone bool, err error) {
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := t.nl.FilterList(byIndex(ifindex), parent)
		if err != nil {
			return false, fmt.Errorf("list filters of ifindex %d: %w", ifindex, err)
		}
		if len(fs) > 0 {
			return false, nil
		}
	}
	q, err := t.findQdisc(ifindex)
	if err == nil && q != nil {
		err = t.h.QdiscDel(q)
	}
	if err != nil {
		return false, fmt.Errorf("delete clsact qdisc of ifindex %d: %w", ifindex, err)
	}
	return true, nil
}

// InterfaceIndex is the function InterfaceIndex on t's handle: one
// request for the device (net.InterfaceByName dumps every device).
func (t TC) InterfaceIndex(name string) (int, error) {
	lk, err := t.nl.LinkByName(name)
	if err != nil {
		return 0, fmt.Errorf("find interface %s: %w", name, err)
	}
	return lk.Attrs().Index, nil
}
