//go:build linux

package bench

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/hack/bench/benchproc"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// mechsFlag orders the sub-benchmarks. cmd/benchreport rotates it between
// repetitions so that no mechanism always runs first (cold caches) or last
// (after the others' TIME_WAIT and conntrack churn on the machine).
var mechsFlag = flag.String("mechs", "none,iptables,ebpf",
	"capture mechanisms to compare, in run order: none, iptables, ebpf")

// Names of the mechanisms. mechRestore is the enrolment-only variant that
// runs just iptables-restore and ip6tables-restore, the floor of what an
// iptables-based CNI pays per pod.
const (
	mechNone     = "none"
	mechIPTables = "iptables"
	mechEBPF     = "ebpf"
	mechRestore  = "iptables-restore"
)

const (
	// serverPorts is how many ports the echo server listens on. The
	// connection loop rotates through them so that each destination
	// collects only 1/serverPorts of the loop's TIME_WAIT sockets, which
	// keeps the kernel's ephemeral-port search short (machine.md).
	serverPorts     = 8
	firstServerPort = 8000
	// msgSize is the size of every echoed message.
	msgSize = 64
	// opTimeout bounds every dial, read and write, so a mechanism that
	// drops packets fails the run instead of hanging it.
	opTimeout = 2 * time.Second
	// loopLimit bounds one measured loop in time whatever b.N is.
	loopLimit = 2 * time.Minute
	// warmup connections or requests run before each measured loop (ARP
	// and neighbour entries, proxy goroutines, first program runs).
	warmup = 20
)

// direction says which pod the client runs in. Capture is always on pod 0
// ("A"): outbound means the client is in A and dials the server in pod 1
// ("R"); inbound means the client in R dials the server in A.
type direction string

const (
	outbound direction = "out"
	inbound  direction = "in"
)

// mechanisms returns the traffic mechanisms in the order of -mechs.
func mechanisms(tb testing.TB) []string {
	var out []string
	for _, m := range strings.Split(*mechsFlag, ",") {
		switch m = strings.TrimSpace(m); m {
		case mechNone, mechIPTables, mechEBPF:
			out = append(out, m)
		case "":
		default:
			tb.Fatalf("-mechs: unknown mechanism %q (want none, iptables, ebpf)", m)
		}
	}
	return out
}

// enrolMechanisms returns the enrolment mechanisms in the order of -mechs:
// "none" has nothing to enrol, and the bare iptables-restore variant runs
// right after the full iptables one.
func enrolMechanisms(tb testing.TB) []string {
	var out []string
	for _, m := range mechanisms(tb) {
		switch m {
		case mechIPTables:
			out = append(out, mechIPTables, mechRestore)
		case mechEBPF:
			out = append(out, mechEBPF)
		}
	}
	return out
}

func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("bench: network namespaces, iptables and eBPF need root")
	}
}

// newCapture returns the capture for mechanism m, for the pods of topo,
// or nil for mechNone. Whatever it sets up is torn down by topo's cleanup,
// after everything registered later (such as unenrolling).
func newCapture(tb testing.TB, topo *nettest.Topology, m string) nettest.Capture {
	tb.Helper()
	switch m {
	case mechNone:
		return nil
	case mechIPTables:
		return nettest.IPTables{}
	case mechEBPF:
		return ebpfCapture{l: newLoader(tb, topo)}
	case mechRestore:
		return newRestoreCapture(tb, topo.Pod(0))
	}
	tb.Fatalf("unknown mechanism %q", m)
	return nil
}

// newLoader returns a datapath loader whose pins live on a bpffs mounted
// for this topology only, never on the machine's /sys/fs/bpf. The mount
// goes with topo's cleanup, so pods are detached before it disappears.
func newLoader(tb testing.TB, topo *nettest.Topology) *datapath.Loader {
	tb.Helper()
	mnt, err := os.MkdirTemp("", "ambpf-bench-bpffs-")
	if err != nil {
		tb.Fatalf("bpffs mount point: %v", err)
	}
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		os.Remove(mnt)
		tb.Fatalf("mount bpffs on %s: %v", mnt, err)
	}
	topo.Cleanup(func() error {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount bpffs %s: %w", mnt, err)
		}
		return os.Remove(mnt)
	})
	l, err := datapath.New(datapath.Config{Root: filepath.Join(mnt, "ambpf"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		tb.Fatalf("datapath loader: %v", err)
	}
	// The test proxy runs in this process: trust its cgroup, as the agent
	// does for a proxy connecting over ZDS.
	if _, _, err := l.TrustProcess(os.Getpid()); err != nil {
		tb.Fatalf("datapath loader: %v", err)
	}
	return l
}

// ebpfCapture enrols a pod with the eBPF datapath (programs loaded and
// attached in-process, per pod).
type ebpfCapture struct {
	l *datapath.Loader
}

func (ebpfCapture) Name() string { return mechEBPF }

func (c ebpfCapture) Enroll(p *nettest.Pod, o nettest.CaptureOptions) error {
	_, err := c.l.Attach(datapath.Pod{UID: p.NSName, Netns: p.NS,
		Options: datapath.Options{DNSCapture: o.DNS, BypassInbound: o.BypassInbound}})
	return err
}

func (c ebpfCapture) Unenroll(p *nettest.Pod) error { return c.l.Detach(p.NSName) }

// restoreCapture applies a saved copy of Istio's in-pod rule set with one
// iptables-restore and one ip6tables-restore, forked from a thread inside
// the pod's namespace as a CNI plugin does, and removes it the same way.
// It installs no policy routing and runs no checks: it is the floor of the
// iptables enrolment cost, not a usable capture.
type restoreCapture struct {
	rules  [2]string // iptables-save output for v4, v6
	remove [2]string // the same tables, emptied
}

// newRestoreCapture records the rule set nettest.IPTables writes, by
// enrolling scratch and reading it back with (ip6)iptables-save, so the
// rules are not written down a second time here.
func newRestoreCapture(tb testing.TB, scratch *nettest.Pod) *restoreCapture {
	tb.Helper()
	if err := (nettest.IPTables{}).Enroll(scratch, nettest.CaptureOptions{}); err != nil {
		tb.Fatalf("enroll %s to read the rules back: %v", scratch.Name, err)
	}
	c := &restoreCapture{}
	for i, bin := range []string{"iptables-save", "ip6tables-save"} {
		out, err := scratch.Exec(tb.Context(), bin)
		if err != nil {
			tb.Fatalf("read rules back: %v", err)
		}
		c.rules[i] = string(out)
		for _, line := range strings.Split(c.rules[i], "\n") {
			if strings.HasPrefix(line, "*") {
				c.remove[i] += line + "\nCOMMIT\n"
			}
		}
		if !strings.Contains(c.rules[i], "ISTIO_OUTPUT") {
			tb.Fatalf("%s in %s shows no ISTIO_OUTPUT chain:\n%s", bin, scratch.Name, out)
		}
	}
	if err := (nettest.IPTables{}).Unenroll(scratch); err != nil {
		tb.Fatalf("unenroll %s: %v", scratch.Name, err)
	}
	return c
}

func (*restoreCapture) Name() string { return mechRestore }

func (c *restoreCapture) Enroll(p *nettest.Pod, _ nettest.CaptureOptions) error {
	return restoreIn(p, c.rules)
}

func (c *restoreCapture) Unenroll(p *nettest.Pod) error { return restoreIn(p, c.remove) }

// restoreIn runs iptables-restore and ip6tables-restore (flush mode) with
// inputs inside p. The children inherit the namespace of the locked thread
// that forks them, so no `ip netns exec` is paid.
func restoreIn(p *nettest.Pod, inputs [2]string) error {
	return p.Do(func() error {
		for i, bin := range []string{"iptables-restore", "ip6tables-restore"} {
			cmd := exec.Command(bin, "--wait")
			cmd.Stdin = strings.NewReader(inputs[i])
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("%s in %s: %w: %s", bin, p.Name, err, bytes.TrimSpace(out))
			}
		}
		return nil
	})
}

// enrolled tells whether c's state is present in p: the pod's datapath
// pins for ebpf, Istio's chains for the iptables mechanisms.
func enrolled(tb testing.TB, c nettest.Capture, p *nettest.Pod) bool {
	tb.Helper()
	if e, ok := c.(ebpfCapture); ok {
		st, err := e.l.Get(p.NSName)
		if errors.Is(err, datapath.ErrNotAttached) {
			return false
		}
		if err != nil {
			tb.Fatalf("datapath status of %s: %v", p.Name, err)
		}
		return st.Attached()
	}
	has := 0
	for _, bin := range []string{"iptables-save", "ip6tables-save"} {
		out, err := p.Exec(tb.Context(), bin)
		if err != nil {
			tb.Fatalf("%s in %s: %v", bin, p.Name, err)
		}
		if bytes.Contains(out, []byte("ISTIO_OUTPUT")) {
			has++
		}
	}
	if has == 1 {
		tb.Fatalf("%s: Istio chains in one family only", p.Name)
	}
	return has == 2
}

// scenario is one side-by-side case: a fresh topology (so no TIME_WAIT or
// conntrack state carries over from another case), an echo server, and,
// unless the mechanism is none, pod A enrolled with a pass-through proxy
// listening in it.
type scenario struct {
	mech    string
	dir     direction
	topo    *nettest.Topology
	a, r    *nettest.Pod
	client  *nettest.Pod // where the client runs
	server  *echoServer
	capture nettest.Capture  // nil for none
	proxy   *testproxy.Proxy // nil for none
	dsts    []string         // server addresses, one per port
}

func newScenario(tb testing.TB, mech string, dir direction) *scenario {
	tb.Helper()
	requireRoot(tb)
	topo := nettest.NewTopology(tb, 2)
	s := &scenario{mech: mech, dir: dir, topo: topo, a: topo.Pod(0), r: topo.Pod(1)}
	s.client, s.capture = s.a, newCapture(tb, topo, mech)
	serverPod := s.r
	if dir == inbound {
		s.client, serverPod = s.r, s.a
	}
	var err error
	if s.server, err = startEcho(serverPod); err != nil {
		tb.Fatal(err)
	}
	topo.Cleanup(s.server.Close)
	for _, port := range s.server.ports {
		s.dsts = append(s.dsts, netip.AddrPortFrom(serverPod.IPv4, port).String())
	}
	if s.capture == nil {
		return s
	}
	if s.proxy, err = testproxy.Start(s.a.NS, testproxy.Options{DialTimeout: opTimeout}); err != nil {
		tb.Fatalf("start proxy in %s: %v", s.a.Name, err)
	}
	topo.Cleanup(s.proxy.Close)
	if err := s.capture.Enroll(s.a, nettest.CaptureOptions{}); err != nil {
		tb.Fatalf("enroll %s with %s: %v", s.a.Name, mech, err)
	}
	// Registered last, so it runs first: unenrol while the proxy and
	// server are still there and the bpffs is still mounted.
	topo.Cleanup(func() error { return s.capture.Unenroll(s.a) })
	return s
}

// listenerPort is the proxy listener the scenario's connections must reach.
func (s *scenario) listenerPort() int {
	if s.dir == inbound {
		return meshconst.InboundPlaintextPort
	}
	return meshconst.OutboundPort
}

// connectLoop opens n connections from the client pod, rotating through
// the server's ports; each one connects, echoes msgSize bytes and closes.
// The whole loop runs on one OS thread locked into the client's namespace,
// as an application's thread would be: switching namespace per connection
// would cost more than the connection.
func (s *scenario) connectLoop(n int) error {
	return s.client.Do(func() error {
		d := &net.Dialer{Timeout: opTimeout}
		out, in := message(), make([]byte, msgSize)
		deadline := time.Now().Add(loopLimit)
		for i := range n {
			dst := s.dsts[i%len(s.dsts)]
			if err := connectOnce(d, dst, out, in); err != nil {
				return fmt.Errorf("connection %d from %s to %s: %w", i, s.client.Name, dst, err)
			}
			if i%1024 == 1023 && time.Now().After(deadline) {
				return fmt.Errorf("connection loop passed %v after %d of %d connections", loopLimit, i+1, n)
			}
		}
		return nil
	})
}

func connectOnce(d *net.Dialer, dst string, out, in []byte) error {
	c, err := d.Dial("tcp", dst)
	if err != nil {
		return err
	}
	err = echo(c, out, in)
	if cerr := c.Close(); err == nil {
		err = cerr
	}
	return err
}

// dial opens one long-lived connection from the client pod to the first
// server port. The socket stays in the client's namespace and may be used
// from any goroutine.
func (s *scenario) dial() (net.Conn, error) {
	return s.client.DialWith(context.Background(), &net.Dialer{Timeout: opTimeout}, "tcp", s.dsts[0])
}

// echo writes out on c and reads the same number of bytes back into in,
// within opTimeout, and checks that they are the same.
func echo(c net.Conn, out, in []byte) error {
	if err := c.SetDeadline(time.Now().Add(opTimeout)); err != nil {
		return fmt.Errorf("set deadline: %w", err)
	}
	if _, err := c.Write(out); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, in); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if !bytes.Equal(in, out) {
		return errors.New("echo differs from what was sent")
	}
	return nil
}

func message() []byte { return bytes.Repeat([]byte("x"), msgSize) }

// echoServer echoes msgSize-byte messages on serverPorts ports inside a
// pod and records which peer addresses connected.
type echoServer struct {
	ports []uint16

	mu    sync.Mutex
	peers map[netip.Addr]int
	conns map[net.Conn]struct{}
	ls    []net.Listener
	wg    sync.WaitGroup
}

func startEcho(p *nettest.Pod) (*echoServer, error) {
	s := &echoServer{peers: map[netip.Addr]int{}, conns: map[net.Conn]struct{}{}}
	for i := range serverPorts {
		port := uint16(firstServerPort + i)
		l, err := p.Listen("tcp", netip.AddrPortFrom(netip.IPv6Unspecified(), port).String())
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("echo server: %w", err)
		}
		s.ls = append(s.ls, l)
		s.ports = append(s.ports, port)
		s.wg.Add(1)
		go s.serve(l)
	}
	return s, nil
}

func (s *echoServer) serve(l net.Listener) {
	defer s.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		s.mu.Lock()
		s.peers[peer]++
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			buf := make([]byte, msgSize)
			for {
				if _, err := io.ReadFull(c, buf); err != nil {
					break
				}
				if _, err := c.Write(buf); err != nil {
					break
				}
			}
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.Close()
		}()
	}
}

// Peers returns how many connections each peer address opened.
func (s *echoServer) Peers() map[netip.Addr]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[netip.Addr]int, len(s.peers))
	for k, v := range s.peers {
		out[k] = v
	}
	return out
}

// Close stops the listeners, closes open connections and waits for the
// server's goroutines.
func (s *echoServer) Close() error {
	var errs []error
	for _, l := range s.ls {
		errs = append(errs, l.Close())
	}
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return errors.Join(errs...)
}

// cpuTimes is a sample of CPU time spent so far.
type cpuTimes struct {
	// self is user+system time of this process: client, server, proxy,
	// the Go runtime, and the softirq work the kernel ran while one of
	// its threads was on the CPU (this kernel has no IRQ time
	// accounting, so that work is charged to the interrupted task).
	self time.Duration
	// children is user+system time of waited-for child processes
	// (iptables-restore and friends).
	children time.Duration
	// cpuset is the non-idle time of the CPUs this process may run on,
	// from /proc/stat, whoever used it: it includes ksoftirqd, kworkers
	// and any other job on those CPUs, at 10 ms resolution.
	cpuset time.Duration
}

func (a cpuTimes) sub(b cpuTimes) cpuTimes {
	return cpuTimes{self: a.self - b.self, children: a.children - b.children, cpuset: a.cpuset - b.cpuset}
}

func readCPU(tb testing.TB) cpuTimes {
	tb.Helper()
	var t cpuTimes
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		tb.Fatalf("getrusage: %v", err)
	}
	t.self = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	if err := unix.Getrusage(unix.RUSAGE_CHILDREN, &ru); err != nil {
		tb.Fatalf("getrusage children: %v", err)
	}
	t.children = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	busy, err := benchproc.CPUSetBusy()
	if err != nil {
		tb.Fatalf("read /proc/stat: %v", err)
	}
	t.cpuset = busy
	return t
}

// conntrackEntries returns the number of conntrack entries in p's
// namespace; ok is false when conntrack is not loaded.
func conntrackEntries(p *nettest.Pod) (n int, ok bool) {
	p.Do(func() error {
		data, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
		if err != nil {
			return err
		}
		_, err = fmt.Sscanf(string(data), "%d", &n)
		ok = err == nil
		return nil
	})
	return n, ok
}

// percentile returns the p-th percentile (0-100) of d, sorting d.
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	i := int(float64(len(d)-1) * p / 100)
	return d[i]
}
