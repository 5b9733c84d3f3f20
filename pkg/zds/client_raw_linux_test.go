//go:build linux

package zds

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/netns"
)

// Bytes istio-cni sends, written out by hand from the spec's field numbers
// rather than produced by our encoder.
var (
	// WorkloadRequest{add: AddWorkload{uid: "u1", workload_info:
	// WorkloadInfo{name: "web", namespace: "ns", service_account: "sa"}}}
	cniAddU1 = []byte{
		0x0a, 0x13, // field 1 (add), 19 bytes
		0x0a, 0x02, 'u', '1', // uid
		0x12, 0x0d, // field 2 (workload_info), 13 bytes
		0x0a, 0x03, 'w', 'e', 'b', // name
		0x12, 0x02, 'n', 's', // namespace
		0x1a, 0x02, 's', 'a', // service_account
	}
	cniAddU2 = []byte{0x0a, 0x0a, 0x0a, 0x02, 'u', '2', 0x12, 0x04, 0x0a, 0x02, 'w', '2'}
	// Add u3 with no workload_info.
	cniAddNoInfo   = []byte{0x0a, 0x04, 0x0a, 0x02, 'u', '3'}
	cniKeepU1      = []byte{0x2a, 0x04, 0x0a, 0x02, 0x75, 0x31}
	cniDelU1       = []byte{0x12, 0x04, 0x12, 0x02, 0x75, 0x31}
	cniSnapshotEnd = []byte{0x1a, 0x00}
	ackOK          = []byte{0x0a, 0x00}
)

// expectOK reads a response and checks it is exactly ack OK.
func (p *rawPeer) expectOK(what string) {
	p.t.Helper()
	if b := p.recv(); string(b) != string(ackOK) {
		p.t.Fatalf("%s: got % x, want ack OK 0a 00", what, b)
	}
}

func (p *rawPeer) expectNack(what, contains string) {
	p.t.Helper()
	reason := p.expectAck()
	if reason == "" || !strings.Contains(reason, contains) {
		p.t.Fatalf("%s: ack %q, want a nack containing %q", what, reason, contains)
	}
}

// rawAgentSession accepts the client, checks its hello and plays a
// snapshot of Keep u1 + Add u2 that the client must ack byte for byte.
func rawAgentSession(t *testing.T, accept func() *rawPeer) *rawPeer {
	t.Helper()
	p := accept()
	if b := p.recv(); string(b) != "\x08\x01" {
		t.Fatalf("hello: got % x, want 08 01", b)
	}
	p.send(cniKeepU1)
	p.expectOK("keep u1")
	p.send(cniAddU2, openFile(t, selfNetns))
	p.expectOK("add u2")
	p.send(cniSnapshotEnd)
	p.expectOK("snapshot sent")
	return p
}

// startRawSession starts a client with a fake handler against a raw
// agent that has played rawAgentSession's snapshot; the test fails at
// cleanup if file descriptors leaked. done is the client's Run result.
func startRawSession(t *testing.T) (cl *Client, done <-chan error, h *fakeHandler, p *rawPeer) {
	t.Helper()
	checkNoFDLeak(t)
	path := sockPath(t)
	accept := rawListen(t, path)
	h = newFakeHandler()
	cl, done, _ = startClient(t, path, h)
	return cl, done, h, rawAgentSession(t, accept)
}

// TestClientAgainstIstioCNI drives the client with istio-cni's bytes.
func TestClientAgainstIstioCNI(t *testing.T) {
	cl, _, h, p := startRawSession(t)

	if !cl.Ready() {
		t.Error("client not ready after the snapshot")
	}
	h.mu.Lock()
	if len(h.keeps) != 1 || h.keeps[0] != "u1" || len(h.reconciles) != 1 || !h.reconciles[0]["u1"] || !h.reconciles[0]["u2"] {
		t.Errorf("keeps %v, reconciles %v", h.keeps, h.reconciles)
	}
	h.mu.Unlock()

	p.send(cniAddU1, openFile(t, selfNetns))
	p.expectOK("add u1")
	if !h.isRunning("u1") || !h.isRunning("u2") {
		t.Fatalf("running %v, want u1 and u2", h.running)
	}
	p.send(cniDelU1)
	p.expectOK("del u1")
	if h.isRunning("u1") || h.count(h.dels, "u1") != 1 {
		t.Errorf("u1 still running after Del")
	}
}

// TestClientRejectsBadDatagrams sends malformed, oversized and wrongly
// fd-carrying datagrams: each is nacked, the connection stays up and
// running pods are untouched.
func TestClientRejectsBadDatagrams(t *testing.T) {
	_, _, h, p := startRawSession(t)
	ns := openFile(t, selfNetns)
	notNetns := openFile(t, "/proc/self/status")

	cases := []struct {
		name     string
		msg      []byte
		files    []*os.File
		contains string
	}{
		{"garbage", []byte{0xff, 0xff, 0xff}, nil, "malformed"},
		{"no known member", []byte{0x20, 0x01}, nil, "no known payload"},
		{"oversized", append(append([]byte{}, cniDelU1...), make([]byte, 2000)...), nil, "truncated"},
		{"add without fd", cniAddU1, nil, "want 1 netns fd, got 0"},
		{"add with two fds", cniAddU1, []*os.File{ns, ns}, "want 1 netns fd, got 2"},
		{"add with a non-netns fd", cniAddU1, []*os.File{notNetns}, "namespace"},
		{"del with fd", cniDelU1, []*os.File{ns}, "del carried 1 file descriptors"},
		{"keep with fd", cniKeepU1, []*os.File{ns}, "keep carried"},
		{"too many fds", cniAddU1, []*os.File{ns, ns, ns, ns, ns, ns, ns, ns, ns, ns, ns, ns}, "truncated"},
	}
	for _, c := range cases {
		p.send(c.msg, c.files...)
		p.expectNack(c.name, c.contains)
	}
	if !h.isRunning("u2") || h.count(h.dels, "u2") != 0 || h.isRunning("u1") {
		t.Errorf("pod state changed by bad datagrams: running %v", h.running)
	}
	// Still connected and working.
	p.send(cniAddU1, ns)
	p.expectOK("add u1 after bad datagrams")
	if !h.isRunning("u1") {
		t.Error("u1 not running")
	}
}

// TestClientProtocolErrors: requests the protocol forbids are nacked and
// stop the client, leaving running pods alone.
func TestClientProtocolErrors(t *testing.T) {
	cases := []struct {
		name     string
		msg      []byte
		contains string
	}{
		{"keep after snapshot", cniKeepU1, "keep u1 after snapshot"},
		{"second snapshot sent", cniSnapshotEnd, "second snapshot_sent"},
		{"add without workload_info", cniAddNoInfo, "without workload_info"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, done, h, p := startRawSession(t)
			p.send(c.msg, fdsFor(t, c.msg)...)
			p.expectNack(c.name, c.contains)
			var perr *ProtocolError
			if err := <-done; !errors.As(err, &perr) {
				t.Fatalf("Run returned %v, want a ProtocolError", err)
			}
			p.expectEOF()
			if !h.isRunning("u2") || h.count(h.dels, "u2") != 0 || h.reconcileCount() != 1 {
				t.Errorf("pods touched after a protocol error: running %v", h.running)
			}
		})
	}
}

// fdsFor gives an Add the netns fd it needs, so that only the error under
// test is present.
func fdsFor(t *testing.T, msg []byte) []*os.File {
	if msg[0] == 0x0a {
		return []*os.File{openFile(t, selfNetns)}
	}
	return nil
}

// TestClientReconnectsWithBackoff: the client keeps dialing until the
// agent appears, and dials again after the agent goes away.
func TestClientReconnectsWithBackoff(t *testing.T) {
	checkNoFDLeak(t)
	path := sockPath(t)
	h := newFakeHandler()
	cl, _, _ := startClient(t, path, h)
	// Nobody listens yet: the client retries in the background.
	accept := rawListen(t, path)
	p := rawAgentSession(t, accept)
	p.close()
	p2 := accept()
	if b := p2.recv(); string(b) != "\x08\x01" {
		t.Fatalf("hello after reconnect: % x", b)
	}
	// After a reconnect the pods still run, but the client is neither
	// synced nor ready until the new snapshot ends: the agent may have
	// enrolled pods meanwhile.
	if cl.Ready() || cl.Synced() || !h.isRunning("u2") {
		t.Errorf("ready %v, synced %v, u2 running %v after reconnect", cl.Ready(), cl.Synced(), h.isRunning("u2"))
	}
	waited := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		waited <- cl.WaitSynced(ctx)
	}()
	// A snapshot without u2 tears it down.
	p2.send(cniSnapshotEnd)
	p2.expectOK("snapshot sent")
	if h.isRunning("u2") {
		t.Error("u2 still running after a snapshot without it")
	}
	if err := <-waited; err != nil || !cl.Ready() {
		t.Errorf("after the new snapshot: WaitSynced %v, ready %v", err, cl.Ready())
	}
}

func bindRaw(fd int, path string) error {
	return unix.Bind(fd, &unix.SockaddrUnix{Name: path})
}

// recvmsg is a blocking recvmsg(2) on a test peer's socket, retried when
// a signal interrupts it: the sockets have SO_RCVTIMEO, and a receive
// with a timeout is never restarted after a signal (signal(7)), so the Go
// runtime's preemption signals can make it fail with EINTR.
func recvmsg(fd int, buf, oob []byte) (n, oobn, flags int, from unix.Sockaddr, err error) {
	for {
		n, oobn, flags, from, err = unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != unix.EINTR {
			return n, oobn, flags, from, err
		}
	}
}

// rightsOf returns the descriptors of SCM_RIGHTS control messages.
func rightsOf(t *testing.T, oob []byte) []*os.File {
	t.Helper()
	files, err := parseRights(oob)
	if err != nil {
		closeAll(files)
		t.Fatal(err)
	}
	return files
}

func fdID(t *testing.T, f *os.File) netns.ID {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return netns.ID{Dev: st.Dev, Ino: st.Ino}
}
