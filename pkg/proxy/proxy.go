//go:build linux

// Package proxy is ambpf's in-pod proxy, compatible with Istio's ztunnel:
// one process on the node serves every enrolled pod from inside the
// pod's network namespace.
//
// The node agent enrols a pod over ZDS (pkg/zds); the Proxy is the
// zds.Handler. For each pod it opens, inside the pod's netns and with
// SO_MARK 0x539 and IP_TRANSPARENT (and SO_REUSEPORT unless disabled):
//
//   - [::]:15001, outbound: the datapath hands it every TCP connection the
//     pod's apps open. The original destination (SO_ORIGINAL_DST, else the
//     local address) picks the route: a mesh workload is reached over
//     HBONE on its IP:15008 with its identity expected; a Service VIP
//     is load-balanced to one endpoint, over HBONE when the endpoint is a
//     mesh workload; anything else passes through as plain TCP from the
//     pod's own address, but only from a complete view of the mesh (see
//     routeKnown): until the ZDS snapshot of the current agent connection
//     and the Kubernetes caches are in, such a connection waits
//     (Config.SyncWait) and is then refused, never passed through.
//   - [::]:15006, inbound plaintext: accepted under PERMISSIVE mTLS and
//     refused under STRICT (mesh-wide or per namespace), then authorized
//     with no source identity.
//   - [::]:15008, inbound HBONE (pkg/hbone) with the pod's certificate:
//     authorized with the client's certificate identity and the HBONE
//     connection's peer address (a Forwarded header is not trusted).
//   - with Config.DNSCapture, the DNS proxy (pkg/dnsproxy) on
//     127.0.0.1:15053 and [::1]:15053.
//
// Inbound connections reach the application from the client's own IP
// (IP_TRANSPARENT + IP_FREEBIND), so the app sees its real peer. Every
// proxied connection is counted in Istio's TCP metrics and logged once
// when it ends (pkg/metrics). A discovery change re-authorizes open
// inbound connections and closes those now denied. DelWorkload closes the
// pod's listeners and connections at once.
//
// Discovery is a Store with two layers: the discovery file (or an empty
// default), which stands in for the control plane and wins, and below it
// the pods enrolled here, with their namespace and service account from
// ZDS and their IPs read from their netns, marked HBONE. With
// Config.Kubernetes a third layer between them holds what the API says
// (pkg/kubediscovery); pods are then taken from ZDS, and the proxy is
// ready, only once it is loaded.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/kernfeat"
	"github.com/ambpf/ambpf/pkg/kubediscovery"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/zds"
)

// Priorities of the discovery layers: the file (control plane) over the
// pods enrolled through ZDS, both over the defaults of Config (MTLSMode).
const (
	defaultsLayerPriority = -10
	zdsLayerPriority      = 0
	fileLayerPriority     = 10
)

// Proxy serves every enrolled pod. It implements zds.Handler; its methods
// are safe for concurrent use.
type Proxy struct {
	cfg     Config
	log     *slog.Logger
	ca      *identity.CA       // the local CA; nil with Config.Authority
	auth    identity.Authority // where pod certificates come from
	store   *discovery.Store
	zdsL    *discovery.Layer
	file    *discovery.File       // nil with the embedded default
	kube    *kubediscovery.Source // nil without Config.Kubernetes
	metrics *metrics.Metrics
	h3      *h3State
	limits  *limitMetrics
	drainM  *drainMetrics
	wm      *metrics.WorkloadManager
	zds     *zds.Client // nil without ZDSPath

	metricsLn, readyLn, adminLn net.Listener // nil when off

	// quit is closed by the admin endpoint's /quitquitquit: Run then
	// stops as when its context ends.
	quit       chan struct{}
	quitOnce   sync.Once
	startLevel slog.Level // Config.LogLevel at start, for /logging?reset

	mu     sync.Mutex
	pods   map[string]*pod
	failed map[string]bool // uids whose start failed, published as mesh workloads
	closed bool
	// draining is set when Run's context ends and the drain starts: no
	// new pod is taken from then on.
	draining bool
}

var _ zds.Handler = (*Proxy)(nil)

// New loads (or creates) the CA, loads the discovery file and opens the
// metrics and readiness listeners, so that configuration errors and
// ports in use fail here. It serves nothing until Run.
func New(cfg Config) (*Proxy, error) {
	cfg = cfg.withDefaults()
	if err := cfg.MTLSMode.Validate(); err != nil {
		return nil, fmt.Errorf("mesh-wide mTLS mode: %w", err)
	}
	var ca *identity.CA
	var err error
	auth := cfg.Authority
	if auth == nil {
		// Standalone: the local CA, created on first start.
		if err := os.MkdirAll(cfg.CADir, 0o700); err != nil {
			return nil, fmt.Errorf("create CA dir: %w", err)
		}
		if ca, err = identity.LoadOrCreate(cfg.CADir); err != nil {
			return nil, fmt.Errorf("load CA from %s: %w", cfg.CADir, err)
		}
		auth = ca
	}
	log := cfg.Logger.With("component", "proxy")
	if !cfg.NoReusePort && !kernfeat.ReusePortAssign() {
		// Before 6.6 bpf_sk_assign refuses SO_REUSEPORT listeners and the
		// datapath drops what it captures. The agent says per pod whether
		// the kernel steers to them (pod.reusePort); this is for the pods
		// of an agent that does not.
		log.Warn("kernel release predates SO_REUSEPORT steering (6.6): pods whose agent does not say otherwise get listeners without SO_REUSEPORT (an upgrade hands them over: the new proxy takes them once the old one closes them)")
	}
	h3 := newH3State(cfg.H3, log)
	p := &Proxy{
		cfg:   cfg,
		log:   log,
		ca:    ca,
		auth:  auth,
		store: discovery.NewStore(),
		// Access-log lines get the HBONE transport of tunnels added.
		metrics: metrics.New(cfg.Logger.With("component", "access-log")),
		h3:      h3,
		pods:    map[string]*pod{},
		failed:  map[string]bool{},
		quit:    make(chan struct{}),
	}
	if cfg.LogLevel != nil {
		p.startLevel = cfg.LogLevel.Level()
	}
	p.metrics.Registry().MustRegister(h3.tunnels)
	if c, ok := auth.(prometheus.Collector); ok && ca == nil {
		p.metrics.Registry().MustRegister(c)
	}
	p.limits = newLimitMetrics(p.metrics.Registry())
	p.drainM = newDrainMetrics(p.metrics.Registry())
	p.wm = p.metrics.WorkloadManager(
		func() int { p.mu.Lock(); defer p.mu.Unlock(); return len(p.pods) },
		func() int { p.mu.Lock(); defer p.mu.Unlock(); return len(p.failed) })
	if cfg.H3.enabled() {
		h3.probeUDP()
	}
	// The lowest layer: whatever sets a mesh-wide mode (a root-namespace
	// PeerAuthentication, the discovery file) wins over the flag.
	p.store.Layer("defaults", defaultsLayerPriority).Set(discovery.Snapshot{MTLS: discovery.MTLSConfig{Mode: cfg.MTLSMode}})
	p.zdsL = p.store.Layer("zds", zdsLayerPriority)
	fileL := p.store.Layer("file", fileLayerPriority)
	if cfg.DiscoveryFile == "" {
		snap, err := discovery.Parse(emptyDiscovery)
		if err != nil {
			return nil, fmt.Errorf("embedded discovery: %w", err)
		}
		fileL.Set(snap)
	} else {
		p.file = discovery.NewFile(cfg.DiscoveryFile, fileL, discovery.FileOptions{PollInterval: cfg.DiscoveryPoll, Logger: cfg.Logger})
		if err := p.file.Load(); err != nil {
			return nil, fmt.Errorf("load discovery: %w", err)
		}
	}
	if err := p.newKube(); err != nil {
		return nil, err
	}
	if cfg.ZDSPath != "" {
		p.zds, err = zds.NewClient(zds.ClientConfig{Path: cfg.ZDSPath, Handler: p, Logger: cfg.Logger})
		if err != nil {
			return nil, err
		}
	}
	if p.metricsLn, err = listen(cfg.MetricsAddr); err != nil {
		return nil, err
	}
	if p.readyLn, err = listen(cfg.ReadyAddr); err != nil {
		if p.metricsLn != nil {
			p.metricsLn.Close()
		}
		return nil, err
	}
	if cfg.AdminAddr != "" {
		if p.adminLn, err = listen(cfg.AdminAddr); err != nil {
			for _, ln := range []net.Listener{p.metricsLn, p.readyLn} {
				if ln != nil {
					ln.Close()
				}
			}
			return nil, err
		}
	}
	return p, nil
}

func listen(addr string) (net.Listener, error) {
	if addr == disabled {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return ln, nil
}

// MetricsAddr is the address /metrics is served on (nil when off).
func (p *Proxy) MetricsAddr() net.Addr { return addrOf(p.metricsLn) }

// AdminAddr is the address the admin endpoint is served on (nil when off).
func (p *Proxy) AdminAddr() net.Addr { return addrOf(p.adminLn) }

// ReadyAddr is the address /healthz/ready is served on (nil when off).
func (p *Proxy) ReadyAddr() net.Addr { return addrOf(p.readyLn) }

func addrOf(ln net.Listener) net.Addr {
	if ln == nil {
		return nil
	}
	return ln.Addr()
}

// Store is the proxy's discovery store (file, Kubernetes and ZDS layers).
func (p *Proxy) Store() *discovery.Store { return p.store }

// Metrics is the proxy's metrics registry and access logger.
func (p *Proxy) Metrics() *metrics.Metrics { return p.metrics }

// CA is the local certificate authority that signs the pods'
// certificates, nil when Config.Authority (a remote CA) does.
func (p *Proxy) CA() *identity.CA { return p.ca }

// Ready returns nil once the proxy can serve: the current ZDS
// connection's snapshot was received (so not between a disconnect and the
// next snapshot), no pod is waiting for a retried start and the
// Kubernetes caches, if any, have synced.
func (p *Proxy) Ready() error {
	if p.isDraining() {
		return errors.New("draining")
	}
	if p.zds != nil && !p.zds.Ready() {
		return errors.New("waiting for the ZDS snapshot")
	}
	return p.kubeReady()
}

// Run serves until ctx is done or the ZDS agent breaks the protocol (it
// then returns that error). When ctx ends, Run first drains for
// Config.DrainTimeout (see drain): the listeners close at once, the
// established connections may finish, the metrics server and the ZDS
// connection stay up. Then every pod is stopped and every listener closed
// before it returns nil.
func (p *Proxy) Run(ctx context.Context) error {
	// The servers run on their own context, which outlives ctx by the
	// drain.
	runCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	fail := func(err error) {
		select {
		case errc <- err:
		default:
		}
		cancel()
	}
	if p.metricsLn != nil {
		wg.Go(func() {
			if err := metrics.Serve(runCtx, p.metricsLn, p.metrics.MetricsMux()); err != nil {
				fail(fmt.Errorf("metrics server: %w", err))
			}
		})
	}
	if p.readyLn != nil {
		wg.Go(func() {
			if err := metrics.Serve(runCtx, p.readyLn, metrics.ReadyMux(p.Ready)); err != nil {
				fail(fmt.Errorf("readiness server: %w", err))
			}
		})
	}
	if p.adminLn != nil {
		wg.Go(func() {
			if err := metrics.Serve(runCtx, p.adminLn, p.adminMux()); err != nil {
				fail(fmt.Errorf("admin server: %w", err))
			}
		})
	}
	if p.file != nil {
		wg.Go(func() { p.file.Run(runCtx) })
	}
	wg.Go(func() { p.runKube(runCtx) })
	wg.Go(func() { p.watchPolicy(runCtx) })
	if p.zds != nil {
		wg.Go(func() {
			p.waitKube(runCtx) // no pod is served before policies are known
			if err := p.zds.Run(runCtx); err != nil {
				fail(fmt.Errorf("zds: %w", err))
			}
		})
	}
	select {
	case <-ctx.Done():
		if p.cfg.DrainTimeout > 0 {
			p.drain(p.cfg.DrainTimeout)
		}
	case <-p.quit:
		// As a SIGTERM: ztunnel's /quitquitquit shuts down gracefully.
		if p.cfg.DrainTimeout > 0 {
			p.drain(p.cfg.DrainTimeout)
		}
	case <-runCtx.Done():
	}
	cancel()
	wg.Wait()
	p.closeAll()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// watchPolicy re-authorizes every pod's open inbound connections after
// each discovery change.
func (p *Proxy) watchPolicy(ctx context.Context) {
	ch, stop := p.store.Subscribe()
	defer stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
		for _, pd := range p.snapshotPods() {
			pd.reauthorize()
		}
	}
}

func (p *Proxy) snapshotPods() []*pod {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*pod, 0, len(p.pods))
	for _, pd := range p.pods {
		out = append(out, pd)
	}
	return out
}

// closeAll stops every pod; later Adds fail.
func (p *Proxy) closeAll() {
	p.mu.Lock()
	p.closed = true
	pods := p.pods
	p.pods = map[string]*pod{}
	p.mu.Unlock()
	for uid, pd := range pods {
		p.stopPod(uid, pd)
	}
}

// AddWorkload implements zds.Handler: it starts the pod proxy for uid
// inside netns (which it duplicates; the caller keeps the file). A pod
// already running under uid is replaced. On error nothing of the pod is
// left running.
func (p *Proxy) AddWorkload(uid string, info zds.WorkloadInfo, netns *os.File) error {
	if p.isDraining() {
		// The agent's newest proxy takes it; this one is on its way out.
		return errors.New("proxy is draining")
	}
	pd, err := p.startPod(uid, info, netns)
	if err != nil {
		p.publishFailed(uid, info, netns)
		return fmt.Errorf("start pod proxy %s (%s/%s): %w", uid, info.Namespace, info.Name, err)
	}
	p.mu.Lock()
	if p.closed || p.draining {
		p.mu.Unlock()
		p.stopPod(uid, pd)
		return errors.New("proxy is shutting down")
	}
	old := p.pods[uid]
	p.pods[uid] = pd
	p.mu.Unlock()
	if old != nil {
		// The new instance's listeners already share the ports
		// (SO_REUSEPORT); without it the start above failed instead.
		old.close()
		p.wm.Stopped.Inc()
	}
	p.wm.Started.Inc()
	p.startedPod(uid)
	p.zdsL.PutWorkload(pd.workload)
	p.log.Info("pod proxy running", "uid", uid, "namespace", info.Namespace, "name", info.Name,
		"identity", pd.id.String(), "ips", pd.workload.IPs, "reuseport", pd.reusePort(), "agent_reuseport", info.ReusePort.String())
	return nil
}

// KeepWorkload implements zds.Handler: a running pod proxy stays as is.
func (p *Proxy) KeepWorkload(uid string) {}

// DelWorkload implements zds.Handler: it closes the pod's listeners and
// connections at once. An unknown uid is not an error.
func (p *Proxy) DelWorkload(uid string) error {
	p.mu.Lock()
	pd := p.pods[uid]
	delete(p.pods, uid)
	p.mu.Unlock()
	if pd == nil {
		return nil
	}
	return p.stopPod(uid, pd)
}

// Reconcile implements zds.Handler: every pod not in keep is stopped.
func (p *Proxy) Reconcile(keep map[string]bool) {
	p.mu.Lock()
	var gone []string
	for uid := range p.pods {
		if !keep[uid] {
			gone = append(gone, uid)
		}
	}
	p.mu.Unlock()
	p.reconcileFailed(keep)
	for _, uid := range gone {
		if err := p.DelWorkload(uid); err != nil {
			p.log.Warn("stopping pod proxy not in snapshot", "uid", uid, "err", err)
		}
	}
}

// Pods returns the UIDs of the running pod proxies.
func (p *Proxy) Pods() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.pods))
	for uid := range p.pods {
		out = append(out, uid)
	}
	return out
}

func (p *Proxy) stopPod(uid string, pd *pod) error {
	p.zdsL.DeleteWorkload(uid)
	err := pd.close()
	p.wm.Stopped.Inc()
	p.limits.forget(pd.info.Namespace, pd.info.Name)
	p.log.Info("pod proxy stopped", "uid", uid)
	return err
}

// trustDomain is the trust domain of every identity the proxy issues and
// expects.
func (p *Proxy) trustDomain() string {
	if p.cfg.TrustDomain != "" {
		return p.cfg.TrustDomain
	}
	return p.store.TrustDomain()
}
