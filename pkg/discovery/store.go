package discovery

import (
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/ambpf/ambpf/pkg/authz"
)

// Store is the in-memory Source. Its content is the merge of named
// layers, for example a "file" layer loaded from a local file and a "zds"
// layer holding the pods this node's proxy serves, which the proxy fills
// as ZDS Add and Del arrive; a pod enrolled through ZDS is thus a mesh
// workload without appearing in any file.
//
// Layers merge in priority order, higher over lower:
//   - workloads with the same namespace/name merge field by field: a
//     non-empty field of the higher layer wins, labels are united (the
//     higher layer's value wins per key);
//   - services and policies with the same namespace/name are replaced
//     whole by the higher layer;
//   - trust domain, root namespace and mesh-wide mTLS mode come from the
//     highest layer that sets them; per-namespace mTLS modes merge per
//     namespace.
//
// Every change rebuilds an immutable index and swaps it in atomically, so
// lookups never lock.
type Store struct {
	mu     sync.Mutex // guards layers and subs; serialises rebuilds
	layers []*Layer   // sorted by priority, ascending
	subs   map[chan struct{}]struct{}
	view   atomic.Pointer[view]
}

// Layer is one named, prioritised part of a Store's content.
type Layer struct {
	store    *Store
	name     string
	priority int
	snap     Snapshot // guarded by store.mu
}

var _ Source = (*Store)(nil)

// NewStore returns an empty Store.
func NewStore() *Store {
	s := &Store{subs: map[chan struct{}]struct{}{}}
	s.view.Store(buildView(nil))
	return s
}

// Layer returns the layer called name, creating it empty with priority
// when it does not exist (priority is ignored for an existing layer).
// Higher priorities win over lower ones; between equal priorities the
// layer created later wins.
func (s *Store) Layer(name string, priority int) *Layer {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.layers {
		if l.name == name {
			return l
		}
	}
	l := &Layer{store: s, name: name, priority: priority}
	i := len(s.layers)
	for i > 0 && s.layers[i-1].priority > priority {
		i--
	}
	s.layers = slices.Insert(s.layers, i, l)
	return l
}

// Name returns the layer's name.
func (l *Layer) Name() string { return l.name }

// Set replaces the layer's whole content. The store keeps snap: the
// caller must not modify it afterwards.
func (l *Layer) Set(snap Snapshot) {
	l.update(func(s *Snapshot) { *s = snap })
}

// PutWorkload adds w to the layer or replaces the workload with the same
// UID (or, when w has no UID, the same namespace/name).
func (l *Layer) PutWorkload(w Workload) {
	l.update(func(s *Snapshot) {
		s.Workloads = slices.Clone(s.Workloads)
		for i := range s.Workloads {
			if sameWorkload(&s.Workloads[i], &w) {
				s.Workloads[i] = w
				return
			}
		}
		s.Workloads = append(s.Workloads, w)
	})
}

// DeleteWorkload removes the workload with uid from the layer; it reports
// whether there was one.
func (l *Layer) DeleteWorkload(uid string) bool {
	found := false
	l.update(func(s *Snapshot) {
		s.Workloads = slices.DeleteFunc(slices.Clone(s.Workloads), func(w Workload) bool {
			if w.UID == uid {
				found = true
			}
			return w.UID == uid
		})
	})
	return found
}

// Snapshot returns the layer's current content (shared: do not modify).
func (l *Layer) Snapshot() Snapshot {
	l.store.mu.Lock()
	defer l.store.mu.Unlock()
	return l.snap
}

func sameWorkload(a, b *Workload) bool {
	if a.UID != "" || b.UID != "" {
		return a.UID == b.UID
	}
	return a.Key() == b.Key()
}

// update edits the layer's snapshot under the store lock, then rebuilds
// the view and notifies subscribers. Edits must copy before they modify
// slices: old views may still share them.
func (l *Layer) update(edit func(*Snapshot)) {
	s := l.store
	s.mu.Lock()
	defer s.mu.Unlock()
	edit(&l.snap)
	snaps := make([]*Snapshot, len(s.layers))
	for i, layer := range s.layers {
		snaps[i] = &layer.snap
	}
	s.view.Store(buildView(snaps))
	for ch := range s.subs {
		select {
		case ch <- struct{}{}:
		default: // a notification is already pending
		}
	}
}

// Subscribe implements Source.
func (s *Store) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	s.mu.Lock()
	s.subs[ch] = struct{}{}
	s.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			s.mu.Lock()
			delete(s.subs, ch)
			s.mu.Unlock()
		})
	}
}

// view is one immutable merged state with its lookup indexes.
type view struct {
	trustDomain   string
	rootNamespace string
	mtls          MTLSConfig
	workloads     map[string]*Workload // by namespace/name
	byIP          map[netip.Addr]*Workload
	byUID         map[string]*Workload
	byVIP         map[netip.Addr][]*Service
	services      map[string]*Service
	policies      []authz.Policy
	// byEndpoint lists, per endpoint IP, the services it is a ready
	// endpoint of (in namespace/name order) with its port mapping.
	byEndpoint map[netip.Addr][]endpointOf
}

// endpointOf is one service an endpoint belongs to.
type endpointOf struct {
	svc   *Service
	ports map[uint16]uint16 // the endpoint's own target ports
}

// buildView merges snaps (ascending priority) into a new view.
func buildView(snaps []*Snapshot) *view {
	v := &view{
		trustDomain:   DefaultTrustDomain,
		rootNamespace: authz.DefaultRootNamespace,
		mtls:          MTLSConfig{Mode: MTLSPermissive, Namespaces: map[string]MTLSMode{}},
		workloads:     map[string]*Workload{},
		byIP:          map[netip.Addr]*Workload{},
		byUID:         map[string]*Workload{},
		byVIP:         map[netip.Addr][]*Service{},
		services:      map[string]*Service{},
		byEndpoint:    map[netip.Addr][]endpointOf{},
	}
	var wOrder, sOrder []string // keep file order for stable output
	policies := map[string]authz.Policy{}
	var pOrder []string
	for _, s := range snaps {
		v.trustDomain = override(v.trustDomain, s.TrustDomain)
		v.rootNamespace = override(v.rootNamespace, s.RootNamespace)
		v.mtls.Mode = override(v.mtls.Mode, s.MTLS.Mode)
		maps.Copy(v.mtls.Namespaces, s.MTLS.Namespaces)
		for i := range s.Workloads {
			w := s.Workloads[i]
			if old, ok := v.workloads[w.Key()]; ok {
				w = mergeWorkload(*old, w)
			} else {
				wOrder = append(wOrder, w.Key())
			}
			v.workloads[w.Key()] = &w
		}
		for i := range s.Services {
			svc := s.Services[i]
			if _, ok := v.services[svc.Key()]; !ok {
				sOrder = append(sOrder, svc.Key())
			}
			v.services[svc.Key()] = &svc
		}
		for _, p := range s.Policies {
			if _, ok := policies[p.ID()]; !ok {
				pOrder = append(pOrder, p.ID())
			}
			policies[p.ID()] = p
		}
	}
	for _, k := range wOrder {
		w := v.workloads[k]
		for _, ip := range w.IPs {
			v.byIP[ip.Unmap()] = w
		}
		if w.UID != "" {
			v.byUID[w.UID] = w
		}
	}
	for _, k := range sOrder {
		svc := v.services[k]
		svc.ready = v.readyEndpoints(svc, wOrder)
		for _, vip := range svc.VIPs {
			v.byVIP[vip.Unmap()] = append(v.byVIP[vip.Unmap()], svc)
		}
	}
	sorted := slices.Clone(sOrder)
	slices.Sort(sorted)
	for _, k := range sorted {
		svc := v.services[k]
		for _, e := range svc.ready {
			v.byEndpoint[e.ip] = append(v.byEndpoint[e.ip], endpointOf{svc: svc, ports: e.ports})
		}
	}
	for _, id := range pOrder {
		v.policies = append(v.policies, policies[id])
	}
	return v
}

// readyEndpoints lists svc's ready endpoints: the explicit ones, then
// those of selected workloads, without duplicate IPs.
func (v *view) readyEndpoints(svc *Service, wOrder []string) []readyEndpoint {
	var out []readyEndpoint
	seen := map[netip.Addr]bool{}
	add := func(e readyEndpoint) {
		if e.ip = e.ip.Unmap(); !seen[e.ip] {
			seen[e.ip] = true
			out = append(out, e)
		}
	}
	for _, e := range svc.Endpoints {
		if e.IsReady() {
			add(readyEndpoint{ip: e.IP, node: e.Node, ports: e.Ports})
		}
	}
	if len(svc.Selector) > 0 {
		for _, k := range wOrder {
			w := v.workloads[k]
			if w.Namespace == svc.Namespace && hasLabels(w.Labels, svc.Selector) {
				for _, ip := range w.IPs {
					add(readyEndpoint{ip: ip, node: w.Node})
				}
			}
		}
	}
	return out
}

func hasLabels(labels, want map[string]string) bool {
	for k, val := range want {
		if got, ok := labels[k]; !ok || got != val {
			return false
		}
	}
	return true
}

func override[T ~string](old, new T) T {
	if new != "" {
		return new
	}
	return old
}

// mergeWorkload lays hi over lo field by field (see Store).
func mergeWorkload(lo, hi Workload) Workload {
	out := lo
	out.UID = override(lo.UID, hi.UID)
	out.ServiceAccount = override(lo.ServiceAccount, hi.ServiceAccount)
	out.Node = override(lo.Node, hi.Node)
	out.WorkloadName = override(lo.WorkloadName, hi.WorkloadName)
	out.Region = override(lo.Region, hi.Region)
	out.Zone = override(lo.Zone, hi.Zone)
	out.Network = override(lo.Network, hi.Network)
	out.Protocol = override(lo.Protocol, hi.Protocol)
	out.HBONETransport = override(lo.HBONETransport, hi.HBONETransport)
	if hi.MTLS != nil {
		out.MTLS = hi.MTLS
	}
	if len(hi.IPs) > 0 {
		out.IPs = hi.IPs
	}
	if len(hi.Labels) > 0 {
		out.Labels = maps.Clone(lo.Labels)
		if out.Labels == nil {
			out.Labels = map[string]string{}
		}
		maps.Copy(out.Labels, hi.Labels)
	}
	return out
}

// WorkloadByIP implements Source.
func (s *Store) WorkloadByIP(ip netip.Addr) (*Workload, bool) {
	w, ok := s.view.Load().byIP[ip.Unmap()]
	return w, ok
}

// WorkloadByUID implements Source.
func (s *Store) WorkloadByUID(uid string) (*Workload, bool) {
	w, ok := s.view.Load().byUID[uid]
	return w, ok
}

// Workload finds a workload by namespace and name.
func (s *Store) Workload(namespace, name string) (*Workload, bool) {
	w, ok := s.view.Load().workloads[namespace+"/"+name]
	return w, ok
}

// ServiceByVIP implements Source.
func (s *Store) ServiceByVIP(addr netip.AddrPort) (*Service, bool) {
	svcs := s.view.Load().byVIP[addr.Addr().Unmap()]
	for _, svc := range svcs {
		if _, ok := svc.Ports[addr.Port()]; ok {
			return svc, true
		}
	}
	if len(svcs) > 0 {
		return svcs[0], true // a known VIP on an unknown port: refused
	}
	return nil, false
}

// PickEndpoint implements Source.
func (s *Store) PickEndpoint(svc *Service, port uint16) (netip.AddrPort, bool) {
	return s.PickEndpointFrom(svc, port, nil)
}

// PickEndpointFrom implements Source. svc must come from this Store.
func (s *Store) PickEndpointFrom(svc *Service, port uint16, src *Workload) (netip.AddrPort, bool) {
	target, ok := svc.TargetPort(port)
	if !ok || len(svc.ready) == 0 {
		return netip.AddrPort{}, false
	}
	eps := svc.ready
	if svc.NodeLocal {
		eps = nil
		if src != nil && src.Node != "" {
			for _, e := range svc.ready {
				if e.node == src.Node {
					eps = append(eps, e)
				}
			}
		}
		if len(eps) == 0 {
			return netip.AddrPort{}, false
		}
	}
	e := eps[rand.IntN(len(eps))]
	if t, ok := e.ports[port]; ok && t != 0 {
		target = t
	}
	return netip.AddrPortFrom(e.ip, target), true
}

// InboundService returns the Service an inbound connection to ip:port
// is reported under (destination_service), as ztunnel's
// guess_inbound_service chooses it: among the Services ip is a ready
// endpoint of, the one whose hostname is host (the client's Forwarded
// host=; a name outside that set is ignored), else the first, by
// namespace/name, with a service port whose target port is port (the
// endpoint's own mapping included).
func (s *Store) InboundService(ip netip.Addr, host string, port uint16) (*Service, bool) {
	of := s.view.Load().byEndpoint[ip.Unmap()]
	if host != "" {
		for _, e := range of {
			if e.svc.Hostname() == host {
				return e.svc, true
			}
		}
	}
	for _, e := range of {
		for sport := range e.svc.Ports {
			if t, _ := e.svc.TargetPort(sport); t == port || e.ports[sport] == port {
				return e.svc, true
			}
		}
	}
	return nil, false
}

// PoliciesFor implements Source.
func (s *Store) PoliciesFor(w *Workload) []authz.Policy {
	v := s.view.Load()
	var out []authz.Policy
	for i := range v.policies {
		if v.policies[i].AppliesTo(v.rootNamespace, w.Namespace, w.Labels) {
			out = append(out, v.policies[i])
		}
	}
	return out
}

// Policies returns every merged authorization policy, in layer order.
func (s *Store) Policies() []authz.Policy {
	return slices.Clone(s.view.Load().policies)
}

// MTLSMode implements Source.
func (s *Store) MTLSMode(namespace string) MTLSMode {
	v := s.view.Load()
	if m, ok := v.mtls.Namespaces[namespace]; ok && m != "" {
		return m
	}
	return v.mtls.Mode
}

// TrustDomain implements Source.
func (s *Store) TrustDomain() string { return s.view.Load().trustDomain }

// RootNamespace implements Source.
func (s *Store) RootNamespace() string { return s.view.Load().rootNamespace }

// Workloads returns every merged workload, sorted by namespace/name.
func (s *Store) Workloads() []*Workload {
	v := s.view.Load()
	out := make([]*Workload, 0, len(v.workloads))
	for _, w := range v.workloads {
		out = append(out, w)
	}
	slices.SortFunc(out, func(a, b *Workload) int { return strings.Compare(a.Key(), b.Key()) })
	return out
}

// Services returns every merged service, sorted by namespace/name.
func (s *Store) Services() []*Service {
	v := s.view.Load()
	out := make([]*Service, 0, len(v.services))
	for _, svc := range v.services {
		out = append(out, svc)
	}
	slices.SortFunc(out, func(a, b *Service) int { return strings.Compare(a.Key(), b.Key()) })
	return out
}
