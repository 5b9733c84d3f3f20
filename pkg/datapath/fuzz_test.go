//go:build linux

package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/packettest"
)

// Legal verdicts of a TC program: TC_ACT_UNSPEC (tcx: TCX_NEXT), OK, SHOT
// and REDIRECT. The others (RECLASSIFY, PIPE, STOLEN, QUEUED, REPEAT,
// TRAP) would mean something else on clsact and tcx alike, and these
// programs never mean them.
var legalVerdicts = map[int32]bool{-1: true, tcActOK: true, tcActShot: true, tcActRedirect: true}

const (
	etherIPv4 = 0x0800
	etherIPv6 = 0x86dd
	// maxFuzzPacket keeps packets within what BPF_PROG_TEST_RUN accepts
	// for an skb (a page less headroom).
	maxFuzzPacket = 1514
)

// netnsRunner runs functions on one OS thread moved into a fresh, empty
// network namespace, so the programs' socket lookups see no socket of
// the machine. It lives until the fuzz target ends.
type netnsRunner chan func()

func newNetnsRunner(tb testing.TB) netnsRunner {
	r := make(netnsRunner)
	ready := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		err := unix.Unshare(unix.CLONE_NEWNET)
		if err == nil {
			var lo netlink.Link
			if lo, err = netlink.LinkByIndex(1); err == nil {
				err = netlink.LinkSetUp(lo)
			}
		}
		ready <- err
		if err != nil {
			return
		}
		for fn := range r {
			fn()
		}
	}()
	if err := <-ready; err != nil {
		tb.Fatalf("fresh netns: %v", err)
	}
	tb.Cleanup(func() { close(r) })
	return r
}

func (r netnsRunner) do(fn func()) {
	done := make(chan struct{})
	r <- func() { defer close(done); fn() }
	<-done
}

// FuzzCapturePrograms runs random bytes through the capture programs with
// BPF_PROG_TEST_RUN (prog.Run), under every combination of the pod
// options. Properties: the kernel runs every packet of Ethernet size; the
// verdict is a legal TC verdict; a frame that is not IPv4 or IPv6 passes
// unchanged with its mark; only IP packets are redirected. A panic, an
// out-of-bounds access (the verifier would have refused the program,
// so a load failure also fails) or a hang shows as a failure. Reference
// leaks (sockets looked up and not released) cannot happen at run time:
// the verifier rejects a program that could leak one, and the programs
// are loaded here by the same code as in production.
func FuzzCapturePrograms(f *testing.F) {
	if os.Geteuid() != 0 {
		f.Skip("needs root: loads BPF programs into the kernel")
	}
	for _, p := range []packettest.Packet{
		{Src: ap(pod4, 41000), Dst: ap(remote4, 8080), Proto: protoTCP, Flags: syn},
		{Src: ap(remote4, 41000), Dst: ap(pod4, 8080), Proto: protoTCP, Flags: syn},
		{Src: ap(pod6, 41000), Dst: ap(remote6, 8080), Proto: protoTCP, Flags: ack, HopByHop: true},
		{Src: ap(remote6, 41000), Dst: ap(pod6, 15008), Proto: protoTCP, Flags: syn},
		{Src: ap(pod4, 5353), Dst: ap(remote4, 53), Proto: protoUDP, Payload: []byte{0, 1, 1, 0, 0, 1}},
		{Src: ap(probe4, 1), Dst: ap(pod4, 8080), Proto: protoTCP, Flags: syn},
		{Src: ap(pod6, 0), Dst: ap(remote6, 0), Proto: protoICMP},
	} {
		b := p.Bytes()
		for prog := range uint8(3) {
			f.Add(b, uint32(0), prog, uint8(prog))
		}
		f.Add(b[:len(b)-3], uint32(0x539), uint8(0), uint8(0)) // truncated
	}
	f.Add([]byte{0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1}, uint32(0), uint8(1), uint8(0)) // ARP

	o := loadTestObjects(f)
	progs := []*ebpf.Program{o.CaptureEgress, o.CaptureIngress, o.DnsReply}
	ns := newNetnsRunner(f)

	f.Fuzz(func(t *testing.T, pkt []byte, mark uint32, which, flags uint8) {
		if len(pkt) < 14 {
			return // BPF_PROG_TEST_RUN refuses less than an Ethernet header
		}
		if len(pkt) > maxFuzzPacket {
			pkt = pkt[:maxFuzzPacket]
		}
		prog := progs[int(which)%len(progs)]
		opts := optionsFromFlags(captureCfgFlag(flags))
		var res packettest.Result
		var runErr error
		ns.do(func() {
			if runErr = o.PodConfig.Put(uint32(0), captureConfig{Flags: optionFlags(opts), DirectMax: o.DirectFlows.MaxEntries()}); runErr == nil {
				res, runErr = packettest.Run(prog, pkt, mark)
			}
		})
		if runErr != nil {
			// Newer kernels refuse to build an skb whose IP header is cut
			// short; the device would never deliver one either.
			if errors.Is(runErr, unix.EINVAL) && truncatedIPHeader(pkt) {
				return
			}
			t.Fatalf("%s on % x: %v", prog, pkt, runErr)
		}
		if !legalVerdicts[int32(res.Verdict)] {
			t.Fatalf("%s on % x (mark %#x, %+v): verdict %d is not a TC verdict", prog, pkt, mark, opts, int32(res.Verdict))
		}
		// IP, also behind 802.1Q / 802.1ad tags, is classified; anything
		// else must pass untouched.
		switch binary.BigEndian.Uint16(pkt[12:]) {
		case etherIPv4, etherIPv6, 0x8100, 0x88a8:
			return
		}
		if res.Verdict != tcActOK || res.Mark != mark || !bytes.Equal(res.Out, pkt) {
			t.Fatalf("%s on a non-IP frame % x: verdict %d, mark %#x -> %#x, changed=%v",
				prog, pkt, int32(res.Verdict), mark, res.Mark, !bytes.Equal(res.Out, pkt))
		}
	})
}

// truncatedIPHeader reports a frame whose ethertype is IPv4 or IPv6 but
// which is too short for that header.
func truncatedIPHeader(pkt []byte) bool {
	switch binary.BigEndian.Uint16(pkt[12:]) {
	case etherIPv4:
		return len(pkt) < 14+20
	case etherIPv6:
		return len(pkt) < 14+40
	}
	return false
}
