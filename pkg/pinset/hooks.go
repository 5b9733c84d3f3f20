//go:build linux

// Package pinset owns the lifecycle of a set of pinned BPF objects, the
// same for every ambpf program family (the capture datapath's node
// programs and pod entries, the host-probe SNAT):
//
//   - a family declares its TC hooks once, in a Table: which program runs
//     on which hook, under which pin names (Table);
//   - a node-wide build is loaded over the pinned maps of the one before
//     it, switched in, and published, its meta written last (Node.Ensure);
//   - an attachment is staged in a temporary directory, published by one
//     rename, and undone step by step on failure (Stage);
//   - an attachment's hooks are upgraded in table order, each atomically
//     (tcx link update, clsact filter replace, pins renamed over), and
//     detached explicitly (Table.Update, Table.Detach).
//
// The package holds no lock: its callers serialise what they mutate.
// Functions that act on a device act in the network namespace of their
// tcattach.TC handle, or of the calling thread.
package pinset

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ambpf/ambpf/pkg/bpffs"
	"github.com/ambpf/ambpf/pkg/bpfobj"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// LoopbackIfindex is lo's ifindex in every network namespace.
const LoopbackIfindex = 1

// Hook is one row of a family's hook table: a program of the family's
// object on one TC hook.
type Hook struct {
	// Program is the program's name in the object (bpf2go's *Prog*
	// constant).
	Program string
	Dir     tcattach.Direction
	// Loopback puts the hook on lo instead of the attached device.
	Loopback bool
	// LinkPin is the name of the hook's tcx link pin in the attachment's
	// directory.
	LinkPin string
}

// ProgPin is the name of the hook's program pin (clsact mode, where no
// link holds the program).
func (h Hook) ProgPin() string { return "prog_" + h.Program }

// FilterName names the hook's clsact filter (and the hook in errors).
func (h Hook) FilterName() string { return "ambpf_" + h.Program }

// Table is one program family's hooks, in attach order, with the clsact
// filter identity they use in clsact mode. It is the only place a family
// lists its hooks.
type Table struct {
	Hooks   []Hook
	Filters tcattach.Filters
}

// Programs finds a loaded program by its name in the object.
type Programs func(name string) *ebpf.Program

// ByName is Programs over a map by object name (a Collection's Programs).
func ByName(m map[string]*ebpf.Program) Programs {
	return func(name string) *ebpf.Program { return m[name] }
}

// TC returns the table's hooks on the device ifindex, running progs; progs
// may be nil to name the hooks only (delete, list).
func (t Table) TC(ifindex int, progs Programs) []tcattach.Hook {
	out := make([]tcattach.Hook, len(t.Hooks))
	for i, h := range t.Hooks {
		idx := ifindex
		if h.Loopback {
			idx = LoopbackIfindex
		}
		out[i] = tcattach.Hook{Ifindex: idx, Dir: h.Dir, Name: h.FilterName()}
		if progs != nil {
			out[i].Program = progs(h.Program)
		}
	}
	return out
}

// LinkPins are the paths of the hooks' tcx link pins in dir, in table
// order.
func (t Table) LinkPins(dir string) []string {
	out := make([]string, len(t.Hooks))
	for i, h := range t.Hooks {
		out[i] = filepath.Join(dir, h.LinkPin)
	}
	return out
}

// Attach attaches progs to the device ifindex in mode: tcx links (returned
// in table order, for PinLinks), or clsact filters of the table's identity
// (added or atomically replaced; the qdiscs must exist). On error the
// links made so far are returned, for the caller to detach and close.
func (t Table) Attach(tc tcattach.TC, mode tcattach.Mode, ifindex int, progs Programs) ([]link.Link, error) {
	switch mode {
	case tcattach.ModeTCX:
		return tcattach.AttachTCX(t.TC(ifindex, progs))
	case tcattach.ModeClsact:
		return nil, tc.Replace(t.Filters, t.TC(ifindex, progs))
	}
	return nil, fmt.Errorf("unknown attach mode %v", mode)
}

// PinLinks pins links, made by Attach or tcattach.AttachTCXIn for this
// table, under their pin names in dir.
func (t Table) PinLinks(dir string, links []link.Link) error {
	if len(links) != len(t.Hooks) {
		return fmt.Errorf("pin links: %d links for %d hooks", len(links), len(t.Hooks))
	}
	for i, h := range t.Hooks {
		if err := links[i].Pin(filepath.Join(dir, h.LinkPin)); err != nil {
			return fmt.Errorf("pin %s: %w", h.LinkPin, err)
		}
	}
	return nil
}

// PinPrograms pins the hooks' programs in dir (clsact mode), in table
// order, each atomically replacing the pin there (bpffs.PinReplacing): a
// pin is never missing, so a reader or a crash sees the old or the new
// program.
func (t Table) PinPrograms(dir string, progs Programs) error {
	for _, h := range t.Hooks {
		if err := bpffs.PinReplacing(progs(h.Program), filepath.Join(dir, h.ProgPin())); err != nil {
			return err
		}
	}
	return nil
}

// Update makes an attachment's hooks run progs, hook by hook in table
// order, each atomically, so no packet meets no program: in tcx mode the
// links pinned in dir are updated (a hook whose pin is missing, an
// attach that did not get that far, is skipped); in clsact mode the
// filters are replaced through tc (the device must be ifindex) and, with
// pinProgs, the programs' pins in dir are replaced too.
func (t Table) Update(tc tcattach.TC, mode tcattach.Mode, dir string, ifindex int, progs Programs, pinProgs bool) error {
	switch mode {
	case tcattach.ModeTCX:
		for _, h := range t.Hooks {
			path := filepath.Join(dir, h.LinkPin)
			if _, err := os.Stat(path); err != nil {
				continue
			}
			if err := bpffs.UpdatePinnedLink(path, progs(h.Program)); err != nil {
				return err
			}
		}
		return nil
	case tcattach.ModeClsact:
		if err := tc.Replace(t.Filters, t.TC(ifindex, progs)); err != nil {
			return err
		}
		if pinProgs {
			return t.PinPrograms(dir, progs)
		}
		return nil
	}
	return fmt.Errorf("unknown attach mode %v", mode)
}

// Detach detaches the tcx links pinned in dir, all at once (their kernel
// grace periods overlap), and leaves the pins. Detaching explicitly
// matters: dropping the last reference to a link (unpinning) releases it
// from a kernel workqueue, so its program would keep running for a moment
// after the caller returned. Missing pins are skipped.
func (t Table) Detach(dir string) error {
	var present []string
	for _, p := range t.LinkPins(dir) {
		if _, err := os.Stat(p); err == nil {
			present = append(present, p)
		}
	}
	return tcattach.DetachPinnedAll(present)
}

// DeleteFilters deletes the table's clsact filters from the device
// ifindex through tc.
func (t Table) DeleteFilters(tc tcattach.TC, ifindex int) error {
	return tc.Delete(t.Filters, t.TC(ifindex, nil))
}

// FilterPrograms is what a listing of the table's clsact filters reports
// (tcattach.TC.Present) once Attach has put progs in them: the ID of each
// hook's program, by filter name. It asks the kernel about the programs
// only, not the devices: a caller that just attached knows the filters
// without a dump of them.
func (t Table) FilterPrograms(progs Programs) (map[string]uint32, error) {
	out := make(map[string]uint32, len(t.Hooks))
	for _, h := range t.Hooks {
		id, err := bpfobj.ProgramID(progs(h.Program))
		if err != nil {
			return nil, fmt.Errorf("program %s: %w", h.Program, err)
		}
		out[h.FilterName()] = uint32(id)
	}
	return out, nil
}

// Present returns how many of the table's clsact filters are on the
// device ifindex, and which are missing (by filter name).
func (t Table) Present(tc tcattach.TC, ifindex int) (int, []string, error) {
	found, err := tc.Present(t.Filters, t.TC(ifindex, nil))
	if err != nil {
		return 0, nil, err
	}
	var missing []string
	for _, h := range t.Hooks {
		if _, ok := found[h.FilterName()]; !ok {
			missing = append(missing, h.FilterName())
		}
	}
	return len(found), missing, nil
}
