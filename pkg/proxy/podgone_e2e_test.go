//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/nlretry"
)

// netnsCheck is the agent's --netns-check-interval in these tests.
const netnsCheck = 200 * time.Millisecond

// TestPodNetnsGoneWithoutDel removes an enrolled pod's netns the way a
// runtime does (the bind mount goes) and sends no CNI DEL. The proxy
// still holds the netns fd it was handed, and its listeners in it, so
// the namespace, its veth and its addresses stay alive; only the agent
// can notice, by its path check. It must unenrol the pod: the proxy stops
// its pod proxy (ZDS Del), the pins go, and then nothing holds the
// namespace any more, so the kernel frees it, which takes the pod's veth
// out of the node. Pods A and B talk throughout, and none of their
// connections may fail.
func TestPodNetnsGoneWithoutDel(t *testing.T) {
	m := newMeshNode(t, 3)
	m.startAgent("--netns-check-interval", netnsCheck.String())
	proxy := m.startProxy(0)
	id := m.meshAB()
	c := m.lab.Pod(2)
	uidC := "c-" + id
	m.enroll(2, uidC)
	// C is served; its app then stops, so the only sockets left in C's
	// netns are the proxy's.
	app, err := nettest.StartApp(&c.Netns, "c", []uint16{nettest.AppPort}, nil)
	if err != nil {
		t.Fatal(err)
	}
	agenttest.WaitFor(t, 10*time.Second, "A reaches C", func() bool { return m.served(0, 2, "c") })
	app.Close()
	by := m.startBystanders()

	if _, err := m.lab.RemovePod(c, false); err != nil {
		t.Fatal(err)
	}
	removed := time.Now()
	// The namespace outlives its path: the proxy holds it.
	if !linkInNode(t, m, c.HostVeth) {
		t.Fatalf("%s left the node with the netns path: something else freed the namespace", c.HostVeth)
	}
	m.assertPodGone(proxy, uidC, c.HostVeth)
	t.Logf("netns path removed; the agent unenrolled the pod and the kernel freed its namespace %v later", time.Since(removed).Round(time.Millisecond))
	if !logHas(m.agent, "the pod's netns is gone without a CNI DEL: unenrolling it", uidC) {
		t.Error("the agent's log does not say why it unenrolled the pod")
	}
	by.check(t)
	m.assertOnly(t, "a-"+id, "b-"+id)
}

// TestPodDeletedMidEnrolment deletes a pod (its veth, then its netns
// path, as the CNI DEL and the runtime do) while the agent is enrolling
// it, at two known points: before the datapath is attached, and after it
// is attached and recorded but before the proxy is handed the pod. The
// agent built with the ambpf_testhooks tag pauses there
// (pkg/agent/testhook_on.go), so the test does not race. Every outcome
// must be a clean one:
//
//   - before the attach: the enrolment fails with 410 netns_gone, saying
//     the netns vanished during enrolment;
//   - before the handoff: either the same error, or (the proxy took the
//     pod: the agent's descriptor still kept the namespace alive) a
//     success, after which the agent's netns check unenrols the pod.
//
// Either way nothing of the pod is left: no agent record, no pins, no
// pod proxy, and nothing holds its namespace (a sentinel veth in it
// leaves the node when the kernel frees it). Pods A and B talk
// throughout without a failed connection, and afterwards the agent
// enrols a new pod under the UID of a deleted one (its state kept no
// trace of the old namespace).
func TestPodDeletedMidEnrolment(t *testing.T) {
	m := newMeshNode(t, 5)
	hooked := "ambpf-agent." + testHooksTag
	buildBinaries(t, hooked)
	pauseDir := t.TempDir()
	m.startAgentBin(hooked, []string{"AMBPFTEST_PAUSE_DIR=" + pauseDir}, "--netns-check-interval", netnsCheck.String())
	proxy := m.startProxy(0)
	id := m.meshAB()
	by := m.startBystanders()

	var uids []string
	for i, step := range []string{"attach", "handoff"} {
		p := m.lab.Pod(2 + i)
		uid := fmt.Sprintf("%s-%s", step, id)
		uids = append(uids, uid)
		sentinel := m.addSentinel(p)
		paused, res := m.pausedEnroll(2+i, uid, pauseDir, step)
		if _, err := m.lab.RemovePod(p, true); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(paused); err != nil {
			t.Fatal(err)
		}
		var err error
		select {
		case err = <-res:
		case <-time.After(30 * time.Second):
			t.Fatalf("the enrolment paused at %s did not answer within 30 s", step)
		}
		var aerr *agentapi.Error
		switch {
		case errors.As(err, &aerr) && aerr.Code == agentapi.CodeNetnsGone && strings.Contains(aerr.Message, "vanished during enrolment"):
			t.Logf("pod deleted before the %s: the enrolment failed: %v", step, err)
		case err == nil && step == "handoff":
			t.Logf("pod deleted before the %s: the proxy took it; the netns check unenrols it", step)
		default:
			t.Fatalf("pod deleted before the %s: the enrolment answered %v, want a netns_gone error", step, err)
		}
		m.assertPodGone(proxy, uid, sentinel)
	}
	by.check(t)
	m.assertOnly(t, "a-"+id, "b-"+id)

	// The agent is consistent: the UID of a deleted pod enrols a new pod
	// at once, which A reaches through the mesh.
	m.enroll(4, uids[0])
	m.app(4, "e")
	agenttest.WaitFor(t, 10*time.Second, "A reaches the new pod", func() bool { return m.served(0, 4, "e") })
}

// pausedEnroll starts enrolling pod i as uid on an agent built with the
// test hooks and pausing through pauseDir, and returns once the enrolment
// is paused at step: the file to remove to let it go on, and where its
// result arrives.
func (m *meshNode) pausedEnroll(i int, uid, pauseDir, step string) (paused string, res <-chan error) {
	m.t.Helper()
	if err := os.WriteFile(filepath.Join(pauseDir, uid+"."+step), nil, 0o600); err != nil {
		m.t.Fatal(err)
	}
	paused = filepath.Join(pauseDir, uid+"."+step+".paused")
	out := make(chan error, 1)
	m.enrollAsync(i, uid, out)
	agenttest.WaitFor(m.t, 10*time.Second, uid+"'s enrolment paused at "+step, func() bool {
		_, err := os.Stat(paused)
		return err == nil
	})
	return paused, out
}

// enrollAsync enrols pod i as uid in the background and sends the
// agent's answer to res.
func (m *meshNode) enrollAsync(i int, uid string, res chan<- error) {
	p := m.lab.Pod(i)
	go func() {
		req := agentapi.EnrollRequest{UID: uid, Name: p.Name, Namespace: "ns-" + p.Name, ServiceAccount: "sa", Netns: p.NSPath}
		_, err := m.ae.Client.Enroll(context.Background(), req)
		res <- err
	}()
	m.t.Cleanup(func() { m.ae.Client.Unenroll(context.Background(), uid) })
}

// bystanders is the traffic of pods A and B that a fault elsewhere on the
// node must not touch: 10 long-lived connections from A to B pinging
// every 100 ms and a new connection every 10 ms.
type bystanders struct {
	long *longLived
	load *canaryLoad
	t0   time.Time
}

// startBystanders starts it; meshAB must have run.
func (m *meshNode) startBystanders() *bystanders {
	m.t.Helper()
	a, b := m.lab.Pod(0), m.lab.Pod(1)
	addr := fmt.Sprintf("%s:%d", b.IPv4, nettest.AppPort)
	greeting := "app b peer=" + a.IPv4.String()
	by := &bystanders{
		long: startLongLived(m.t, a, addr, greeting, 10, 100*time.Millisecond),
		load: startCanaryLoad(m.t, a, addr, greeting),
		t0:   time.Now(),
	}
	agenttest.WaitFor(m.t, 10*time.Second, "A's first connections", func() bool { return by.load.ok.Load() >= 10 })
	return by
}

// check stops the traffic and fails the test if any of it failed.
func (by *bystanders) check(t *testing.T) {
	t.Helper()
	if f := by.long.failures(); len(f) > 0 {
		t.Errorf("%d of 10 long-lived connections failed; first: %s", len(f), f[0])
	}
	// The traffic goes on after the fault.
	ok := by.load.ok.Load()
	agenttest.WaitFor(t, 10*time.Second, "50 more of A's connections", func() bool { return by.load.ok.Load() >= ok+50 })
	pings := by.long.pings.Load()
	by.long.stop()
	st := by.load.stop()
	t.Logf("A to B over %v: %d new connections ok, %d failed; 10 long-lived connections, %d pings ok",
		time.Since(by.t0).Round(time.Millisecond), st.ok, st.failed, pings)
	if st.failed > 0 {
		t.Errorf("%d of %d of A's new connections failed: %v", st.failed, st.ok+st.failed, by.load.failures())
	}
}

// assertPodGone waits until nothing of pod uid is left: the agent does
// not know it, its pins are gone, the proxy stopped its pod proxy (when
// it had one) and the kernel freed its namespace, which removes the
// node end of sentinel, a veth whose other end is in the pod.
func (m *meshNode) assertPodGone(proxy *nodeProcess, uid, sentinel string) {
	m.t.Helper()
	agenttest.WaitFor(m.t, 10*time.Second, "the agent forgets "+uid, func() bool {
		_, err := m.ae.Client.Pod(context.Background(), uid)
		return agentapi.IsNotFound(err)
	})
	if slices.Contains(m.pinned(), uid) {
		m.t.Errorf("pod %s is still pinned under the bpffs", uid)
	}
	if st, err := os.ReadFile(filepath.Join(m.ae.Config.StateDir, "state.json")); err != nil {
		m.t.Error(err)
	} else if strings.Contains(string(st), uid) {
		m.t.Errorf("the agent's state file still names %s", uid)
	}
	// A pod proxy that ran must have stopped. One that failed to start
	// left the netns fd in the ZDS client's retry queue until the Del:
	// the namespace check below sees that one.
	if logHas(proxy, "pod proxy started", uid) {
		agenttest.WaitFor(m.t, 10*time.Second, "the proxy stops "+uid, func() bool {
			return logHas(proxy, "pod proxy stopped", uid)
		})
	}
	agenttest.WaitFor(m.t, 10*time.Second, "the kernel frees the namespace of "+uid, func() bool {
		return !linkInNode(m.t, m, sentinel)
	})
}

// logHas reports whether a line of p's JSON log has message msg and uid.
func logHas(p *nodeProcess, msg, uid string) bool {
	for line := range strings.SplitSeq(p.tail(100000), "\n") {
		if strings.Contains(line, `"msg":"`+msg+`"`) && strings.Contains(line, `"uid":"`+uid+`"`) {
			return true
		}
	}
	return false
}

// assertOnly checks that the agent knows exactly the pods uids and that
// exactly they are pinned.
func (m *meshNode) assertOnly(t *testing.T, uids ...string) {
	t.Helper()
	pods, err := m.ae.Client.Pods(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var known []string
	for _, p := range pods {
		known = append(known, p.UID)
	}
	slices.Sort(known)
	pinned := m.pinned()
	slices.Sort(pinned)
	want := slices.Sorted(slices.Values(uids))
	if !slices.Equal(known, want) || !slices.Equal(pinned, want) {
		t.Errorf("the agent knows %v and has %v pinned, want %v", known, pinned, want)
	}
}

// addSentinel adds a veth pair with one end in pod p and the other in
// the node, and returns the node end's name: it disappears when (and
// only when) the kernel frees p's namespace.
func (m *meshNode) addSentinel(p *nettest.Pod) string {
	m.t.Helper()
	name := fmt.Sprintf("snt%d", p.Index)
	err := m.lab.Node.Do(func() error {
		return netlink.LinkAdd(&netlink.Veth{
			LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: "sentinel", PeerNamespace: netlink.NsFd(p.NS.Fd()),
		})
	})
	if err != nil {
		m.t.Fatalf("sentinel veth for %s: %v", p.Name, err)
	}
	m.t.Cleanup(func() {
		m.lab.Node.Do(func() error {
			if l, err := nlretry.LinkByName(name); err == nil {
				return netlink.LinkDel(l)
			}
			return nil
		})
	})
	return name
}

// linkInNode reports whether the node netns has a link named name.
func linkInNode(t *testing.T, m *meshNode, name string) bool {
	t.Helper()
	var found bool
	err := m.lab.Node.Do(func() error {
		_, err := nlretry.LinkByName(name)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		found = err == nil
		return err
	})
	if err != nil {
		t.Fatalf("look for %s in the node: %v", name, err)
	}
	return found
}
