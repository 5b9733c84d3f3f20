//go:build linux

package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/packettest"
)

const (
	fin = packettest.FIN
	rst = packettest.RST
)

// directEntry reads a flow's direct_flows entry; ok is false without one.
func directEntry(t *testing.T, m *ebpf.Map, f captureFlow) (v captureDirectFlow, ok bool) {
	t.Helper()
	err := m.Lookup(f, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return v, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return v, true
}

// directFlowCase drives one direct flow through capture_egress (what the
// pod sends) and capture_ingress (what its peer sends), in a fresh netns.
type directFlowCase struct {
	t         *testing.T
	o         *objects
	ns        *netnsWorker
	pod, peer netip.AddrPort
	key       captureFlow
}

func newDirectFlow(t *testing.T, o *objects, ns *netnsWorker, pod, peer netip.AddrPort) *directFlowCase {
	return &directFlowCase{t: t, o: o, ns: ns, pod: pod, peer: peer, key: flowKey(pod.Addr(), pod.Port(), peer.Addr(), peer.Port())}
}

// record stores the flow as the loader does for one open at attach,
// expiring at expires (monotonic ns).
func (d *directFlowCase) record(expires uint64) {
	d.t.Helper()
	if err := d.o.DirectFlows.Put(d.key, captureDirectFlow{ExpiresNs: expires, Origin: directAttached}); err != nil {
		d.t.Fatal(err)
	}
}

// out runs a packet with flags from the pod and returns the verdict.
func (d *directFlowCase) out(flags byte) uint32 {
	d.t.Helper()
	v, _, _ := d.ns.run(d.t, d.o.CaptureEgress, testPacket{Src: d.pod, Dst: d.peer, Flags: flags}.Bytes(), 0)
	return v
}

// in runs a packet with flags and seq from the peer and returns the verdict.
func (d *directFlowCase) in(flags byte, seq uint32) uint32 {
	d.t.Helper()
	v, _, _ := d.ns.run(d.t, d.o.CaptureIngress, testPacket{Src: d.peer, Dst: d.pod, Flags: flags, Seq: seq}.Bytes(), 0)
	return v
}

// leavesDirect checks that a packet the pod sends in the flow leaves
// directly (want) or is sent into ingress for the proxy (!want).
func (d *directFlowCase) leavesDirect(flags byte, want bool) {
	d.t.Helper()
	v := d.out(flags)
	if want && v != tcActOK {
		d.t.Errorf("pod's packet (flags %#x) of the direct flow: verdict %d, want it to leave (ok)", flags, v)
	}
	if !want && v != tcActRedirect {
		d.t.Errorf("pod's packet (flags %#x): verdict %d, want redirect to the proxy (not a direct flow)", flags, v)
	}
}

func (d *directFlowCase) entry() (captureDirectFlow, bool) {
	d.t.Helper()
	return directEntry(d.t, d.o.DirectFlows, d.key)
}

// TestDirectFlowLifecycle: direct_flows entries expire on FIN from both
// sides, go at once on the pod's RST or on an RST from the peer that the
// pod's socket accepts (not on a blind one), age out, and a SYN on the
// 4-tuple of a stale entry is a new, captured connection.
func TestDirectFlowLifecycle(t *testing.T) {
	o := loadTestObjects(t)
	ns := freshNetns(t)
	now := monotonicNow()
	for _, fam := range []struct {
		name      string
		pod, peer netip.Addr
	}{{"ipv4", pod4, remote4}, {"ipv6", pod6, remote6}} {
		t.Run(fam.name+"/fin from both sides", func(t *testing.T) {
			d := newDirectFlow(t, o, ns, ap(fam.pod, 40100), ap(fam.peer, 80))
			d.record(now + uint64(directIdle))
			d.leavesDirect(ack, true)
			d.leavesDirect(fin|ack, true)
			if v, ok := d.entry(); !ok || v.FinOut != 1 || v.ExpiresNs < monotonicNow()+uint64(time.Hour) {
				t.Fatalf("after the pod's FIN: %+v (present %t), want fin_out and the idle expiry", v, ok)
			}
			d.in(fin|ack, 5000)
			d.leavesDirect(ack, true) // the last ACK still leaves
			v, ok := d.entry()
			if !ok || v.FinIn != 1 || v.ExpiresNs > monotonicNow()+60e9 {
				t.Fatalf("after both FINs: %+v (present %t), want fin_in and expiry within 60 s", v, ok)
			}
			// Once that passed, the flow is over: its packets are no longer direct.
			d.record(monotonicNow() - 1)
			d.leavesDirect(ack, false)
			if _, ok := d.entry(); ok {
				t.Error("expired entry not deleted on lookup")
			}
		})
		t.Run(fam.name+"/rst from the pod", func(t *testing.T) {
			d := newDirectFlow(t, o, ns, ap(fam.pod, 40101), ap(fam.peer, 80))
			d.record(now + uint64(directIdle))
			d.leavesDirect(rst|ack, true)
			if _, ok := d.entry(); ok {
				t.Error("entry kept after the pod's RST")
			}
			d.leavesDirect(ack, false)
		})
		t.Run(fam.name+"/rst from the peer, no socket", func(t *testing.T) {
			d := newDirectFlow(t, o, ns, ap(fam.pod, 40102), ap(fam.peer, 80))
			d.record(now + uint64(directIdle))
			d.in(rst, 1)
			if _, ok := d.entry(); ok {
				t.Error("entry kept after an RST for a flow no socket owns")
			}
		})
		t.Run(fam.name+"/aging", func(t *testing.T) {
			d := newDirectFlow(t, o, ns, ap(fam.pod, 40103), ap(fam.peer, 80))
			d.record(monotonicNow() - 1)
			d.leavesDirect(ack, false)
			if _, ok := d.entry(); ok {
				t.Error("expired entry not deleted")
			}
			// A live one is refreshed by what the pod sends.
			d.record(monotonicNow() + uint64(time.Minute))
			d.leavesDirect(ack, true)
			if v, _ := d.entry(); v.ExpiresNs < monotonicNow()+uint64(time.Hour) {
				t.Errorf("expiry not refreshed to the idle timeout: %d", v.ExpiresNs)
			}
		})
		t.Run(fam.name+"/stale entry and a new outbound connection", func(t *testing.T) {
			d := newDirectFlow(t, o, ns, ap(fam.pod, 40104), ap(fam.peer, 80))
			d.record(now + uint64(directIdle))
			d.leavesDirect(syn, false) // a new connection: captured
			if _, ok := d.entry(); ok {
				t.Error("SYN left the stale entry")
			}
			d.leavesDirect(ack, false)
		})
		t.Run(fam.name+"/stale entry and a new inbound connection", func(t *testing.T) {
			d := newDirectFlow(t, o, ns, ap(fam.pod, 8080), ap(fam.peer, 40105))
			d.record(now + uint64(directIdle))
			if v := d.in(syn, 1); v != tcActShot { // captured: no proxy listener here
				t.Errorf("inbound SYN: verdict %d, want drop for want of a listener", v)
			}
			if _, ok := d.entry(); ok {
				t.Error("inbound SYN for a 4-tuple no socket owns left the stale entry")
			}
			d.leavesDirect(syn|ack, false)
		})
	}

	// With a live socket owning the flow, a blind RST (wrong seq) or
	// SYN from the peer leaves its entry alone, an exact RST removes it.
	t.Run("live socket", func(t *testing.T) {
		client, server := loopbackPair(t, ns, pod4, remote4)
		defer client.Close()
		defer server.Close()
		d := newDirectFlow(t, o, ns, client.LocalAddr().(*net.TCPAddr).AddrPort(), server.LocalAddr().(*net.TCPAddr).AddrPort())
		d.key = flowKey(d.pod.Addr().Unmap(), d.pod.Port(), d.peer.Addr().Unmap(), d.peer.Port())
		d.pod = netip.AddrPortFrom(d.pod.Addr().Unmap(), d.pod.Port())
		d.peer = netip.AddrPortFrom(d.peer.Addr().Unmap(), d.peer.Port())
		d.record(now + uint64(directIdle))
		rcvNxt := receiveNext(t, client)
		d.in(rst, rcvNxt+12345)
		d.in(syn, 1)
		if _, ok := d.entry(); !ok {
			t.Fatal("a blind RST or SYN removed a live flow's entry")
		}
		d.leavesDirect(ack, true)
		d.in(rst, rcvNxt)
		if _, ok := d.entry(); ok {
			t.Error("an RST the socket accepts (seq = rcv_nxt) left the entry")
		}
	})
}

// loopbackPair connects a TCP client bound to local to a server on
// remote, both addresses added to lo of the worker's netns.
func loopbackPair(t *testing.T, ns *netnsWorker, local, remote netip.Addr) (client, server net.Conn) {
	t.Helper()
	var err error
	ns.Do(func() {
		var lo netlink.Link
		if lo, err = netlink.LinkByIndex(1); err != nil {
			return
		}
		for _, a := range []netip.Addr{local, remote} {
			addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}}
			if err = netlink.AddrAdd(lo, addr); err != nil {
				err = fmt.Errorf("add %s to lo: %w", a, err)
				return
			}
		}
		var ln *net.TCPListener
		if ln, err = net.ListenTCP("tcp", &net.TCPAddr{IP: remote.AsSlice()}); err != nil {
			return
		}
		defer ln.Close()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: local.AsSlice()}, Timeout: 2 * time.Second}
		if client, err = d.Dial("tcp", ln.Addr().String()); err != nil {
			return
		}
		server, err = ln.Accept()
	})
	if err != nil {
		t.Fatal(err)
	}
	return client, server
}

// tcpRecvQueue is TCP_RECV_QUEUE (include/uapi/linux/tcp.h), for TCP_REPAIR_QUEUE.
const tcpRecvQueue = 1

// receiveNext reads the next sequence number a socket expects, through
// TCP repair mode (CAP_NET_ADMIN), and leaves repair mode again.
func receiveNext(t *testing.T, c net.Conn) uint32 {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var seq int
	var serr error
	err = raw.Control(func(fd uintptr) {
		s := int(fd)
		if serr = unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); serr != nil {
			return
		}
		defer unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF)
		if serr = unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpRecvQueue); serr != nil {
			return
		}
		seq, serr = unix.GetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		t.Fatalf("read rcv_nxt with TCP_REPAIR: %v", err)
	}
	return uint32(seq)
}

// TestDirectFlowFlood: with bypass-inbound, a flood of inbound SYNs from
// distinct ports (many times the maps' sizes) neither evicts a live direct
// flow nor an attach-time one; with direct_flows full a new bypassed flow
// is not recorded (direct_full) and its packets are taken for captured
// ones, while the flows already there keep working.
func TestDirectFlowFlood(t *testing.T) {
	o := loadTestObjects(t)
	setFlags(t, o, Options{BypassInbound: true})
	ns := freshNetns(t)
	attached := newDirectFlow(t, o, ns, ap(pod4, 40200), ap(remote4, 80))
	attached.record(monotonicNow() + uint64(directIdle))

	// A bypassed inbound connection: SYN in, SYN-ACK out, then the
	// pod's first ACK makes it a direct flow.
	live := newDirectFlow(t, o, ns, ap(pod4, 8080), ap(remote4, 50000))
	if v := live.in(syn, 1); v != tcActOK {
		t.Fatalf("bypassed SYN: verdict %d", v)
	}
	live.leavesDirect(syn|ack, true)
	live.leavesDirect(ack, true)
	if v, ok := live.entry(); !ok || v.Origin != directInbound {
		t.Fatalf("bypassed flow after the handshake: %+v (present %t), want an inbound entry", v, ok)
	}

	pendingMax := int(o.InboundPending.MaxEntries())
	flood := 4 * (int(o.DirectFlows.MaxEntries()) + pendingMax)
	start := time.Now()
	for i := range flood {
		p := testPacket{Src: ap(remote4, uint16(1024+i%60000)), Dst: ap(pod4, uint16(8081+i/60000)), Flags: syn}
		if v, _, _ := ns.run(t, o.CaptureIngress, p.Bytes(), 0); v != tcActOK {
			t.Fatalf("flood SYN %d: verdict %d", i, v)
		}
	}
	t.Logf("%d SYNs in %v", flood, time.Since(start))
	live.leavesDirect(ack, true)
	attached.leavesDirect(ack, true)

	// Fill direct_flows to the brim, as flows that are still open.
	var keys []captureFlow
	var vals []captureDirectFlow
	for i := 0; len(keys) < int(o.DirectFlows.MaxEntries())-2; i++ {
		keys = append(keys, flowKey(pod4, uint16(1+i%60000), remote6, uint16(1+i/60000)))
		vals = append(vals, captureDirectFlow{ExpiresNs: monotonicNow() + uint64(directIdle), Origin: directAttached})
	}
	if _, err := o.DirectFlows.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatal(err)
	}
	before := readCounters(t, o)
	late := newDirectFlow(t, o, ns, ap(pod4, 8080), ap(remote4, 50001))
	late.in(syn, 1)
	late.leavesDirect(syn|ack, true)
	late.leavesDirect(ack, false) // not recorded: not direct (fail closed)
	if after := readCounters(t, o); after.DirectFull != before.DirectFull+1 {
		t.Errorf("direct_full %d -> %d, want +1", before.DirectFull, after.DirectFull)
	}
	live.leavesDirect(ack, true)
	attached.leavesDirect(ack, true)
}

// TestExpireFlows: the loader's sweep deletes expired entries and keeps
// the others.
func TestExpireFlows(t *testing.T) {
	o := loadTestObjects(t)
	now := monotonicNow()
	for i, exp := range []uint64{now - 1, now + uint64(time.Hour), 1, now + 10} {
		if err := o.DirectFlows.Put(flowKey(pod4, uint16(100+i), remote4, 80), captureDirectFlow{ExpiresNs: exp}); err != nil {
			t.Fatal(err)
		}
	}
	n, err := expireFlows(o.DirectFlows, now, nil)
	if err != nil || n != 2 {
		t.Fatalf("expireFlows = %d, %v; want 2 deleted", n, err)
	}
	for i, want := range []bool{false, true, false, true} {
		if _, ok := directEntry(t, o.DirectFlows, flowKey(pod4, uint16(100+i), remote4, 80)); ok != want {
			t.Errorf("entry %d present %t, want %t", i, ok, want)
		}
	}
	if _, err := (&Loader{root: t.TempDir()}).ExpireFlows("nopod"); !errors.Is(err, ErrNotAttached) {
		t.Errorf("ExpireFlows of an unknown pod: %v, want ErrNotAttached", err)
	}
}

// TestSockstatInUse: the per-namespace TCP socket count is read from the
// sockstat formats.
func TestSockstatInUse(t *testing.T) {
	v4 := "sockets: used 159\nTCP: inuse 142 orphan 6 tw 91 alloc 148 mem 0\nUDP: inuse 0 mem 0\n"
	v6 := "TCP6: inuse 3\nUDP6: inuse 0\n"
	if n, err := sockstatInUse(v4, "TCP:"); n != 142 || err != nil {
		t.Errorf("v4: %d %v, want 142", n, err)
	}
	if n, err := sockstatInUse(v6, "TCP6:"); n != 3 || err != nil {
		t.Errorf("v6: %d %v, want 3", n, err)
	}
	if _, err := sockstatInUse("UDP: inuse 0\n", "TCP:"); err == nil {
		t.Error("no TCP line: no error")
	}
}

// TestDirectFlowPodShare: a pod holds at most its share of the node's
// direct_flows (config.direct_max): bypassed flows past it are refused
// (direct_full, fail closed), and a flow that ends gives its room back.
func TestDirectFlowPodShare(t *testing.T) {
	o := loadTestObjects(t)
	const share = 3
	if err := o.PodConfig.Put(uint32(0), captureConfig{Flags: optionFlags(Options{BypassInbound: true}), DirectMax: share}); err != nil {
		t.Fatal(err)
	}
	ns := freshNetns(t)
	entries := func() int64 {
		t.Helper()
		var c captureCounters
		if err := o.PodCounters.Lookup(uint32(0), &c); err != nil {
			t.Fatal(err)
		}
		return c.DirectEntries
	}
	bypassed := func(port uint16, recorded bool) *directFlowCase {
		t.Helper()
		d := newDirectFlow(t, o, ns, ap(pod4, 8080), ap(remote4, port))
		if v := d.in(syn, 1); v != tcActOK {
			t.Fatalf("bypassed SYN from %d: verdict %d", port, v)
		}
		d.leavesDirect(syn|ack, true)
		d.leavesDirect(ack, recorded)
		return d
	}
	var flows []*directFlowCase
	for i := range share {
		flows = append(flows, bypassed(uint16(51000+i), true))
	}
	before := readCounters(t, o)
	bypassed(51100, false) // past the share: not recorded
	if after := readCounters(t, o); after.DirectFull != before.DirectFull+1 {
		t.Errorf("direct_full %d -> %d, want +1 past the pod's share", before.DirectFull, after.DirectFull)
	}
	if got := entries(); got != share {
		t.Errorf("direct_entries %d, want %d", got, share)
	}
	// The pod resets one: its entry goes, and so does its count.
	if v := flows[0].out(rst | ack); v != tcActOK {
		t.Fatalf("pod's RST: verdict %d", v)
	}
	if got := entries(); got != share-1 {
		t.Errorf("direct_entries after the RST %d, want %d", got, share-1)
	}
	bypassed(51101, true) // room again
	for _, d := range flows[1:] {
		d.leavesDirect(ack, true)
	}
}
