//go:build linux

package proxy

import (
	"errors"
	"io"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestDrainClosesLeftovers stops a proxy (in process) whose drain timeout
// is 500 ms while a mesh connection from A to B is open: during the drain
// the connection still carries data; at its end the proxy closes it (the
// client reads EOF or a reset, not a hang), counts it in
// DrainClosedMetricName and Run returns.
func TestDrainClosesLeftovers(t *testing.T) {
	const drain = 500 * time.Millisecond
	e := newEnv(t, envOptions{pods: 2, drain: drain})
	e.enroll(0, "ns-a", "sa")
	e.enroll(1, "ns-b", "sa")
	e.app(1, "b")
	c := e.mustConnect(0, appAddr(e, 1))
	defer c.Close()

	start := time.Now()
	stopped := make(chan error, 1)
	go func() { stopped <- e.stop() }()
	waitFor(t, "the proxy draining", func() bool { return e.p.isDraining() })
	if err := c.Echo("during the drain"); err != nil {
		t.Fatalf("the open connection during the drain: %v", err)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(drain + 5*time.Second):
		t.Fatal("Run did not return after the drain timeout")
	}
	took := time.Since(start)
	if took < drain {
		t.Errorf("Run returned after %v, before the %v drain timeout, with a connection open", took, drain)
	}
	c.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	// io.Copy returns nil at EOF.
	n, err := io.Copy(io.Discard, c.Conn)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Error("the connection was left open after the drain")
	} else if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the client read %v after the drain, want EOF or a reset", err)
	}
	mfs, err := e.p.Metrics().Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var closed float64
	for _, mf := range mfs {
		if mf.GetName() == DrainClosedMetricName {
			closed = mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	// A's outbound relay and B's HBONE connection.
	if closed < 1 {
		t.Errorf("%s = %v, want the connections left at the end of the drain", DrainClosedMetricName, closed)
	}
	t.Logf("drain of %v ended after %v; %s = %v; the client read %d more bytes, then %v (nil: EOF)", drain, took.Round(time.Millisecond), DrainClosedMetricName, closed, n, err)
}
