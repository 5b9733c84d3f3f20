//go:build linux

package nlretry_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/nlretry"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// The churn runs for churnFor at least, and on until the dumps made
// without nlretry were interrupted minInterrupts times (proof that the
// churn did its job), but never longer than maxChurn. On 6.18 about one
// unretried dump in ten is interrupted, so 3 s is usually enough.
const (
	churnFor      = 3 * time.Second
	maxChurn      = 15 * time.Second
	minInterrupts = 3
)

// TestDumpsSurviveChurn adds and removes links and addresses in a
// loop in the node and in an enrolled pod's netns while (1) the dumps the
// project makes run through nlretry in the node, (2) the tc helpers the
// agent's probe SNAT uses add and remove a clsact qdisc on the pod's host
// veth, and (3) the pod is attached to and detached from the eBPF
// datapath over and over. No error may escape. The same dumps made
// without nlretry are counted: they must have been interrupted (at least
// minInterrupts times), or the churn proved nothing.
func TestDumpsSurviveChurn(t *testing.T) {
	topo := nettest.NewTopology(t, 1)
	mnt := bpffstest.Mount(t)
	loader, err := datapath.New(datapath.Config{Root: filepath.Join(mnt, "ambpf"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	pod, node := topo.Pod(0), topo.Node

	// A standing population of links with addresses makes every dump span
	// several netlink messages, which is when the kernel can interrupt it.
	if err := node.Do(func() error { return addDummies("base", 0, 96) }); err != nil {
		t.Fatal(err)
	}
	if err := pod.Do(func() error { return addDummies("base", 0, 32) }); err != nil {
		t.Fatal(err)
	}
	var hostVeth int
	if err := node.Do(func() error {
		lk, err := nlretry.LinkByName(pod.HostVeth)
		if err == nil {
			hostVeth = lk.Attrs().Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), maxChurn)
	defer cancel()
	var (
		wg                     sync.WaitGroup
		errMu                  sync.Mutex
		errs                   []error
		dumps, raw, interrupts atomic.Int64
		enrolments, churned    atomic.Int64
	)
	start := time.Now()
	go func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				if time.Since(start) >= churnFor && interrupts.Load() >= minInterrupts {
					cancel()
					return
				}
			}
		}
	}()
	fail := func(err error) {
		errMu.Lock()
		defer errMu.Unlock()
		if len(errs) < 10 {
			errs = append(errs, err)
		}
	}
	run := func(name string, do func(func() error) error, loop func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := do(func() error {
				for ctx.Err() == nil {
					if err := loop(); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				fail(fmt.Errorf("%s: %w", name, err))
				cancel()
			}
		}()
	}

	for _, ns := range []*nettest.Netns{node, &pod.Netns} {
		run("churn in "+ns.Name, ns.Do, func() error {
			churned.Add(1)
			if err := addDummies("churn", 0, 4); err != nil {
				return err
			}
			return delDummies("churn", 0, 4)
		})
	}
	run("dumps through nlretry", node.Do, func() error {
		for _, dump := range []func() error{
			func() error { _, err := nlretry.LinkList(); return err },
			func() error { _, err := nlretry.AddrList(nil, netlink.FAMILY_ALL); return err },
			func() error { _, err := nlretry.RouteList(nil, netlink.FAMILY_ALL); return err },
			func() error { _, err := nlretry.RuleList(netlink.FAMILY_ALL); return err },
			func() error {
				lk, err := netlink.LinkByIndex(hostVeth)
				if err == nil {
					_, err = nlretry.QdiscList(lk)
				}
				return err
			},
		} {
			if err := dump(); err != nil {
				return err
			}
			dumps.Add(1)
		}
		return nil
	})
	run("clsact on the host veth", node.Do, func() error {
		created, err := tcattach.EnsureQdisc(hostVeth)
		if err != nil {
			return err
		}
		if !created {
			return errors.New("clsact qdisc already there")
		}
		gone, err := tcattach.RemoveQdiscIfUnused(hostVeth)
		if err == nil && !gone {
			err = errors.New("clsact qdisc not removed")
		}
		return err
	})
	run("the same dumps without nlretry", node.Do, func() error {
		for _, dump := range []func() error{
			func() error { _, err := netlink.LinkList(); return err },
			func() error { _, err := netlink.AddrList(nil, netlink.FAMILY_ALL); return err },
			func() error { _, err := netlink.RouteList(nil, netlink.FAMILY_ALL); return err },
		} {
			raw.Add(1)
			if err := dump(); errors.Is(err, netlink.ErrDumpInterrupted) {
				interrupts.Add(1)
			} else if err != nil {
				return err
			}
		}
		return nil
	})
	run("enrolment", func(f func() error) error { return f() }, func() error {
		if _, err := loader.Attach(datapath.Pod{UID: "churn-pod", Netns: pod.NS}); err != nil {
			return fmt.Errorf("attach: %w", err)
		}
		if err := loader.Detach("churn-pod"); err != nil {
			return fmt.Errorf("detach: %w", err)
		}
		enrolments.Add(1)
		return nil
	})
	wg.Wait()
	t.Cleanup(func() { loader.Detach("churn-pod") })

	t.Logf("%v: %d churn rounds, %d dumps through nlretry, %d enrolments; %d of %d dumps without it interrupted",
		time.Since(start).Round(100*time.Millisecond), churned.Load(), dumps.Load(), enrolments.Load(), interrupts.Load(), raw.Load())
	for _, err := range errs {
		t.Error(err)
	}
	if interrupts.Load() < minInterrupts {
		t.Errorf("only %d of %d dumps made without nlretry were interrupted in %v: the churn did not exercise the retry",
			interrupts.Load(), raw.Load(), maxChurn)
	}
	if dumps.Load() == 0 || enrolments.Load() == 0 {
		t.Errorf("nothing ran: %d dumps, %d enrolments", dumps.Load(), enrolments.Load())
	}
}

// placeholder is a link that carries nothing: a bridge without ports, as
// some kernels (Firecracker's) have no dummy driver.
func placeholder(prefix string, i int) *netlink.Bridge {
	return &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("%s%d", prefix, i)}}
}

// addDummies adds placeholder links <prefix><from..to-1>, up, each with an IPv4
// and an IPv6 address, in the calling thread's netns.
func addDummies(prefix string, from, to int) error {
	for i := from; i < to; i++ {
		d := placeholder(prefix, i)
		if err := netlink.LinkAdd(d); err != nil {
			return fmt.Errorf("add %s: %w", d.Name, err)
		}
		v4 := byte(1)
		if prefix == "churn" {
			v4 = 2
		}
		for _, a := range []*netlink.Addr{
			{IPNet: &net.IPNet{IP: net.IPv4(10, 200+v4, byte(i), 1), Mask: net.CIDRMask(24, 32)}},
			{IPNet: &net.IPNet{IP: net.ParseIP(fmt.Sprintf("fd99:%d:%d::1", v4, i)), Mask: net.CIDRMask(64, 128)}, Flags: unix.IFA_F_NODAD},
		} {
			if err := netlink.AddrAdd(d, a); err != nil {
				return fmt.Errorf("add %s to %s: %w", a.IPNet, d.Name, err)
			}
		}
		if err := netlink.LinkSetUp(d); err != nil {
			return fmt.Errorf("set %s up: %w", d.Name, err)
		}
	}
	return nil
}

func delDummies(prefix string, from, to int) error {
	for i := from; i < to; i++ {
		d := placeholder(prefix, i)
		if err := netlink.LinkDel(d); err != nil {
			return fmt.Errorf("delete %s: %w", d.Name, err)
		}
	}
	return nil
}
