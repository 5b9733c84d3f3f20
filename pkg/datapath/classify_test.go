//go:build linux

package datapath

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/packettest"
)

const markFromEgress = 0x0a6b0000

// Short names for the table tests.
const (
	protoTCP      = packettest.ProtoTCP
	protoUDP      = packettest.ProtoUDP
	protoICMP     = packettest.ProtoICMP
	tcActOK       = packettest.TCActOK
	tcActShot     = packettest.TCActShot
	tcActRedirect = packettest.TCActRedirect
	syn           = packettest.SYN
	ack           = packettest.ACK
)

type testPacket = packettest.Packet

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs and creates network namespaces")
	}
}

// netnsWorker is one OS thread moved into a new, empty network namespace
// (lo up), so socket lookups the programs make under prog.Run see only what
// the test puts there. The lookups use the netns of the thread that calls
// BPF_PROG_TEST_RUN, and subtests run on goroutines of their own: they hand
// their runs (and socket setup) to the worker with Do.
type netnsWorker struct {
	work chan func()
	done chan struct{}
}

// freshNetns starts a worker; it ends with the test, and its thread (never
// unlocked) dies with it.
func freshNetns(t *testing.T) *netnsWorker {
	t.Helper()
	w := &netnsWorker{work: make(chan func()), done: make(chan struct{})}
	ready := make(chan error)
	go func() {
		defer close(w.done)
		runtime.LockOSThread()
		err := unix.Unshare(unix.CLONE_NEWNET)
		if err != nil {
			err = fmt.Errorf("unshare netns: %w", err)
		} else {
			var lo netlink.Link
			if lo, err = netlink.LinkByIndex(1); err == nil {
				err = netlink.LinkSetUp(lo)
			}
		}
		ready <- err
		if err != nil {
			return
		}
		for fn := range w.work {
			fn()
		}
	}()
	if err := <-ready; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(w.work)
		<-w.done
	})
	return w
}

// Do runs fn in the worker's netns and waits for it.
func (w *netnsWorker) Do(fn func()) {
	finished := make(chan struct{})
	w.work <- func() {
		defer close(finished)
		fn()
	}
	<-finished
}

// run is run (below) inside the worker's netns.
func (w *netnsWorker) run(t *testing.T, prog *ebpf.Program, pkt []byte, mark uint32) (verdict uint32, out []byte, outMark uint32) {
	t.Helper()
	var r packettest.Result
	var err error
	w.Do(func() { r, err = packettest.Run(prog, pkt, mark) })
	if err != nil {
		t.Fatal(err)
	}
	return r.Verdict, r.Out, r.Mark
}

func loadTestObjects(t testing.TB) *objects {
	t.Helper()
	requireRoot(t)
	// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	spec, err := loadCapture()
	if err != nil {
		t.Fatal(err)
	}
	// A private, unpinned proxy cgroup set: prog.Run packets have no
	// socket, so no cgroup is ever trusted here.
	spec.Maps[captureMapProxyCgroups].Pinning = ebpf.PinNone
	l := &Loader{spec: spec}
	o, err := l.load(nil)
	if err != nil {
		t.Fatalf("programs rejected: %v", err)
	}
	t.Cleanup(func() { o.Close() })
	return o
}

func run(t *testing.T, prog *ebpf.Program, pkt []byte, mark uint32) (verdict uint32, out []byte, outMark uint32) {
	t.Helper()
	r, err := packettest.Run(prog, pkt, mark)
	if err != nil {
		t.Fatal(err)
	}
	return r.Verdict, r.Out, r.Mark
}

func readCounters(t *testing.T, o *objects) Counters {
	t.Helper()
	var c captureCounters
	if err := o.PodCounters.Lookup(uint32(0), &c); err != nil {
		t.Fatal(err)
	}
	return countersFrom(c)
}

func setFlags(t *testing.T, o *objects, opts Options) {
	t.Helper()
	// The pod may fill the whole direct_flows map (its share is tested apart).
	if err := o.PodConfig.Put(uint32(0), captureConfig{Flags: optionFlags(opts), DirectMax: o.DirectFlows.MaxEntries()}); err != nil {
		t.Fatal(err)
	}
}

var (
	pod4    = netip.MustParseAddr("10.77.0.10")
	remote4 = netip.MustParseAddr("10.77.0.20")
	pod6    = netip.MustParseAddr("fd77::10")
	remote6 = netip.MustParseAddr("fd77::20")
	probe4  = netip.MustParseAddr("169.254.7.127")
	probe6  = netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
)

// tcpFlags is flags for TCP, none for other protocols.
func tcpFlags(proto uint8, flags byte) byte {
	if proto != protoTCP {
		return 0
	}
	return flags
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

// TestEgressClassification runs capture_egress on crafted packets: what is
// sent back into ingress for the proxy, what leaves untouched, and the
// counters each decision moves.
func TestEgressClassification(t *testing.T) {
	o := loadTestObjects(t)
	// A flow that was open before attach, in each family.
	for _, f := range []captureFlow{
		flowKey(pod4, 40000, remote4, 80),
		flowKey(pod6, 40000, remote6, 80),
	} {
		if err := o.DirectFlows.Put(f, captureDirectFlow{ExpiresNs: monotonicNow() + uint64(directIdle), Origin: directAttached}); err != nil {
			t.Fatal(err)
		}
	}
	for _, fam := range []struct {
		name          string
		pod, remote   netip.Addr
		probe         netip.Addr
		hopByHopTests bool
	}{{"ipv4", pod4, remote4, probe4, false}, {"ipv6", pod6, remote6, probe6, true}} {
		t.Run(fam.name, func(t *testing.T) {
			cases := []struct {
				name    string
				pkt     testPacket
				mark    uint32
				verdict uint32
				outMark uint32
				counter func(Counters) uint64
			}{
				{"syn is captured", testPacket{Src: ap(fam.pod, 41000), Dst: ap(fam.remote, 8080), Proto: protoTCP, Flags: syn}, 0, tcActRedirect, markFromEgress, nil},
				// prog.Run packets have no socket, so no proxy cgroup: the
				// mark alone is no credential (behaviour tests cover the
				// proxy's own sockets, which do leave).
				{"proxy-marked syn without proxy cgroup is captured", testPacket{Src: ap(fam.pod, 41001), Dst: ap(fam.remote, 8080), Proto: protoTCP, Flags: syn}, 0x539, tcActRedirect, markFromEgress, func(c Counters) uint64 { return c.MarkUntrusted }},
				{"proxy mark with other high bits is captured", testPacket{Src: ap(fam.pod, 41002), Dst: ap(fam.remote, 8080), Proto: protoTCP, Flags: syn}, 0x7000539, tcActRedirect, markFromEgress, func(c Counters) uint64 { return c.MarkUntrusted }},
				{"proxy-marked data without proxy cgroup is captured", testPacket{Src: ap(fam.pod, 41004), Dst: ap(fam.remote, 8080), Proto: protoTCP, Flags: ack, Payload: []byte("data")}, 0x539, tcActRedirect, markFromEgress, nil},
				{"proxy-marked bare ack of no captured flow leaves", testPacket{Src: ap(fam.pod, 41005), Dst: ap(fam.remote, 8080), Proto: protoTCP, Flags: ack}, 0x539, tcActOK, 0x539, nil},
				{"reply to probe leaves", testPacket{Src: ap(fam.pod, 8080), Dst: ap(fam.probe, 50000), Proto: protoTCP, Flags: syn | ack}, 0, tcActOK, 0, nil},
				{"flow open before attach leaves", testPacket{Src: ap(fam.pod, 40000), Dst: ap(fam.remote, 80), Proto: protoTCP, Flags: ack}, 0, tcActOK, 0, func(c Counters) uint64 { return c.Direct }},
				{"unknown non-syn is captured", testPacket{Src: ap(fam.pod, 40001), Dst: ap(fam.remote, 80), Proto: protoTCP, Flags: ack}, 0, tcActRedirect, markFromEgress, nil},
				{"udp 9999 untouched", testPacket{Src: ap(fam.pod, 5000), Dst: ap(fam.remote, 9999), Proto: protoUDP}, 0, tcActOK, 0, nil},
				{"udp 53 untouched without dns capture", testPacket{Src: ap(fam.pod, 5000), Dst: ap(fam.remote, 53), Proto: protoUDP}, 0, tcActOK, 0, nil},
				{"icmp untouched", testPacket{Src: ap(fam.pod, 0), Dst: ap(fam.remote, 0), Proto: protoICMP}, 0, tcActOK, 0, nil},
			}
			if fam.hopByHopTests {
				cases = append(cases, struct {
					name    string
					pkt     testPacket
					mark    uint32
					verdict uint32
					outMark uint32
					counter func(Counters) uint64
				}{"syn behind hop-by-hop header is captured", testPacket{Src: ap(fam.pod, 41003), Dst: ap(fam.remote, 8080), Proto: protoTCP, Flags: syn, HopByHop: true}, 0, tcActRedirect, markFromEgress, nil})
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					before := readCounters(t, o)
					verdict, _, mark := run(t, o.CaptureEgress, c.pkt.Bytes(), c.mark)
					if verdict != c.verdict {
						t.Errorf("verdict %d, want %d", verdict, c.verdict)
					}
					if mark != c.outMark {
						t.Errorf("mark %#x, want %#x", mark, c.outMark)
					}
					if c.counter != nil {
						after := readCounters(t, o)
						if c.counter(after) != c.counter(before)+1 {
							t.Errorf("counter moved %d -> %d, want +1", c.counter(before), c.counter(after))
						}
					}
				})
			}
		})
	}
}

// TestEgressDNS checks the DNS capture rewrite: the query is sent to the
// loopback resolver port with valid checksums and its original destination
// remembered, and dns_reply restores that destination as the reply's source.
func TestEgressDNS(t *testing.T) {
	o := loadTestObjects(t)
	setFlags(t, o, Options{DNSCapture: true})
	for _, fam := range []struct {
		name        string
		pod, remote netip.Addr
		loopback    netip.Addr
	}{
		{"ipv4", pod4, remote4, netip.MustParseAddr("127.0.0.1")},
		{"ipv6", pod6, remote6, netip.IPv6Loopback()},
	} {
		for _, proto := range []uint8{protoUDP, protoTCP} {
			name := fam.name + "/udp"
			if proto == protoTCP {
				name = fam.name + "/tcp"
			}
			t.Run(name, func(t *testing.T) {
				before := readCounters(t, o)
				q := testPacket{Src: ap(fam.pod, 33333), Dst: ap(fam.remote, 53), Proto: proto, Flags: tcpFlags(proto, syn), Payload: []byte("query")}
				verdict, out, _ := run(t, o.CaptureEgress, q.Bytes(), 0)
				if verdict != tcActRedirect {
					t.Fatalf("verdict %d, want redirect", verdict)
				}
				got := packettest.MustParse(t, out[:len(q.Bytes())])
				if got.Dst != ap(fam.loopback, 15053) || got.Src != q.Src {
					t.Errorf("rewritten to %s -> %s, want %s -> %s", got.Src, got.Dst, q.Src, ap(fam.loopback, 15053))
				}
				if !got.L3Valid || !got.L4Valid {
					t.Errorf("checksums after rewrite: ip %t l4 %t", got.L3Valid, got.L4Valid)
				}
				if !bytes.Equal(got.DstMAC, make([]byte, 6)) {
					t.Errorf("destination MAC %x, want lo's zero address", got.DstMAC)
				}
				if after := readCounters(t, o); after.CapturedDNS != before.CapturedDNS+1 {
					t.Errorf("captured_dns %d -> %d", before.CapturedDNS, after.CapturedDNS)
				}

				reply := testPacket{Src: ap(fam.loopback, 15053), Dst: q.Src, Proto: proto, Flags: tcpFlags(proto, syn|ack), Payload: []byte("answer")}
				verdict, out, _ = run(t, o.DnsReply, reply.Bytes(), 0x539)
				if verdict != tcActOK {
					t.Fatalf("reply verdict %d", verdict)
				}
				got = packettest.MustParse(t, out[:len(reply.Bytes())])
				if got.Src != q.Dst || got.Dst != q.Src {
					t.Errorf("reply %s -> %s, want %s -> %s", got.Src, got.Dst, q.Dst, q.Src)
				}
				if !got.L3Valid || !got.L4Valid {
					t.Errorf("reply checksums: ip %t l4 %t", got.L3Valid, got.L4Valid)
				}
			})
		}
	}
	// Proxy-marked DNS from no proxy cgroup is captured all the same (the
	// proxy's own upstream queries, from its cgroup, are covered by the
	// behaviour tests).
	q := testPacket{Src: ap(pod4, 33334), Dst: ap(remote4, 53), Proto: protoUDP, Payload: []byte("q")}
	if verdict, _, _ := run(t, o.CaptureEgress, q.Bytes(), 0x539); verdict != tcActRedirect {
		t.Errorf("marked DNS query without proxy cgroup: verdict %d, want redirect", verdict)
	}
	// A reply from 15053 with no recorded query is left alone.
	r := testPacket{Src: ap(netip.MustParseAddr("127.0.0.1"), 15053), Dst: ap(pod4, 1), Proto: protoUDP, Payload: []byte("a")}
	verdict, out, _ := run(t, o.DnsReply, r.Bytes(), 0)
	if got := packettest.MustParse(t, out[:len(r.Bytes())]); verdict != tcActOK || got.Src != r.Src {
		t.Errorf("unrelated reply: verdict %d src %s", verdict, got.Src)
	}
}

// TestIngressClassification runs capture_ingress in an empty netns: what
// passes untouched, and that captured connections with no proxy listener
// are dropped (fail closed) in both directions.
func TestIngressClassification(t *testing.T) {
	o := loadTestObjects(t)
	ns := freshNetns(t)
	for _, fam := range []struct {
		name                string
		pod, remote, probe4 netip.Addr
	}{{"ipv4", pod4, remote4, probe4}, {"ipv6", pod6, remote6, probe6}} {
		cases := []struct {
			name    string
			pkt     testPacket
			mark    uint32
			opts    Options
			verdict uint32
			counter func(Counters) uint64
		}{
			{"hbone passes", testPacket{Src: ap(fam.remote, 50000), Dst: ap(fam.pod, 15008), Proto: protoTCP, Flags: syn}, 0, Options{}, tcActOK, func(c Counters) uint64 { return c.HBONEIn }},
			{"probe passes", testPacket{Src: ap(fam.probe4, 50000), Dst: ap(fam.pod, 8080), Proto: protoTCP, Flags: syn}, 0, Options{}, tcActOK, func(c Counters) uint64 { return c.Bypassed }},
			{"bypass inbound passes", testPacket{Src: ap(fam.remote, 50001), Dst: ap(fam.pod, 8080), Proto: protoTCP, Flags: syn}, 0, Options{BypassInbound: true}, tcActOK, func(c Counters) uint64 { return c.Bypassed }},
			{"udp passes", testPacket{Src: ap(fam.remote, 50000), Dst: ap(fam.pod, 53), Proto: protoUDP}, 0, Options{}, tcActOK, nil},
			{"inbound without proxy is dropped", testPacket{Src: ap(fam.remote, 50002), Dst: ap(fam.pod, 8080), Proto: protoTCP, Flags: syn}, 0, Options{}, tcActShot, func(c Counters) uint64 { return c.DroppedNoListener }},
			{"outbound without proxy is dropped", testPacket{Src: ap(fam.pod, 41000), Dst: ap(fam.remote, 8080), Proto: protoTCP, Flags: syn}, markFromEgress, Options{}, tcActShot, func(c Counters) uint64 { return c.DroppedNoListener }},
			{"outbound non-syn without proxy socket is dropped", testPacket{Src: ap(fam.pod, 41000), Dst: ap(fam.remote, 8080), Proto: protoTCP, Flags: ack}, markFromEgress, Options{}, tcActShot, func(c Counters) uint64 { return c.DroppedNoFlow }},
		}
		for _, c := range cases {
			t.Run(fam.name+"/"+c.name, func(t *testing.T) {
				setFlags(t, o, c.opts)
				before := readCounters(t, o)
				verdict, _, _ := ns.run(t, o.CaptureIngress, c.pkt.Bytes(), c.mark)
				if verdict != c.verdict {
					t.Errorf("verdict %d, want %d", verdict, c.verdict)
				}
				if c.counter != nil {
					if after := readCounters(t, o); c.counter(after) != c.counter(before)+1 {
						t.Errorf("counter %d -> %d, want +1", c.counter(before), c.counter(after))
					}
				}
			})
		}
	}
	setFlags(t, o, Options{})

	// With a listener on 15006 present the inbound SYN is no longer
	// dropped for want of one: it reaches the assign step.
	var ln net.Listener
	var err error
	ns.Do(func() { ln, err = net.Listen("tcp", "[::]:15006") })
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	before := readCounters(t, o)
	pkt := testPacket{Src: ap(remote4, 50003), Dst: ap(pod4, 8080), Proto: protoTCP, Flags: syn}
	ns.run(t, o.CaptureIngress, pkt.Bytes(), 0)
	after := readCounters(t, o)
	if after.DroppedNoListener != before.DroppedNoListener {
		t.Errorf("listener on 15006 not found by the lookup")
	}
	if after.CapturedIn+after.AssignFailed != before.CapturedIn+before.AssignFailed+1 {
		t.Errorf("inbound SYN neither assigned nor counted as failed assign: %+v", after)
	}
}
