//go:build linux

package proxy

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/zds"
)

// heldSnapshot is a snapshot source that gives its pods only once
// released: until then the proxy is connected but has no full view.
type heldSnapshot struct {
	pods    *podList
	release chan struct{}
}

func (h heldSnapshot) Snapshot(ctx context.Context) ([]zds.Pod, error) {
	select {
	case <-h.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return h.pods.Snapshot(ctx)
}

// TestPlaintextWaitsForMeshView: a connection that would pass through as
// plain TCP is routed only while the proxy holds the current agent
// connection's full snapshot. With the agent gone it is refused after
// SyncWait and never reaches the destination; with the agent back but
// its snapshot not yet sent it waits, and goes once the snapshot is in.
// Readiness follows the same view.
func TestPlaintextWaitsForMeshView(t *testing.T) {
	const syncWait = 700 * time.Millisecond
	e := newEnv(t, envOptions{pods: 2, zds: true, syncWait: syncWait})
	e.startZDS()
	e.enroll(0, "ns-a", "sa-a")
	app := e.app(1, "plain")
	ready := func() bool {
		code, _ := get(t, e.p.ReadyAddr(), "/healthz/ready")
		return code == http.StatusOK
	}

	// Synced: passthrough to a destination discovery does not know.
	c := e.mustConnect(0, appAddr(e, 1))
	c.Close()
	waitFor(t, "ready with the snapshot", ready)

	// The agent goes away: not ready, and plaintext is refused, never
	// passed through.
	e.zdsSrv.Close()
	waitFor(t, "not ready without the agent", func() bool { return !ready() })
	seen := len(app.Seen())
	const waits = "plaintext route waits for a complete mesh view"
	start := time.Now()
	if c, err := e.connect(0, appAddr(e, 1)); err == nil {
		c.Close()
		t.Fatalf("connection passed through without the agent (greeting %q)", c.Greeting)
	}
	if d := time.Since(start); d < syncWait/2 {
		t.Errorf("refused after %v, want it to wait about %v for the view first", d, syncWait)
	}
	e.waitLog("connection complete", "direction=outbound", "mesh view incomplete")
	if n := len(app.Seen()); n != seen {
		t.Fatalf("the app saw %d connections while the view was incomplete", n-seen)
	}

	// The agent is back, its snapshot held: the connection waits, and
	// goes as soon as the snapshot is in.
	waited := strings.Count(e.logs.String(), waits)
	hold := heldSnapshot{pods: e.snap, release: make(chan struct{})}
	srv, err := zds.NewServer(zds.ServerConfig{Path: e.p.cfg.ZDSPath, Snapshot: hold, Logger: slog.New(slog.NewTextHandler(e.logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); srv.Close(); <-done })
	waitFor(t, "the proxy connected again", func() bool { return strings.Count(e.logs.String(), "connected to agent") >= 2 })
	type result struct {
		greeting string
		err      error
	}
	res := make(chan result, 1)
	go func() {
		c, err := e.connect(0, appAddr(e, 1))
		if err != nil {
			res <- result{err: err}
			return
		}
		defer c.Close()
		res <- result{greeting: c.Greeting, err: c.Echo("after the snapshot")}
	}()
	waitFor(t, "the connection waiting for the view", func() bool { return strings.Count(e.logs.String(), waits) > waited })
	if n := len(app.Seen()); n != seen || ready() {
		t.Fatalf("before the snapshot: the app saw %d connections, ready %v", n-seen, ready())
	}
	close(hold.release)
	r := <-res
	if r.err != nil || r.greeting != "app plain peer="+e.lab.Pod(0).IPv4.String() {
		t.Fatalf("after the snapshot: greeting %q, %v", r.greeting, r.err)
	}
	waitFor(t, "ready after the new snapshot", ready)
}
