//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// DefaultSyncWait is Config.SyncWait's default.
const DefaultSyncWait = 5 * time.Second

// errViewIncomplete refuses a connection that would have left in
// plaintext while the proxy's view of the mesh was incomplete.
var errViewIncomplete = errors.New("mesh view incomplete")

// viewComplete reports whether the proxy knows every mesh workload it can
// know: the discovery file is loaded (New does that), the Kubernetes
// caches have synced (with Config.Kubernetes) and the current ZDS
// connection's snapshot has been handed over in full (with a ZDS path).
// Until then an address it has not heard of may be a mesh pod whose Add
// has not come yet, and plaintext to it would bypass mTLS.
func (p *Proxy) viewComplete() bool {
	if p.kubeReady() != nil {
		return false
	}
	return p.zds == nil || p.zds.Synced()
}

// waitView blocks until viewComplete or ctx is done.
func (p *Proxy) waitView(ctx context.Context) error {
	if p.kube != nil {
		if err := p.kube.WaitSynced(ctx); err != nil {
			return err
		}
	}
	if p.zds != nil {
		if err := p.zds.WaitSynced(ctx); err != nil {
			return fmt.Errorf("wait for the ZDS snapshot: %w", err)
		}
	}
	return nil
}

// routeKnown is route with the fail-closed rule for plaintext: a
// connection that would leave as plain TCP (a destination discovery does
// not know as a mesh workload) is routed only from a complete view of
// the mesh. Before that (a start, a restart, a ZDS reconnect) it waits
// for the view, at most Config.SyncWait, routes again and is refused if
// the view is still incomplete. HBONE routes go at once: they can only
// fail closed (the peer's identity is verified), and holding them would
// turn an agent restart into a mesh-wide outage.
func (pd *pod) routeKnown(src, dst netip.AddrPort) (route, error) {
	rt, err := pd.route(src, dst)
	if err != nil || rt.tunnel != nil || pd.p.viewComplete() {
		return rt, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), pd.p.cfg.SyncWait)
	defer cancel()
	pd.log.Debug("plaintext route waits for a complete mesh view", "src", src, "dst", dst)
	if err := pd.waitViewOrClose(ctx); err != nil {
		return rt, fmt.Errorf("%w: %v not routed in plaintext: %w", errViewIncomplete, dst, err)
	}
	return pd.route(src, dst)
}

// waitViewOrClose is waitView that also ends when the pod stops.
func (pd *pod) waitViewOrClose(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-pd.stopped:
			cancel()
		case <-ctx.Done():
		}
	}()
	return pd.p.waitView(ctx)
}
