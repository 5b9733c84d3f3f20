//go:build linux

package proxy

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
)

// TestEnrolmentsDoNotWaitForEachOther holds one pod's enrolment at a known
// point (attached, recorded, not yet handed to the proxy) in the real
// agent binary, and checks that the agent meanwhile enrols and unenrols
// other pods: a burst of CNI ADDs must not queue behind one slow pod (at
// 110 pods on the real node, a node-wide enrolment lock made the last
// ADDs hit the runtime's timeout). A second enrolment of the held pod
// must wait for the first, and every pod ends up served through the mesh.
func TestEnrolmentsDoNotWaitForEachOther(t *testing.T) {
	m := newMeshNode(t, 5)
	hooked := "ambpf-agent." + testHooksTag
	buildBinaries(t, hooked)
	pauseDir := t.TempDir()
	m.startAgentBin(hooked, []string{"AMBPFTEST_PAUSE_DIR=" + pauseDir})
	m.startProxy(0)
	id := agenttest.RandomID()

	held := "held-" + id
	paused, heldRes := m.pausedEnroll(0, held, pauseDir, "handoff")
	again := make(chan error, 1)
	m.enrollAsync(0, held, again)

	// Other pods go through while the held one waits.
	for i := 1; i < 4; i++ {
		m.enroll(i, fmt.Sprintf("other%d-%s", i, id))
	}
	if aerr := m.ae.Client.Unenroll(context.Background(), "other2-"+id); aerr != nil {
		t.Fatalf("unenrol while another pod's enrolment is held: %v", aerr)
	}
	if _, err := os.Stat(paused); err != nil {
		t.Fatalf("the held enrolment went on by itself: %v", err)
	}
	select {
	case err := <-heldRes:
		t.Fatalf("the held enrolment answered while held: %v", err)
	case err := <-again:
		t.Fatalf("a second enrolment of the held pod answered before the first: %v", err)
	default:
	}

	if err := os.Remove(paused); err != nil {
		t.Fatal(err)
	}
	for what, res := range map[string]<-chan error{"the held enrolment": heldRes, "the second enrolment of the held pod": again} {
		select {
		case err := <-res:
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s did not answer within 30 s of the release", what)
		}
	}
	m.waitState(held, agentapi.StateEnabled, 20*time.Second)
	m.app(0, "h")
	for _, i := range []int{1, 3} {
		agenttest.WaitFor(t, 10*time.Second, "a pod enrolled meanwhile reaches the held pod", func() bool { return m.served(i, 0, "h") })
	}
}
