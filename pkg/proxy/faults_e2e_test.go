//go:build linux

package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestAgentKillRestartKeepsTraffic kills the agent with SIGKILL under load
// (a new connection from A to B every 10 ms, 10 long-lived ones pinging
// every 100 ms) and starts it again. The datapath stays in its pins and
// the proxy keeps serving, so every connection and every ping must
// succeed. A pod created while the agent is down (its CNI ADD is refused
// with "try again later" and the runtime retries, as the loop here does)
// must be enrolled and served once the agent is back. No plaintext may
// cross the wire.
func TestAgentKillRestartKeepsTraffic(t *testing.T) {
	m := newMeshNode(t, 3)
	agent := m.startAgent()
	proxy := m.startProxy(0)
	a, b, c := m.lab.Pod(0), m.lab.Pod(1), m.lab.Pod(2)
	id := agenttest.RandomID()
	m.enroll(0, "a-"+id)
	m.enroll(1, "b-"+id)
	m.app(1, "b")
	m.app(2, "c")
	addr := fmt.Sprintf("%s:%d", b.IPv4, nettest.AppPort)
	greeting := "app b peer=" + a.IPv4.String()
	capture := m.capture()
	long := startLongLived(t, a, addr, greeting, 10, 100*time.Millisecond)
	load := startCanaryLoad(t, a, addr, greeting)
	load.waitSuccessAfter(t, time.Now(), "a connection before the kill", proxy)

	agent.kill(t)
	killed := time.Now()
	// The runtime retries the new pod's CNI ADD until the agent answers.
	uidC := "c-" + id
	enrolled := make(chan error, 1)
	var refused int
	go func() {
		req := agentapi.EnrollRequest{UID: uidC, Name: c.Name, Namespace: "ns-" + c.Name, ServiceAccount: "sa", Netns: c.NSPath}
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, err := m.ae.Client.Enroll(context.Background(), req)
			var ae *agentapi.Error
			if err == nil || errors.As(err, &ae) || time.Now().After(deadline) {
				enrolled <- err
				return
			}
			refused++
			time.Sleep(50 * time.Millisecond)
		}
	}()
	t.Cleanup(func() { m.ae.Client.Unenroll(context.Background(), uidC) })
	okBefore := load.ok.Load()
	agenttest.WaitFor(t, 10*time.Second, "100 connections with the agent down", func() bool { return load.ok.Load() >= okBefore+100 })

	m.startAgent()
	restarted := time.Now()
	if err := <-enrolled; err != nil {
		t.Fatalf("enrol the pod created while the agent was down: %v", err)
	}
	if refused == 0 {
		t.Fatal("the new pod's enrolment was never refused: the agent was not down")
	}
	m.waitState(uidC, agentapi.StateEnabled, 10*time.Second)
	conn, err := nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) {
		return a.Dial(ctx, "tcp", fmt.Sprintf("%s:%d", c.IPv4, nettest.AppPort))
	})
	if err != nil || conn.Greeting != "app c peer="+a.IPv4.String() {
		t.Fatalf("A to the pod enrolled after the restart: %v, greeting %q", err, conn.Greeting)
	}
	conn.Close()
	okBefore = load.ok.Load()
	agenttest.WaitFor(t, 10*time.Second, "100 connections after the restart", func() bool { return load.ok.Load() >= okBefore+100 })

	pings := long.pings.Load()
	if f := long.failures(); len(f) > 0 {
		t.Errorf("%d of 10 long-lived connections failed; first: %s", len(f), f[0])
	}
	long.stop()
	stats := load.stop()
	t.Logf("agent down %v (%d enrolment attempts refused meanwhile): %d new connections ok, %d failed; 10 long-lived connections, %d pings ok",
		restarted.Sub(killed).Round(time.Millisecond), refused, stats.ok, stats.failed, pings)
	if stats.failed > 0 {
		t.Errorf("%d of %d new connections failed: %v", stats.failed, stats.ok+stats.failed, load.failures())
	}
	dump := capture.stop(t)
	assertNoPlaintext(t, dump, b.IPv4.String())
	if strings.Contains(dump, fmt.Sprintf("> %s.%d:", c.IPv4, nettest.AppPort)) {
		t.Errorf("plaintext to the pod enrolled after the restart")
	}
}

// TestProxyKillServesManyPods enrols many pods, kills the proxy with
// SIGKILL and starts a new one. Every pod opens a connection to pod 0's
// app every 20 ms (100 ms dial timeout, so that a SYN dropped while the
// proxy is down does not wait for TCP's retransmission); every pod must be
// served again within 1 s of the new proxy connecting to the agent, and
// nothing may pass in plaintext meanwhile. It runs 30 pods (they enrol
// in about 5 s here); `go test ./pkg/proxy -run
// TestProxyKillServesManyPods -args -fault-pods=100` runs the issue's 100
// (about 16 s), where the 1 s bound has little margin on a loaded machine.
func TestProxyKillServesManyPods(t *testing.T) {
	pods := *faultPods
	if pods < 2 {
		t.Fatalf("-fault-pods=%d: want at least 2", pods)
	}
	t0 := time.Now()
	m := newMeshNode(t, pods)
	t.Logf("%d pods on the bridge in %v", pods, time.Since(t0).Round(time.Millisecond))
	agent := m.startAgent()
	proxy := m.startProxy(0)
	id := agenttest.RandomID()
	t0 = time.Now()
	for i := range pods {
		m.enrollNoWait(i, fmt.Sprintf("p%03d-%s", i, id))
	}
	for i := range pods {
		m.waitState(fmt.Sprintf("p%03d-%s", i, id), agentapi.StateEnabled, 30*time.Second)
	}
	t.Logf("%d pods enrolled in %v", pods, time.Since(t0).Round(time.Millisecond))
	m.app(0, "z")
	dst := fmt.Sprintf("%s:%d", m.lab.Pod(0).IPv4, nettest.AppPort)
	served := func(i int) bool {
		p := m.lab.Pod(i)
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		c, err := p.Dial(ctx, "tcp", dst)
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		buf := make([]byte, 64)
		n, _ := c.Read(buf)
		return strings.HasPrefix(string(buf[:n]), "app z peer="+p.IPv4.String())
	}
	for i := 1; i < pods; i++ {
		agenttest.WaitFor(t, 10*time.Second, fmt.Sprintf("pod %d served before the kill", i), func() bool { return served(i) })
	}
	capture := m.capture()
	proxy.kill(t)
	// While no proxy runs, nothing gets through (fail closed).
	for _, i := range []int{1, pods / 2, pods - 1} {
		if served(i) {
			t.Errorf("pod %d reached pod 0 with no proxy running", i)
		}
	}
	proxy = m.startProxy(0)
	started := time.Now()
	firstOK := make([]time.Time, pods)
	var wg sync.WaitGroup
	for i := 1; i < pods; i++ {
		wg.Go(func() { firstOK[i] = firstSuccess(15*time.Second, func() bool { return served(i) }) })
	}
	wg.Wait()
	connected, err := logTime(proxy.tail(10000), "connected to agent")
	if err != nil {
		t.Fatalf("the new proxy's log: %v\n%s", err, proxy.tail(20))
	}
	var last time.Time
	for i := 1; i < pods; i++ {
		if firstOK[i].IsZero() {
			t.Fatalf("pod %d not served within 15 s of the new proxy's start", i)
		}
		if firstOK[i].After(last) {
			last = firstOK[i]
		}
	}
	within := last.Sub(connected)
	acked, err := lastLogTime(agent.tail(100000), "snapshot acked")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d pods: the new proxy connected %v after its start and acked the snapshot %v later; the last pod served %v after it connected",
		pods, connected.Sub(started).Round(time.Millisecond), acked.Sub(connected).Round(time.Millisecond), within.Round(time.Millisecond))
	if within > time.Second {
		t.Errorf("the last pod was served %v after the new proxy connected, want within 1 s", within)
	}
	dump := capture.stop(t)
	if strings.Contains(dump, fmt.Sprintf("> %s:", dst)) || strings.Contains(dump, fmt.Sprintf("> %s.%d:", m.lab.Pod(0).IPv4, nettest.AppPort)) {
		t.Errorf("plaintext to pod 0's app port on the wire")
	}
}

// firstSuccess starts an attempt every 25 ms until one succeeds or limit
// passes, and returns when the first successful attempt ended (zero if
// none did). The attempts overlap: one started just before the service
// was ready may stall until its own timeout, and waiting for it before
// starting the next would count that stall as time not served.
func firstSuccess(limit time.Duration, attempt func() bool) time.Time {
	var (
		mu    sync.Mutex
		first time.Time
		wg    sync.WaitGroup
	)
	done := func() bool { mu.Lock(); defer mu.Unlock(); return !first.IsZero() }
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for deadline := time.Now().Add(limit); !done() && time.Now().Before(deadline); <-tick.C {
		wg.Go(func() {
			if attempt() {
				now := time.Now()
				mu.Lock()
				if first.IsZero() || now.Before(first) {
					first = now
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return first
}

// lastLogTime is the time of the last JSON log line whose message
// contains msg.
func lastLogTime(log, msg string) (time.Time, error) {
	lines := strings.Split(log, "\n")
	slices.Reverse(lines)
	return logTime(strings.Join(lines, "\n"), msg)
}

var faultPods = flag.Int("fault-pods", 30, "pods of TestProxyKillServesManyPods")

// logTime is the time of the first JSON log line whose message contains
// msg.
func logTime(log, msg string) (time.Time, error) {
	for line := range strings.SplitSeq(log, "\n") {
		var l struct {
			Time time.Time `json:"time"`
			Msg  string    `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &l) == nil && strings.Contains(l.Msg, msg) {
			return l.Time, nil
		}
	}
	return time.Time{}, fmt.Errorf("no log line %q", msg)
}

// served reports whether a connection from pod from to pod to's app gets
// through the mesh, the app seeing from's address.
func (m *meshNode) served(from, to int, app string) bool {
	a, b := m.lab.Pod(from), m.lab.Pod(to)
	c, err := nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer cancel()
		return a.Dial(ctx, "tcp", fmt.Sprintf("%s:%d", b.IPv4, nettest.AppPort))
	})
	if err != nil {
		return false
	}
	defer c.Close()
	return c.Greeting == "app "+app+" peer="+a.IPv4.String()
}

// pinned lists the UIDs the datapath has pinned under the agent's bpffs.
func (m *meshNode) pinned() []string { return m.ae.PinnedUIDs(m.t) }

// TestAgentRestartWithoutPins is a node reboot as the agent sees it: the
// agent is killed and every pin is gone (the pods' programs detached)
// when it starts again. It must re-attach every pod from its state file
// and hand it to the proxy, so that A reaches B through the mesh again.
func TestAgentRestartWithoutPins(t *testing.T) {
	m := newMeshNode(t, 2)
	agent := m.startAgent()
	m.startProxy(0)
	id := m.meshAB()
	agent.kill(t)
	l, err := datapath.New(datapath.Config{Root: m.ae.Config.BPFRoot, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	for _, uid := range []string{"a-" + id, "b-" + id} {
		if err := l.Detach(uid); err != nil {
			t.Fatalf("remove the pins of %s: %v", uid, err)
		}
	}
	if p := m.pinned(); len(p) != 0 {
		t.Fatalf("pins left: %v", p)
	}
	capture := m.capture()
	restarted := time.Now()
	m.startAgent()
	m.waitState("a-"+id, agentapi.StateEnabled, 10*time.Second)
	m.waitState("b-"+id, agentapi.StateEnabled, 10*time.Second)
	agenttest.WaitFor(t, 10*time.Second, "A reaches B after the restart", func() bool { return m.served(0, 1, "b") })
	t.Logf("both pods re-attached from the state file and served %v after the agent's start", time.Since(restarted).Round(time.Millisecond))
	if p := m.pinned(); len(p) != 2 {
		t.Errorf("pinned after the restart: %v, want both pods", p)
	}
	assertNoPlaintext(t, capture.stop(t), m.lab.Pod(1).IPv4.String())
}

// TestAgentCorruptStateRecovers truncates the agent's state file while it
// is down. The agent must start anyway, say so clearly, keep the bytes
// aside, and keep both pods captured (fail closed: A cannot reach B, in
// plaintext or otherwise, while nothing enrols them); enrolling them again
// (the CNI's next ADD) must serve them again.
func TestAgentCorruptStateRecovers(t *testing.T) {
	m := newMeshNode(t, 2)
	agent := m.startAgent()
	m.startProxy(0)
	id := m.meshAB()
	agent.kill(t)
	path := filepath.Join(m.ae.Config.StateDir, "state.json")
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, st.Size()/2); err != nil {
		t.Fatal(err)
	}
	capture := m.capture()
	agent = m.startAgent()
	if log := agent.tail(200); !strings.Contains(log, "the state file is corrupt") {
		t.Errorf("the agent's log does not say the state file is corrupt:\n%s", agent.tail(20))
	}
	aside, _ := filepath.Glob(path + ".corrupt-*")
	if len(aside) != 1 {
		t.Errorf("the corrupt state was not kept aside: %v", aside)
	}
	if p := m.pinned(); len(p) != 2 {
		t.Errorf("pinned after the restart: %v, want both pods (captured, fail closed)", p)
	}
	// The new snapshot is empty: the proxy stops both pods' listeners.
	agenttest.WaitFor(t, 10*time.Second, "A refused (fail closed)", func() bool { return !m.served(0, 1, "b") })
	m.enroll(0, "a-"+id)
	m.enroll(1, "b-"+id)
	agenttest.WaitFor(t, 10*time.Second, "A reaches B after the new enrolments", func() bool { return m.served(0, 1, "b") })
	assertNoPlaintext(t, capture.stop(t), m.lab.Pod(1).IPv4.String())
}

// TestAgentStateDiskFull fills the agent's state directory (a 64 KiB
// tmpfs). An enrolment must then fail with a clear error and leave
// nothing attached, the enrolled pods must keep being served, and once
// there is room again the same enrolment must succeed.
func TestAgentStateDiskFull(t *testing.T) {
	m := newMeshNode(t, 3)
	dir := m.ae.Config.StateDir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64k,mode=0700"); err != nil {
		t.Fatalf("mount a tmpfs for the state dir: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	m.startAgent()
	m.startProxy(0)
	id := m.meshAB()

	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	block := make([]byte, 4096)
	for {
		if _, err := f.Write(block); err != nil {
			if !errors.Is(err, unix.ENOSPC) {
				t.Fatalf("fill the state dir: %v", err)
			}
			break
		}
	}
	f.Close()
	c := m.lab.Pod(2)
	req := agentapi.EnrollRequest{UID: "c-" + id, Name: c.Name, Namespace: "ns-" + c.Name, ServiceAccount: "sa", Netns: c.NSPath}
	_, err = m.ae.Client.Enroll(context.Background(), req)
	var ae *agentapi.Error
	if !errors.As(err, &ae) || !strings.Contains(ae.Error(), "no space left on device") {
		t.Fatalf("enrolment with the state dir full: %v, want an agent error saying no space is left", err)
	}
	t.Logf("enrolment with the state dir full: %v", err)
	if slices.Contains(m.pinned(), "c-"+id) {
		t.Error("the refused pod was left attached")
	}
	if !m.served(0, 1, "b") {
		t.Error("A no longer reaches B with the state dir full")
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	m.enroll(2, "c-"+id)
	m.app(2, "c")
	agenttest.WaitFor(t, 10*time.Second, "A reaches C once there is room", func() bool { return m.served(0, 2, "c") })
}

// TestZDSSocketRemovedUnderProxy removes the agent's ZDS socket under a
// running proxy, then replaces it with a socket of another listener. The
// running proxy's connection must not care (A keeps reaching B), and
// each time a proxy started afterwards must reach the agent (which listens
// at its path again) and serve the pods.
func TestZDSSocketRemovedUnderProxy(t *testing.T) {
	m := newMeshNode(t, 2)
	m.startAgent()
	proxy := m.startProxy(0)
	m.meshAB()
	path := m.ae.Config.ZDSPath
	var ist unix.Stat_t
	if err := unix.Stat(path, &ist); err != nil {
		t.Fatal(err)
	}
	restart := func(what string) {
		t.Helper()
		proxy.kill(t)
		proxy = m.startProxy(0)
		waitProxyReadyAt(t, m.lab.Node, proxy, proxyReadyAddr(0))
		agenttest.WaitFor(t, 10*time.Second, "A reaches B through a proxy started after "+what, func() bool { return m.served(0, 1, "b") })
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if !m.served(0, 1, "b") {
		t.Error("A no longer reaches B once the socket file is gone")
	}
	agenttest.WaitFor(t, 10*time.Second, "the agent's socket back", func() bool {
		var st unix.Stat_t
		return unix.Stat(path, &st) == nil && st.Ino != ist.Ino
	})
	restart("the socket was removed")

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	impostor, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	impostor.SetUnlinkOnClose(false)
	t.Cleanup(func() { impostor.Close() })
	if err := unix.Stat(path, &ist); err != nil {
		t.Fatal(err)
	}
	agenttest.WaitFor(t, 10*time.Second, "the agent taking its path back", func() bool {
		var st unix.Stat_t
		return unix.Stat(path, &st) == nil && st.Ino != ist.Ino
	})
	restart("the socket was replaced")
}
