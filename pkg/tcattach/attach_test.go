//go:build linux

package tcattach

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/nlretry"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs and creates network namespaces")
	}
}

// inNewNetns runs fn on a thread moved into a new network namespace; the
// thread (and with it the namespace and everything attached there) is
// discarded afterwards.
func inNewNetns(t *testing.T, fn func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		errc <- fn()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func passProgram(t *testing.T) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "MIT",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		t.Fatalf("load test program: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

// TestClsactLifecycle runs the clsact path on lo of a fresh namespace:
// the qdisc is created once, filters are added, replaced and found by
// their identity, a foreign filter keeps the qdisc alive, and deleting
// twice is fine.
func TestClsactLifecycle(t *testing.T) {
	requireRoot(t)
	prog := passProgram(t)
	ours := Filters{Priority: 0x1e00, Handle: 0xa00}
	other := Filters{Priority: 0x1e01, Handle: 0xa01}
	inNewNetns(t, func() error {
		hooks := []Hook{
			{Ifindex: 1, Dir: Ingress, Program: prog, Name: "test_in"},
			{Ifindex: 1, Dir: Egress, Program: prog, Name: "test_out"},
		}
		if created, err := EnsureQdisc(1); err != nil || !created {
			return fmt.Errorf("first EnsureQdisc: created %t, %v", created, err)
		}
		if created, err := EnsureQdisc(1); err != nil || created {
			return fmt.Errorf("second EnsureQdisc: created %t, %v", created, err)
		}
		for range 2 { // the second time replaces
			if err := ours.Replace(hooks); err != nil {
				return err
			}
		}
		foreign := []Hook{{Ifindex: 1, Dir: Ingress, Program: prog, Name: "foreign"}}
		if err := other.Replace(foreign); err != nil {
			return err
		}
		present, err := ours.Present(hooks)
		if err != nil {
			return err
		}
		info, err := prog.Info()
		if err != nil {
			return err
		}
		id, _ := info.ID()
		if len(present) != 2 || present["test_in"] != uint32(id) || present["test_out"] != uint32(id) {
			return fmt.Errorf("present %v, want both hooks running program %d", present, id)
		}
		if err := ours.Delete(hooks); err != nil {
			return err
		}
		if err := ours.Delete(hooks); err != nil {
			return fmt.Errorf("second delete: %w", err)
		}
		if present, err := ours.Present(hooks); err != nil || len(present) != 0 {
			return fmt.Errorf("after delete: present %v, %v", present, err)
		}
		if gone, err := RemoveQdiscIfUnused(1); err != nil || gone {
			return fmt.Errorf("qdisc with a foreign filter: gone %t, %v", gone, err)
		}
		if err := other.Delete(foreign); err != nil {
			return err
		}
		if gone, err := RemoveQdiscIfUnused(1); err != nil || !gone {
			return fmt.Errorf("unused qdisc: gone %t, %v", gone, err)
		}
		if has, err := loHasQdisc("clsact"); err != nil || has {
			return fmt.Errorf("clsact qdisc still there (%v)", err)
		}
		return nil
	})
}

// loHasQdisc reports whether lo of the calling thread's netns has a qdisc
// of the kind.
func loHasQdisc(kind string) (bool, error) {
	lo, err := netlink.LinkByIndex(1)
	if err != nil {
		return false, err
	}
	qs, err := nlretry.QdiscList(lo)
	if err != nil {
		return false, err
	}
	for _, q := range qs {
		if q.Type() == kind {
			return true, nil
		}
	}
	return false, nil
}

// TestRemoveQdiscLeavesOtherKinds: an ingress qdisc has clsact's handle,
// and a delete request by handle removes it (the netlink library sends no
// kind with a delete, so the kernel cannot refuse it), so
// RemoveQdiscIfUnused must find the clsact qdisc before deleting: someone
// else's ingress qdisc survives it, and a device without a clsact qdisc
// counts as gone.
func TestRemoveQdiscLeavesOtherKinds(t *testing.T) {
	requireRoot(t)
	inNewNetns(t, func() error {
		if gone, err := RemoveQdiscIfUnused(1); err != nil || !gone {
			return fmt.Errorf("no qdisc at all: gone %t, %v", gone, err)
		}
		ingress := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: 1, Parent: netlink.HANDLE_INGRESS}}
		if err := netlink.QdiscAdd(ingress); err != nil {
			return fmt.Errorf("add ingress qdisc: %w", err)
		}
		if gone, err := RemoveQdiscIfUnused(1); err != nil || !gone {
			return fmt.Errorf("only an ingress qdisc: gone %t, %v; want gone (no clsact qdisc)", gone, err)
		}
		if has, err := loHasQdisc("ingress"); err != nil || !has {
			return fmt.Errorf("the ingress qdisc was deleted (%v)", err)
		}
		return nil
	})
}

// TestTCXPinnedLink attaches through tcx, pins the link, reads its state
// back and detaches it through the pin: afterwards the pinned link reports
// no device, although the pin itself remains.
func TestTCXPinnedLink(t *testing.T) {
	requireRoot(t)
	if ok, err := HaveTCX(); err != nil || !ok {
		t.Skipf("the kernel has no tcx (probe: %t, %v)", ok, err)
	}
	prog := passProgram(t)
	mnt := bpffstest.Mount(t)
	pin := filepath.Join(mnt, "link")
	inNewNetns(t, func() error {
		links, err := AttachTCX([]Hook{{Ifindex: 1, Dir: Egress, Program: prog, Name: "test"}})
		for _, lk := range links {
			defer lk.Close()
		}
		if err != nil {
			return err
		}
		if err := links[0].Pin(pin); err != nil {
			return err
		}
		st := PinnedLinkState(pin)
		if !st.Attached || st.LinkID == 0 || st.ProgramID == 0 {
			return fmt.Errorf("pinned link state %+v, want attached with IDs", st)
		}
		if err := DetachPinned(pin); err != nil {
			return err
		}
		if st := PinnedLinkState(pin); st.Attached {
			return fmt.Errorf("after DetachPinned: %+v", st)
		}
		if err := DetachPinned(pin); err != nil {
			return fmt.Errorf("second detach: %w", err)
		}
		if st := PinnedLinkState(filepath.Join(mnt, "missing")); st != (LinkState{}) {
			return fmt.Errorf("missing pin: %+v", st)
		}
		return nil
	})
}

func TestAttachTCXReportsHook(t *testing.T) {
	requireRoot(t)
	prog := passProgram(t)
	inNewNetns(t, func() error {
		_, err := AttachTCX([]Hook{{Ifindex: 1 << 30, Dir: Ingress, Program: prog, Name: "nowhere"}})
		if err == nil {
			return errors.New("attach to a missing device succeeded")
		}
		if want := "attach tcx ingress nowhere (ifindex 1073741824)"; !strings.Contains(err.Error(), want) {
			return fmt.Errorf("error %q does not name the hook (%q)", err, want)
		}
		return nil
	})
}
