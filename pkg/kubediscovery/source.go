package kubediscovery

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/discovery"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Defaults of Config.
const (
	DefaultDebounce = 100 * time.Millisecond
	DefaultMaxDelay = time.Second
	DefaultCRDPoll  = 30 * time.Second
)

// syncPoll is how often Run checks whether the caches synced before the
// first snapshot (informers do not announce it).
const syncPoll = 50 * time.Millisecond

// Config configures a Source. Zero values take the defaults.
type Config struct {
	// REST is how to reach the API server (see RESTConfig). Required.
	REST *rest.Config
	// Layer receives the snapshots. Required.
	Layer *discovery.Layer
	// RootNamespace holds mesh-wide PeerAuthentications (and
	// AuthorizationPolicies); authz.DefaultRootNamespace when empty. It is
	// also written into the snapshot, so the store evaluates policies
	// with the same root unless a higher layer overrides it.
	RootNamespace string
	// Debounce is how long events must pause before a snapshot is
	// built; MaxDelay bounds the wait during a continuous stream of
	// events.
	Debounce, MaxDelay time.Duration
	// CRDPoll is how often a missing Istio CRD is looked for again.
	CRDPoll time.Duration
	// Logger; slog.Default() when nil.
	Logger *slog.Logger
}

// Source keeps a discovery layer equal to the API's content (see the
// package doc). Create it with New, then call Run once.
type Source struct {
	cfg                 Config
	log                 *slog.Logger
	factory             informers.SharedInformerFactory
	pods                cache.SharedIndexInformer
	svcs                cache.SharedIndexInformer
	slices              cache.SharedIndexInformer
	nodes               cache.SharedIndexInformer
	policies, peerAuths *crdWatch
	kickc               chan struct{}
	notes               *notes
	synced              atomic.Bool
	syncedc             chan struct{} // closed with the first snapshot
	last                *discovery.Snapshot
}

// RESTConfig returns the client configuration of the kubeconfig file at
// path, or the in-cluster configuration (the pod's service account)
// when path is empty.
func RESTConfig(path string) (*rest.Config, error) {
	if path == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster kubernetes config: %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return c, nil
}

// New creates the API clients and informers; nothing is contacted
// before Run.
func New(cfg Config) (*Source, error) {
	if cfg.REST == nil || cfg.Layer == nil {
		return nil, errors.New("kubediscovery: REST and Layer are required")
	}
	cfg.RootNamespace = cmp.Or(cfg.RootNamespace, authz.DefaultRootNamespace)
	cfg.Debounce = cmp.Or(cfg.Debounce, DefaultDebounce)
	cfg.MaxDelay = cmp.Or(cfg.MaxDelay, DefaultMaxDelay)
	cfg.CRDPoll = cmp.Or(cfg.CRDPoll, DefaultCRDPoll)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	rc := rest.CopyConfig(cfg.REST)
	rc.UserAgent = cmp.Or(rc.UserAgent, "ambpf-proxy")
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes dynamic client: %w", err)
	}
	log := cfg.Logger.With("component", "kubediscovery")
	s := &Source{
		cfg:     cfg,
		log:     log,
		factory: informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(stripManagedFields)),
		kickc:   make(chan struct{}, 1),
		notes:   newNotes(log),
		syncedc: make(chan struct{}),
	}
	s.pods = s.factory.Core().V1().Pods().Informer()
	s.svcs = s.factory.Core().V1().Services().Informer()
	s.slices = s.factory.Discovery().V1().EndpointSlices().Informer()
	s.nodes = s.factory.Core().V1().Nodes().Informer()
	for _, inf := range []cache.SharedIndexInformer{s.pods, s.svcs, s.slices} {
		if _, err := inf.AddEventHandler(kickHandler(s.kick)); err != nil {
			return nil, fmt.Errorf("add event handler: %w", err)
		}
	}
	if _, err := s.nodes.AddEventHandler(nodeHandler(s.kick)); err != nil {
		return nil, fmt.Errorf("add event handler: %w", err)
	}
	newWatch := func(gvr schema.GroupVersionResource) *crdWatch {
		return &crdWatch{gvr: gvr, dyn: dyn, disc: client.Discovery(), poll: cfg.CRDPoll,
			log: log.With("resource", gvr.GroupResource().String()), kick: s.kick}
	}
	s.policies, s.peerAuths = newWatch(authorizationPolicies), newWatch(peerAuthentications)
	s.kick() // the first snapshot, even of an empty cluster
	return s, nil
}

// Run watches the API and keeps the layer up to date until ctx is done,
// then stops every informer and returns nil. The layer is first written
// once every cache has synced. Run must be called once.
func (s *Source) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		s.factory.Shutdown() // waits for the typed informers
		wg.Wait()
	}()
	s.factory.StartWithContext(ctx)
	for _, w := range []*crdWatch{s.policies, s.peerAuths} {
		wg.Go(func() { w.run(ctx) })
	}
	var retry <-chan time.Time // set while waiting for the caches
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.kickc:
		case <-retry:
		}
		retry = nil
		if !s.settle(ctx) {
			return nil
		}
		if !s.publish() {
			retry = time.After(syncPoll)
		}
	}
}

// settle waits until events pause for Debounce, or MaxDelay passed; it
// returns false when ctx is done.
func (s *Source) settle(ctx context.Context) bool {
	quiet := time.NewTimer(s.cfg.Debounce)
	defer quiet.Stop()
	deadline := time.NewTimer(s.cfg.MaxDelay)
	defer deadline.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-s.kickc:
			quiet.Reset(s.cfg.Debounce)
		case <-quiet.C:
			return true
		case <-deadline.C:
			return true
		}
	}
}

// publish builds the snapshot from the caches and sets the layer when it
// changed. Before the first snapshot it waits for every cache to sync and
// returns false while one has not.
func (s *Source) publish() bool {
	if !s.synced.Load() && !s.cachesSynced() {
		return false
	}
	snap := s.build()
	if s.last == nil || !reflect.DeepEqual(*s.last, snap) {
		s.cfg.Layer.Set(snap)
		s.last = &snap
		s.log.Debug("discovery layer updated", "workloads", len(snap.Workloads),
			"services", len(snap.Services), "policies", len(snap.Policies))
	}
	if !s.synced.Swap(true) {
		s.log.Info("kubernetes caches synced", "workloads", len(snap.Workloads),
			"services", len(snap.Services), "policies", len(snap.Policies))
		close(s.syncedc)
	}
	return true
}

func (s *Source) cachesSynced() bool {
	for _, inf := range []cache.SharedIndexInformer{s.pods, s.svcs, s.slices, s.nodes} {
		if !inf.HasSynced() {
			return false
		}
	}
	return s.policies.synced() && s.peerAuths.synced()
}

// build assembles a snapshot from the caches.
func (s *Source) build() discovery.Snapshot {
	pods, _ := s.factory.Core().V1().Pods().Lister().List(labels.Everything())
	svcs, _ := s.factory.Core().V1().Services().Lister().List(labels.Everything())
	eps, _ := s.factory.Discovery().V1().EndpointSlices().Lister().List(labels.Everything())
	nodes, _ := s.factory.Core().V1().Nodes().Lister().List(labels.Everything())
	s.notes.begin()
	defer s.notes.end()
	workloads := buildWorkloads(pods)
	setLocality(workloads, nodes)
	mtls, strict, perWorkload := buildMTLS(s.peerAuths.list(), s.cfg.RootNamespace, workloads, s.notes)
	for i := range workloads {
		workloads[i].MTLS = perWorkload[workloads[i].Key()]
	}
	return discovery.Snapshot{
		RootNamespace: s.cfg.RootNamespace,
		MTLS:          mtls,
		Workloads:     workloads,
		Services:      buildServices(svcs, eps),
		// STRICT that a namespace mode cannot say is enforced as policy.
		Policies: append(buildPolicies(s.policies.list(), s.notes), strict...),
	}
}

// kick asks for a rebuild; kicks during a pending one coalesce.
func (s *Source) kick() {
	select {
	case s.kickc <- struct{}{}:
	default:
	}
}

// Synced reports whether the layer holds a complete snapshot: every
// cache synced once (missing CRDs count as synced) and it was written.
func (s *Source) Synced() bool { return s.synced.Load() }

// Ready is Synced as an error, for a readiness probe.
func (s *Source) Ready() error {
	if !s.Synced() {
		return errors.New("waiting for the Kubernetes API caches to sync")
	}
	return nil
}

// WaitSynced blocks until Synced or ctx is done (returning its error).
func (s *Source) WaitSynced(ctx context.Context) error {
	select {
	case <-s.syncedc:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for kubernetes caches: %w", ctx.Err())
	}
}

// kickHandler calls kick on every event.
func kickHandler(kick func()) cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { kick() },
		UpdateFunc: func(_, _ any) { kick() },
		DeleteFunc: func(any) { kick() },
	}
}

// nodeHandler kicks a rebuild when a node comes, goes or changes its
// topology labels; the status updates every node makes all the time do
// not (istiod keeps an intermediate node-locality collection for the same
// reason, ambient/nodes.go NodesCollection).
func nodeHandler(kick func()) cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { kick() },
		UpdateFunc: func(old, cur any) {
			o, ok1 := old.(*corev1.Node)
			c, ok2 := cur.(*corev1.Node)
			if !ok1 || !ok2 || localityOf(o) != localityOf(c) {
				kick()
			}
		},
		DeleteFunc: func(any) { kick() },
	}
}

// stripManagedFields drops metadata.managedFields before objects enter
// the caches: server-side apply bookkeeping that is often larger than
// the rest of the object and never read here. Of a Node only the name
// and the topology labels are kept: its status is large and never read.
func stripManagedFields(obj any) (any, error) {
	if n, ok := obj.(*corev1.Node); ok {
		return &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion, Labels: topologyLabels(n.Labels),
		}}, nil
	}
	if a, err := meta.Accessor(obj); err == nil {
		a.SetManagedFields(nil)
	}
	return obj, nil
}
