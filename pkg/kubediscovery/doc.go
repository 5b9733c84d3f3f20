// Package kubediscovery keeps a discovery layer (pkg/discovery) equal to
// what the Kubernetes API says about the mesh, for the proxy: workloads
// from Pods, TCP routing from Services and EndpointSlices, L4 policy from
// Istio AuthorizationPolicies and mTLS modes from PeerAuthentications.
//
// Source watches the API with informers and, after a burst of events has
// been quiet for Config.Debounce (or Config.MaxDelay at most), rebuilds
// the whole snapshot from the informers' caches and calls Layer.Set once,
// only when the content changed. Nothing is written before every informer
// has synced, so a half-listed cluster (pods but not yet the DENY
// policies) is never served; Synced and Ready report that point.
//
// # Pods
//
// Every pod that has IPs (status.podIPs), is not hostNetwork (its IP is
// the node's, shared with every other hostNetwork pod) and is not
// finished (phase Succeeded or Failed, whose IPs may already be reused) is
// a workload: namespace, name, UID, service account (default "default"),
// IPs, labels and node. A pod annotated ambient.istio.io/redirection=enabled
// (written by the node agent once the pod's datapath is attached and its
// proxy acknowledged it) is marked HBONE. Other pods are kept, with
// the protocol left empty (plain TCP), rather than left out: like
// ztunnel, the proxy then knows their namespace and labels for metrics
// and policies; and an empty protocol lets a lower layer (the pods this
// node enrolled through ZDS) still say HBONE during the moment between
// the ZDS Add and the agent writing the annotation. When two pods claim
// one IP (a terminating pod and its successor), the IP goes to the pod
// that is not being deleted, then to the newer one.
//
// # Services
//
// A Service with cluster IPs (not ExternalName) is a discovery.Service:
// its VIPs are spec.clusterIPs; a headless one (clusterIP None) is kept
// with no VIP and Headless set, so that the DNS proxy answers its name
// with its endpoints (it is never routed: there is no VIP). Its TCP ports map
// port to targetPort. A named targetPort is resolved through the port
// of the same name in the service's EndpointSlices (label
// kubernetes.io/service-name), which carries the number the EndpointSlice
// controller resolved from the pods; a port that no slice resolves yet is
// left out (the VIP:port then does not match the service). When slices
// disagree (pods that name the port differently) the slice first by name
// wins: discovery.Service holds one target per port. Endpoints are the
// IPv4 and IPv6 addresses of those slices; conditions.ready false makes
// an endpoint not ready (unset means ready, as the API documents). An
// address listed by several slices is ready if any says so.
//
// # Policies and mTLS
//
// security.istio.io/v1 AuthorizationPolicy objects are read with the
// dynamic client and decoded from JSON into authz.Policy; an unknown
// field, a wrong type or a value authz.Policy.Validate refuses makes the
// policy malformed: it is enforced as a DENY of everything for the
// workloads its selector (if readable, else its namespace) selects — fail
// closed, since skipping it could open traffic — and logged once (per
// object version) at error level with the reason. Policies with HTTP attributes are kept
// (authz drops those attributes as istiod does) and logged at warning
// level, as the file loader does; istio.io/dry-run policies are logged at
// info level and only evaluated for the log.
//
// security.istio.io/v1 PeerAuthentications are resolved into modes as
// istiod resolves them for ztunnel (details in buildMTLS): the oldest
// namespace-wide object of Config.RootNamespace sets the mesh mode, the
// oldest of another namespace that namespace's; UNSET inherits; DISABLE
// accepts plaintext as PERMISSIVE does (HBONE itself is always mTLS). The
// oldest workload-level object (spec.selector.matchLabels, outside the
// root namespace) selecting a pod sets discovery.Workload.MTLS: the
// workload's own mode, either way (STRICT in a PERMISSIVE namespace
// refuses plaintext, PERMISSIVE in a STRICT one accepts it), and its
// portLevelMtls per port. portLevelMtls on a namespace-wide object, which
// istiod ignores, keeps its STRICT ports as a DENY of plaintext
// (converted_peer_authentication_<name>).
//
// A PeerAuthentication the proxy cannot apply never degrades silently: a
// malformed spec (a wrong type, a field Istio's PeerAuthentication does not
// have), a selector other than matchLabels, an unknown mode (mesh, or a
// port's) or a portLevelMtls key that is not a port fails closed: it is
// enforced as STRICT (plaintext refused) for the workloads it selects, its
// whole namespace (mesh-wide in the root namespace) when the selector
// cannot be read, and logged at error level.
//
// When a CRD is not installed, its kind is simply empty: the source logs
// that once, counts the kind as synced, and looks for the CRD again every
// Config.CRDPoll; once it appears its objects are watched. A CRD deleted
// while watched empties its kind and goes back to polling.
package kubediscovery
