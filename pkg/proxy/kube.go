//go:build linux

package proxy

import (
	"context"
	"fmt"

	"github.com/ambpf/ambpf/pkg/kubediscovery"
)

// kubeLayerPriority puts what the Kubernetes API says between the pods
// enrolled through ZDS (which it completes: a ZDS pod is HBONE before the
// agent's annotation reaches the API) and the discovery file (a local
// override, when one is given).
const kubeLayerPriority = 5

// newKube creates the Kubernetes discovery source when Config.Kubernetes
// is set; it contacts the API only in Run.
func (p *Proxy) newKube() error {
	if p.cfg.Kubernetes == nil {
		return nil
	}
	src, err := kubediscovery.New(kubediscovery.Config{
		REST:   p.cfg.Kubernetes,
		Layer:  p.store.Layer("kubernetes", kubeLayerPriority),
		Logger: p.cfg.Logger,
	})
	if err != nil {
		return fmt.Errorf("kubernetes discovery: %w", err)
	}
	p.kube = src
	return nil
}

// runKube watches the API until ctx is done (no-op without Kubernetes).
func (p *Proxy) runKube(ctx context.Context) {
	if p.kube != nil {
		// Run returns only when ctx is done; informers retry API errors.
		_ = p.kube.Run(ctx)
	}
}

// kubeReady is nil once the API's content is in the store (or without
// Kubernetes): serving before would route without services and
// authorize without policies.
func (p *Proxy) kubeReady() error {
	if p.kube == nil {
		return nil
	}
	return p.kube.Ready()
}

// waitKube blocks until the API's content is in the store, or ctx is
// done (no-op without Kubernetes). The ZDS client starts after it: a pod
// served before the policies are loaded would be open to everyone, so
// pods wait (their CNI ADD blocks and retries) while the API is away.
func (p *Proxy) waitKube(ctx context.Context) {
	if p.kube != nil {
		_ = p.kube.WaitSynced(ctx) // an error only means ctx is done
	}
}
