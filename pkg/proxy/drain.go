//go:build linux

package proxy

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// DrainClosedMetricName counts the connections still open when a drain
// ended, which the proxy then closed.
const DrainClosedMetricName = "ambpf_proxy_drain_closed_total"

// DefaultDrainTimeout is how long a stopping proxy lets its established
// connections finish. The chart's terminationGracePeriodSeconds is this
// plus a margin, so the kubelet's SIGKILL never cuts a drain short.
const DefaultDrainTimeout = 25 * time.Second

// drainMetrics is the drain's counter.
type drainMetrics struct {
	closed prometheus.Counter
}

func newDrainMetrics(reg prometheus.Registerer) *drainMetrics {
	m := &drainMetrics{closed: prometheus.NewCounter(prometheus.CounterOpts{
		Name: DrainClosedMetricName,
		Help: "Connections (relayed TCP and inbound HBONE tunnels) still open at the end of a drain, closed then.",
	})}
	reg.MustRegister(m.closed)
	return m
}

// drain is how a proxy hands over during an upgrade, and how it stops.
// Another proxy (the new one of a rolling upgrade) has already opened its
// listeners next to this one's, in the same SO_REUSEPORT groups. drain:
//
//   - stops taking pods (AddWorkload nacks, readiness fails) and stops the
//     ZDS client from reconnecting, so that this proxy never becomes the
//     agent's newest connection again;
//   - closes every pod's listeners: the kernel then steers every new
//     connection to the other proxy's, and tcp_migrate_req moves this
//     one's queued connections there (the agent sets it in every pod's
//     netns, see pkg/agent);
//   - sends a GOAWAY on every inbound HBONE connection, so that peers
//     open their next tunnels to the other proxy;
//   - waits until every connection (relayed, and inbound HBONE with its
//     tunnels) has ended, or timeout.
//
// It returns how many were still open; closeAll then closes them (a FIN,
// or a reset when unread data is left) and they are counted in
// DrainClosedMetricName. The ZDS connection stays up meanwhile, so a pod
// deleted during the drain still has its connections closed at once.
func (p *Proxy) drain(timeout time.Duration) int {
	p.mu.Lock()
	p.draining = true
	p.mu.Unlock()
	if p.zds != nil {
		p.zds.StopReconnecting()
	}
	pods := p.snapshotPods()
	for _, pd := range pods {
		pd.stopAccepting()
	}
	start := time.Now()
	open := p.openConns()
	p.log.Info("draining: listeners closed, waiting for connections to end", "pods", len(pods), "connections", open, "timeout", timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(timeout)
	for open > 0 {
		select {
		case <-deadline:
			p.drainM.closed.Add(float64(open))
			p.log.Warn("drain timed out: closing the connections left", "connections", open, "after", time.Since(start).Round(time.Millisecond))
			return open
		case <-tick.C:
		}
		open = p.openConns()
	}
	p.log.Info("drained: every connection ended", "after", time.Since(start).Round(time.Millisecond))
	return 0
}

// isDraining reports whether drain has started.
func (p *Proxy) isDraining() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.draining
}

// openConns counts the connections of every pod.
func (p *Proxy) openConns() int {
	n := 0
	for _, pd := range p.snapshotPods() {
		n += pd.openConns()
	}
	return n
}

// openConns counts what the pod's connection slots hold (see admit):
// every connection from its accept on, before it is tracked too, and each
// inbound HBONE connection from its accept (TLS handshake included) until
// it closes, which a drained HBONE connection does once its last tunnel
// ends.
func (pd *pod) openConns() int {
	return int(pd.lim.out.held.Load() + pd.lim.in.held.Load())
}

// stopAccepting closes the pod's listeners and leaves its connections
// (and the HBONE server's established connections) alone.
func (pd *pod) stopAccepting() {
	pd.mu.Lock()
	if pd.closed || pd.draining {
		pd.mu.Unlock()
		return
	}
	pd.draining = true
	listeners := pd.listeners
	pd.mu.Unlock()
	for _, l := range listeners {
		l.Close()
	}
	// Peers' pools must stop opening tunnels on their connections to this
	// proxy, or the drain would never end.
	if pd.server != nil {
		pd.server.Drain()
	}
}

// isDraining reports whether the pod's listeners were closed by a drain.
func (pd *pod) isDraining() bool {
	pd.mu.Lock()
	defer pd.mu.Unlock()
	return pd.draining
}
