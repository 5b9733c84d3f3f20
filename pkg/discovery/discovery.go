package discovery

import (
	"fmt"
	"net/netip"

	"github.com/ambpf/ambpf/pkg/authz"
)

// Protocol is how a workload is reached.
type Protocol string

const (
	// ProtocolHBONE: the workload has a mesh proxy; connect over HBONE to
	// its port 15008.
	ProtocolHBONE Protocol = "HBONE"
	// ProtocolTCP: plain TCP straight to the workload (the default, as a
	// workload outside the mesh has no proxy to terminate HBONE).
	ProtocolTCP Protocol = "TCP"
)

// MTLSMode is Istio's PeerAuthentication mode for inbound traffic.
type MTLSMode string

const (
	// MTLSPermissive accepts plaintext and mTLS (Istio's default).
	MTLSPermissive MTLSMode = "PERMISSIVE"
	// MTLSStrict accepts only mTLS (HBONE).
	MTLSStrict MTLSMode = "STRICT"
)

// DefaultTrustDomain is the SPIFFE trust domain when none is configured.
const DefaultTrustDomain = "cluster.local"

// Workload is one pod (or VM) the proxy may talk to or on behalf of.
type Workload struct {
	UID            string            `json:"uid,omitempty"`
	Name           string            `json:"name"`
	Namespace      string            `json:"namespace"`
	ServiceAccount string            `json:"serviceAccount,omitempty"`
	IPs            []netip.Addr      `json:"ips,omitempty"`
	Labels         map[string]string `json:"labels,omitempty"`
	Node           string            `json:"node,omitempty"`
	// WorkloadName is the workload the pod belongs to, as Istio names it
	// in metrics (the Deployment behind a ReplicaSet, the CronJob behind a
	// Job, else the controller); "" means Name.
	WorkloadName string `json:"workloadName,omitempty"`
	// Region and Zone are the locality of the workload's node, as istiod
	// takes it from the node's topology.kubernetes.io/region and
	// topology.kubernetes.io/zone labels (ambient/nodes.go nodeLocality):
	// the source_/destination_region and _zone metric labels and the
	// cloud.region / cloud.availability_zone baggage.
	Region string `json:"region,omitempty"`
	Zone   string `json:"zone,omitempty"`
	// Network names the L3 network for multi-network meshes; "" is the
	// local network. Lookups by IP do not distinguish networks yet.
	Network string `json:"network,omitempty"`
	// Protocol is HBONE or TCP; "" means TCP.
	Protocol Protocol `json:"protocol,omitempty"`
	// MTLS, when set, is the workload-level PeerAuthentication outcome: it
	// overrides the namespace mode for this workload (Mode) and per port
	// (Ports).
	MTLS *WorkloadMTLS `json:"mtls,omitempty"`
	// HBONETransport picks the HBONE transport clients use to reach the
	// workload: h3 (HTTP/3 over UDP 15008, falling back to h2 when it
	// does not answer) or h2; "" leaves it to the proxy's settings.
	HBONETransport HBONETransport `json:"hboneTransport,omitempty"`
}

// WorkloadMTLS is a workload's own mTLS mode, as a workload-level
// PeerAuthentication sets it.
type WorkloadMTLS struct {
	// Mode is STRICT or PERMISSIVE; "" inherits the namespace's.
	Mode MTLSMode `json:"mode,omitempty"`
	// Ports overrides the mode for a destination (workload) port.
	Ports map[uint16]MTLSMode `json:"ports,omitempty"`
}

// ModeFor returns the mode of port on a workload whose namespace has
// mode inherited: the port's, else the workload's, else inherited.
func (m *WorkloadMTLS) ModeFor(port uint16, inherited MTLSMode) MTLSMode {
	if m == nil {
		return inherited
	}
	if pm, ok := m.Ports[port]; ok {
		return pm
	}
	if m.Mode != "" {
		return m.Mode
	}
	return inherited
}

// HBONETransport is how HBONE reaches a workload.
type HBONETransport string

const (
	HBONETransportH2 HBONETransport = "h2" // HTTP/2 over TCP, Istio's HBONE
	HBONETransportH3 HBONETransport = "h3" // HTTP/3 over QUIC (UDP)
)

// Key is "namespace/name", the identity of a workload across layers.
func (w *Workload) Key() string { return w.Namespace + "/" + w.Name }

// Identity is the workload's SPIFFE ID in trustDomain ("" means
// DefaultTrustDomain); a missing service account is "default", as in
// Kubernetes.
func (w *Workload) Identity(trustDomain string) string {
	if trustDomain == "" {
		trustDomain = DefaultTrustDomain
	}
	sa := w.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	return "spiffe://" + trustDomain + "/ns/" + w.Namespace + "/sa/" + sa
}

// HBONE reports whether the workload is reached over HBONE.
func (w *Workload) HBONE() bool { return w.Protocol == ProtocolHBONE }

// Service is a Kubernetes-style service: virtual IPs in front of
// endpoints.
type Service struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	// VIPs are the cluster IPs the service answers on.
	VIPs []netip.Addr `json:"vips,omitempty"`
	// Headless marks a Kubernetes headless service (clusterIP None): no
	// VIP, so it is never routed, but its name resolves to its endpoints.
	Headless bool `json:"headless,omitempty"`
	// Ports maps a service port to the endpoints' target port; a target
	// of 0 means the same port.
	Ports map[uint16]uint16 `json:"ports,omitempty"`
	// Endpoints are listed explicitly, or derived from Selector.
	Endpoints []Endpoint `json:"endpoints,omitempty"`
	// Selector, when set, adds every workload of the service's namespace
	// whose labels contain it as a ready endpoint (all its IPs), including
	// workloads from other layers such as pods enrolled through ZDS.
	Selector map[string]string `json:"selector,omitempty"`

	// NodeLocal is internalTrafficPolicy: Local: clients only reach the
	// endpoints on their own node (none when there is none there).
	NodeLocal bool `json:"nodeLocal,omitempty"`

	ready []readyEndpoint // ready endpoints, set when indexed
}

// readyEndpoint is one endpoint a pick may return.
type readyEndpoint struct {
	ip    netip.Addr
	node  string
	ports map[uint16]uint16
}

// Endpoint is one backend address of a service.
type Endpoint struct {
	IP netip.Addr `json:"ip"`
	// Ready is nil in a file when omitted, which means ready.
	Ready *bool `json:"ready,omitempty"`
	// Node is the node the endpoint runs on, for NodeLocal services.
	Node string `json:"node,omitempty"`
	// Ports maps a service port to this endpoint's target port where it
	// differs from the service's (a named targetPort that pods number
	// differently); it wins over Service.Ports, as in ztunnel.
	Ports map[uint16]uint16 `json:"ports,omitempty"`
}

// IsReady reports whether the endpoint may receive new connections.
func (e Endpoint) IsReady() bool { return e.Ready == nil || *e.Ready }

// Key is "namespace/name".
func (s *Service) Key() string { return s.Namespace + "/" + s.Name }

// Hostname is the cluster DNS name (name.namespace.svc.cluster.local),
// the form Istio uses in destination_service.
func (s *Service) Hostname() string {
	return s.Name + "." + s.Namespace + ".svc.cluster.local"
}

// TargetPort returns the endpoint port for service port p, and false when
// p is not a port of the service.
func (s *Service) TargetPort(p uint16) (uint16, bool) {
	t, ok := s.Ports[p]
	if !ok {
		return 0, false
	}
	if t == 0 {
		t = p
	}
	return t, true
}

// MTLSConfig is the mesh-wide mTLS mode and per-namespace overrides.
type MTLSConfig struct {
	// Mode is the mesh-wide mode; "" means PERMISSIVE.
	Mode       MTLSMode            `json:"mode,omitempty"`
	Namespaces map[string]MTLSMode `json:"namespaces,omitempty"`
}

// Snapshot is the full content of one layer.
type Snapshot struct {
	// TrustDomain and RootNamespace, when set, override lower layers.
	TrustDomain   string         `json:"trustDomain,omitempty"`
	RootNamespace string         `json:"rootNamespace,omitempty"`
	MTLS          MTLSConfig     `json:"mtls,omitempty"`
	Workloads     []Workload     `json:"workloads,omitempty"`
	Services      []Service      `json:"services,omitempty"`
	Policies      []authz.Policy `json:"policies,omitempty"`
}

// Source is what the proxy reads about the mesh. Returned pointers and
// slices belong to an immutable view: callers must not modify them, and
// may keep them after a change (they then describe the old state).
// Implementations are safe for concurrent use.
type Source interface {
	// WorkloadByIP finds the workload that owns ip (IPv4-mapped IPv6
	// addresses are unmapped first).
	WorkloadByIP(ip netip.Addr) (*Workload, bool)
	// WorkloadByUID finds a workload by its UID.
	WorkloadByUID(uid string) (*Workload, bool)
	// ServiceByVIP finds the service with VIP addr.Addr(), preferring
	// one that has addr.Port() as a service port. A VIP on a port no
	// service has still finds a service, so that the caller refuses the
	// connection (PickEndpoint fails) as ztunnel does (NoHealthyUpstream)
	// rather than sending it to the VIP in plaintext.
	ServiceByVIP(addr netip.AddrPort) (*Service, bool)
	// PickEndpoint returns a ready endpoint of svc for service port port,
	// chosen at random as ztunnel does (uniformly: Kubernetes workloads
	// all have ztunnel's default capacity 1), with its target port (the
	// endpoint's own mapping first, then the service's); false when no
	// endpoint is ready or port is not a service port. A NodeLocal
	// service needs PickEndpointFrom.
	PickEndpoint(svc *Service, port uint16) (netip.AddrPort, bool)
	// PickEndpointFrom is PickEndpoint for a client workload src (nil
	// when unknown): for a NodeLocal service only endpoints on src's node
	// are chosen.
	PickEndpointFrom(svc *Service, port uint16, src *Workload) (netip.AddrPort, bool)
	// PoliciesFor returns the authorization policies that apply to w.
	// Evaluate them with the source's root namespace (see Authorize),
	// or root-namespace policies are skipped when it is not the default.
	PoliciesFor(w *Workload) []authz.Policy
	// MTLSMode returns the mode for workloads in namespace.
	MTLSMode(namespace string) MTLSMode
	// TrustDomain is the mesh's SPIFFE trust domain.
	TrustDomain() string
	// RootNamespace is the namespace of mesh-wide policies.
	RootNamespace() string
	// Subscribe returns a channel that receives a value after every
	// change (changes in a burst may be coalesced into one value) and a
	// function that stops the subscription.
	Subscribe() (<-chan struct{}, func())
}

// Authorize decides an inbound connection c to workload dst with the
// policies src has for dst and src's root namespace. It fills c's
// destination namespace and labels from dst.
func Authorize(src Source, dst *Workload, c authz.Conn) authz.Decision {
	c.DstNamespace, c.DstLabels = dst.Namespace, dst.Labels
	return authz.Evaluator{RootNamespace: src.RootNamespace()}.Evaluate(src.PoliciesFor(dst), c)
}

// AdmitPlaintext decides a plaintext (no peer identity) inbound
// connection c to dst: refused when the mTLS mode of dst's namespace is
// STRICT, else authorized without identity, so that the DENY policies a
// workload- or port-level STRICT PeerAuthentication becomes (and any
// policy requiring a principal) refuse it too.
func AdmitPlaintext(src Source, dst *Workload, c authz.Conn) authz.Decision {
	ns := src.MTLSMode(dst.Namespace)
	if mode := dst.MTLS.ModeFor(c.DstPort, ns); mode == MTLSStrict {
		if ns == MTLSStrict {
			return authz.Decision{Rule: -1, Reason: "plaintext refused: mTLS mode STRICT for namespace " + dst.Namespace}
		}
		return authz.Decision{Rule: -1, Reason: fmt.Sprintf("plaintext refused: mTLS mode STRICT for workload %s port %d", dst.Key(), c.DstPort)}
	}
	c.SrcIdentity = ""
	return Authorize(src, dst, c)
}

// validate checks the parts of a snapshot that unmarshalling cannot:
// required names, known enum values, ports, duplicate keys and IPs.
func (s *Snapshot) validate() error {
	seenW := map[string]bool{}
	seenIP := map[netip.Addr]string{}
	for i := range s.Workloads {
		w := &s.Workloads[i]
		if w.Name == "" || w.Namespace == "" {
			return fmt.Errorf("workloads[%d]: name and namespace are required", i)
		}
		if seenW[w.Key()] {
			return fmt.Errorf("workload %s: defined twice", w.Key())
		}
		seenW[w.Key()] = true
		switch w.Protocol {
		case "", ProtocolTCP, ProtocolHBONE:
		default:
			return fmt.Errorf("workload %s: protocol %q is not HBONE or TCP", w.Key(), w.Protocol)
		}
		if w.MTLS != nil {
			if err := validMode(w.MTLS.Mode); err != nil {
				return fmt.Errorf("workload %s: mtls.mode: %w", w.Key(), err)
			}
			for p, m := range w.MTLS.Ports {
				if err := validMode(m); err != nil || m == "" || p == 0 {
					return fmt.Errorf("workload %s: mtls.ports[%d]: %q is not STRICT or PERMISSIVE", w.Key(), p, m)
				}
			}
		}
		switch w.HBONETransport {
		case "", HBONETransportH2, HBONETransportH3:
		default:
			return fmt.Errorf("workload %s: hboneTransport %q is not h2 or h3", w.Key(), w.HBONETransport)
		}
		for _, ip := range w.IPs {
			if other, dup := seenIP[ip.Unmap()]; dup {
				return fmt.Errorf("workload %s: IP %s already belongs to %s", w.Key(), ip, other)
			}
			seenIP[ip.Unmap()] = w.Key()
		}
	}
	seenS := map[string]bool{}
	for i := range s.Services {
		svc := &s.Services[i]
		if svc.Name == "" || svc.Namespace == "" {
			return fmt.Errorf("services[%d]: name and namespace are required", i)
		}
		if seenS[svc.Key()] {
			return fmt.Errorf("service %s: defined twice", svc.Key())
		}
		seenS[svc.Key()] = true
		if _, zero := svc.Ports[0]; zero {
			return fmt.Errorf("service %s: port 0", svc.Key())
		}
		for j, e := range svc.Endpoints {
			if !e.IP.IsValid() {
				return fmt.Errorf("service %s: endpoints[%d]: ip is required", svc.Key(), j)
			}
		}
	}
	if err := validMode(s.MTLS.Mode); err != nil {
		return fmt.Errorf("mtls.mode: %w", err)
	}
	for ns, m := range s.MTLS.Namespaces {
		if err := validMode(m); err != nil {
			return fmt.Errorf("mtls.namespaces[%s]: %w", ns, err)
		}
	}
	seenP := map[string]bool{}
	for i := range s.Policies {
		p := &s.Policies[i]
		if p.Metadata.Namespace == "" {
			return fmt.Errorf("policy %q: metadata.namespace is required", p.Metadata.Name)
		}
		if seenP[p.ID()] {
			return fmt.Errorf("policy %s: defined twice", p.ID())
		}
		seenP[p.ID()] = true
		if err := p.Validate(); err != nil {
			return fmt.Errorf("policy %s: %w", p.ID(), err)
		}
	}
	return nil
}

// Validate reports whether m is a mode the proxy honours: STRICT,
// PERMISSIVE or empty (inherit).
func (m MTLSMode) Validate() error { return validMode(m) }

func validMode(m MTLSMode) error {
	switch m {
	case "", MTLSStrict, MTLSPermissive:
		return nil
	case "DISABLE":
		// As in Istio ambient: HBONE implies mTLS, so DISABLE cannot be
		// honoured; refusing it is clearer than silently ignoring it.
		return fmt.Errorf("DISABLE is not supported in ambient mode")
	}
	return fmt.Errorf("%q is not STRICT or PERMISSIVE", m)
}
