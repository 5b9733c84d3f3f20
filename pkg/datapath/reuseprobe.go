//go:build linux

package datapath

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/sockopt"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// The SO_REUSEPORT steering probe (bpf/reuseprobe.c) asks the kernel
// whether bpf_sk_assign accepts a listener with SO_REUSEPORT. Linux 6.6
// ("bpf, net: Support SO_REUSEPORT sockets with bpf_sk_assign") made it;
// before, the helper returns -ESOCKTNOSUPPORT and the datapath drops
// what it captures for a proxy whose pod listeners use SO_REUSEPORT.
// Nothing cheaper answers: the release misleads (a vendor may backport,
// or not), the 6.6 series' inet_lookup_reuseport symbol is in Debian's
// 5.10.0-32 which still refuses (docs/KERNELS.md), and a BPF_PROG_TEST_RUN
// cannot call bpf_sk_assign at all (the helper first checks that the
// packet is at TC ingress, which a test run is not). So the probe sends
// one real SYN through a TC ingress hook, in a network namespace of its
// own that nothing else sees.

var reusePortProbe = sync.OnceValues(func() (bool, error) { return probeAssign(true) })

// ProbeReusePortAssign reports whether bpf_sk_assign accepts SO_REUSEPORT
// listeners on the running kernel. It asks the kernel once per process
// (later calls return the first answer): in a scratch network namespace,
// with lo up, a TCP listener with SO_REUSEPORT on 127.0.0.1:P and
// bpf/reuseprobe.c on lo's clsact ingress, it connects to 127.0.0.1:Q,
// where nothing listens; the program assigns the SYN to the listener on P
// and records what bpf_sk_assign returned. 0 (and the connection accepted
// on P) is true, -ESOCKTNOSUPPORT false. Anything else, or no SYN seen,
// is an error saying what happened; callers should then take the answer
// as false, which only costs the proxy its SO_REUSEPORT upgrade handoff.
//
// It needs the rights to load BPF programs and create a network
// namespace (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). It changes nothing
// outside the scratch namespace except lifting RLIMIT_MEMLOCK where the
// kernel charges BPF maps to it (before 5.11), as every loader here does.
// The namespace goes away with the thread that made it and the probe's
// sockets and program, all closed before it returns, whatever happened.
func ProbeReusePortAssign() (bool, error) { return reusePortProbe() }

// probeTimeout bounds the probe's connect and accept. On loopback both
// take microseconds; a refused assignment is answered by a reset at once.
// The bound is for a kernel that answers nothing (say, a SYN that never
// reached the program), and is generous for emulated kernel-matrix
// guests, several times slower than real machines.
const probeTimeout = 5 * time.Second

// probeFilters names the probe's clsact filter on the scratch lo.
var probeFilters = tcattach.Filters{Priority: 0x1ee9, Handle: 0xa6d}

// probeAssign runs the probe with a listener with SO_REUSEPORT, or
// without (reusePort false: the tests' control, which every kernel the
// datapath runs on must pass, so that a false from the probe proper is
// the reuseport refusal and not a broken probe).
func probeAssign(reusePort bool) (bool, error) {
	type result struct {
		ok  bool
		err error
	}
	done := make(chan result, 1)
	go func() {
		// Never unlocked: the thread leaves for the scratch namespace and
		// is discarded when this goroutine returns, so no other goroutine
		// ever runs in it, and nothing is made in the caller's namespace.
		runtime.LockOSThread()
		ok, err := probeInScratchNetns(reusePort)
		done <- result{ok, err}
	}()
	r := <-done
	if r.err != nil {
		return false, fmt.Errorf("probe SO_REUSEPORT steering: %w", r.err)
	}
	return r.ok, nil
}

// probeInScratchNetns moves the calling thread, which must be locked and
// must never be unlocked, into a new network namespace and runs the probe
// there. Everything it opens is closed before it returns.
func probeInScratchNetns(reusePort bool) (bool, error) {
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return false, fmt.Errorf("create a scratch netns: %w", err)
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return false, fmt.Errorf("find lo: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return false, fmt.Errorf("bring lo up: %w", err)
	}
	var opts []sockopt.Opt
	if reusePort {
		opts = append(opts, sockopt.ReusePort())
	}
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	lc := net.ListenConfig{Control: sockopt.Control(opts...)}
	ln, err := lc.Listen(ctx, "tcp4", "127.0.0.1:0")
	if err != nil {
		return false, fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	tln := ln.(*net.TCPListener)
	listenPort := tln.Addr().(*net.TCPAddr).AddrPort().Port()
	targetPort, err := freePort()
	if err != nil {
		return false, err
	}

	if err := rlimit.RemoveMemlock(); err != nil {
		return false, fmt.Errorf("remove memlock limit: %w", err)
	}
	spec, err := loadReuseprobe()
	if err != nil {
		return false, fmt.Errorf("load embedded probe: %w", err)
	}
	if err := spec.Variables["listen_port"].Set(listenPort); err != nil {
		return false, fmt.Errorf("set listen_port: %w", err)
	}
	if err := spec.Variables["target_port"].Set(targetPort); err != nil {
		return false, fmt.Errorf("set target_port: %w", err)
	}
	var objs reuseprobeObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return false, fmt.Errorf("load probe program: %w", err)
	}
	defer objs.Close()
	// The filter and qdisc are not removed: they go with the namespace.
	if _, err := tcattach.EnsureQdisc(lo.Attrs().Index); err != nil {
		return false, fmt.Errorf("clsact on lo: %w", err)
	}
	hook := tcattach.Hook{Ifindex: lo.Attrs().Index, Dir: tcattach.Ingress, Program: objs.ReuseportProbe, Name: "ambpf_reuseport_probe"}
	if err := probeFilters.Replace([]tcattach.Hook{hook}); err != nil {
		return false, fmt.Errorf("attach to lo ingress: %w", err)
	}

	out := probeOutcome{listenPort: listenPort, targetPort: targetPort}
	target := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), targetPort)
	// A literal IPv4 address: one socket, made on this (locked) thread.
	d := net.Dialer{}
	c, dialErr := d.DialContext(ctx, "tcp4", target.String())
	out.dialErr = dialErr
	if dialErr == nil {
		defer c.Close()
		out.accepted, out.acceptErr = acceptFrom(ctx, tln, c)
	}
	if err := objs.Results.Lookup(uint32(0), &out.res); err != nil {
		return false, fmt.Errorf("read the probe's result: %w", err)
	}
	return out.verdict()
}

// freePort returns a TCP port on 127.0.0.1 that nothing listens on: one
// the kernel picks for a bind, released again. In the scratch namespace
// nothing else can take it afterwards.
func freePort() (uint16, error) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	p := l.Addr().(*net.TCPAddr).AddrPort().Port()
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	return p, nil
}

// acceptFrom accepts one connection on ln before ctx ends and reports
// whether it is c's peer (its remote address is c's local one).
func acceptFrom(ctx context.Context, ln *net.TCPListener, c net.Conn) (bool, error) {
	if dl, ok := ctx.Deadline(); ok {
		if err := ln.SetDeadline(dl); err != nil {
			return false, err
		}
	}
	a, err := ln.Accept()
	if err != nil {
		return false, err
	}
	defer a.Close()
	return a.RemoteAddr().String() == c.LocalAddr().String(), nil
}

// probeOutcome is what the probe saw: what the program recorded, and
// what became of the connection to the target port.
type probeOutcome struct {
	listenPort, targetPort uint16
	res                    reuseprobeProbeResult
	dialErr                error // the connect to the target port
	accepted               bool  // the connection was accepted on the listener
	acceptErr              error
}

// verdict turns the outcome into the probe's answer: the helper's return
// value decides, the connection confirms it.
func (o probeOutcome) verdict() (bool, error) {
	switch o.res.Stage {
	case reuseprobeProbeStagePROBE_NO_SYN:
		return false, fmt.Errorf("no SYN to 127.0.0.1:%d reached lo's TC ingress (connect: %v)", o.targetPort, o.dialErr)
	case reuseprobeProbeStagePROBE_NO_LISTENER:
		return false, fmt.Errorf("bpf_skc_lookup_tcp found no listener on 127.0.0.1:%d", o.listenPort)
	case reuseprobeProbeStagePROBE_ASSIGNED:
	default:
		return false, fmt.Errorf("the program recorded an unknown stage %d", o.res.Stage)
	}
	switch ret := o.res.Ret; {
	case ret == 0:
		switch {
		case o.dialErr != nil:
			return false, fmt.Errorf("bpf_sk_assign returned 0 but the connect to 127.0.0.1:%d failed: %w", o.targetPort, o.dialErr)
		case o.acceptErr != nil:
			return false, fmt.Errorf("bpf_sk_assign returned 0 but the listener on 127.0.0.1:%d accepted nothing: %w", o.listenPort, o.acceptErr)
		case !o.accepted:
			return false, fmt.Errorf("bpf_sk_assign returned 0 but the listener on 127.0.0.1:%d accepted another connection", o.listenPort)
		}
		return true, nil
	case ret == -int64(unix.ESOCKTNOSUPPORT):
		return false, nil
	case ret < 0 && ret > -4096:
		return false, fmt.Errorf("bpf_sk_assign returned %d: %w", ret, syscall.Errno(-ret))
	default:
		return false, fmt.Errorf("bpf_sk_assign returned %d", ret)
	}
}
