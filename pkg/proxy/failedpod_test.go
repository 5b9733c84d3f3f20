//go:build linux

package proxy

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/zds"
)

// TestFailedPodStaysMesh: a pod whose proxy cannot start (its port 15008
// is taken) is still enrolled, so it must stay a mesh destination: a
// connection to it goes over HBONE and fails closed instead of passing
// through in plaintext. When the agent deletes the pod its address is a
// plain destination again.
func TestFailedPodStaysMesh(t *testing.T) {
	e := newEnv(t, envOptions{pods: 2, zds: true})
	e.startZDS()
	e.enroll(0, "ns-a", "sa-a")
	app := e.app(1, "b")

	// Something else holds B's 15008 without SO_REUSEPORT.
	pd := e.lab.Pod(1)
	squat, err := pd.Listen("tcp", "[::]:15008")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { squat.Close() })
	uid := "uid-" + pd.Name + "-" + e.lab.ID
	if _, err := e.loader.Attach(datapath.Pod{UID: uid, Netns: pd.NS}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.loader.Detach(uid) })
	info := zds.WorkloadInfo{Name: pd.Name, Namespace: "ns-b", ServiceAccount: "sa-b"}
	e.snap.put(zds.Pod{UID: uid, Info: info, OpenNetns: func() (*os.File, error) { return os.Open(pd.NSPath) }})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.zdsSrv.Add(ctx, uid, info, pd.NS.File()); err == nil {
		t.Fatal("the pod proxy started although its port 15008 is taken")
	}
	if w, ok := e.p.Store().WorkloadByIP(pd.IPv4); !ok || !w.HBONE() {
		t.Fatalf("the failed pod's address is not a mesh workload: %v %v", w, ok)
	}
	if c, err := e.connect(0, appAddr(e, 1)); err == nil {
		c.Close()
		t.Fatalf("connection to a pod without its proxy succeeded (greeting %q)", c.Greeting)
	}
	e.waitLog("connection complete", "direction=outbound", "dst.hbone_addr="+appAddr(e, 1), "security=mutual_tls")
	if n := len(app.Seen()); n != 0 {
		t.Fatalf("the app of the failed pod saw %d connections", n)
	}

	// The agent deletes the pod: its address is no mesh workload any more.
	if err := e.zdsSrv.Del(ctx, uid); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the failed pod forgotten", func() bool {
		_, ok := e.p.Store().WorkloadByIP(pd.IPv4)
		return !ok
	})
}
