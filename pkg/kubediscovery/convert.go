package kubediscovery

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"regexp"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/discovery"
)

// Annotation the node agent sets on enrolled pods (see the Kubernetes
// contract): peers reach a pod marked enabled over HBONE.
const (
	RedirectionAnnotation = "ambient.istio.io/redirection"
	RedirectionEnabled    = "enabled"
)

// buildWorkloads turns pods into workloads (rules in the package doc),
// sorted by namespace/name.
func buildWorkloads(pods []*corev1.Pod) []discovery.Workload {
	var live []*corev1.Pod
	for _, p := range pods {
		if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		live = append(live, p)
	}
	// Hand out IPs to the preferred pods first: not being deleted, then
	// newest. A pod left with no IP is dropped.
	slices.SortStableFunc(live, func(a, b *corev1.Pod) int {
		if da, db := a.DeletionTimestamp != nil, b.DeletionTimestamp != nil; da != db {
			if da {
				return 1
			}
			return -1
		}
		if c := b.CreationTimestamp.Compare(a.CreationTimestamp.Time); c != 0 {
			return c
		}
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	owner := map[netip.Addr]bool{}
	var out []discovery.Workload
	for _, p := range live {
		var ips []netip.Addr
		for _, ip := range podIPs(p) {
			if !owner[ip] {
				owner[ip] = true
				ips = append(ips, ip)
			}
		}
		if len(ips) == 0 {
			continue
		}
		w := discovery.Workload{
			UID:            string(p.UID),
			Name:           p.Name,
			Namespace:      p.Namespace,
			ServiceAccount: cmp.Or(p.Spec.ServiceAccountName, "default"),
			IPs:            ips,
			Labels:         p.Labels,
			Node:           p.Spec.NodeName,
			WorkloadName:   workloadName(p),
		}
		if p.Annotations[RedirectionAnnotation] == RedirectionEnabled {
			w.Protocol = discovery.ProtocolHBONE
		}
		out = append(out, w)
	}
	slices.SortFunc(out, func(a, b discovery.Workload) int { return strings.Compare(a.Key(), b.Key()) })
	return out
}

// cronJobName matches a Job a CronJob made: <cronjob>-<8 to 10 digits>.
var cronJobName = regexp.MustCompile(`^(.+)-\d{8,10}$`)

// workloadName names the pod's workload as Istio's metrics do
// (pkg/kube/util.go GetDeployMetaFromPod): a generated pod's controller,
// with a ReplicaSet's pod-template-hash suffix removed (its Deployment)
// and a CronJob's Job suffix removed; the pod's own name otherwise.
func workloadName(p *corev1.Pod) string {
	if p.GenerateName == "" {
		return p.Name
	}
	for _, ref := range p.OwnerReferences {
		if ref.Controller == nil || !*ref.Controller {
			continue
		}
		switch hash := p.Labels["pod-template-hash"]; {
		case ref.Kind == "ReplicaSet" && hash != "" && strings.HasSuffix(ref.Name, hash):
			return strings.TrimSuffix(ref.Name, "-"+hash)
		case ref.Kind == "Job":
			if m := cronJobName.FindStringSubmatch(ref.Name); m != nil {
				return m[1]
			}
		}
		return ref.Name
	}
	return p.Name
}

// podIPs parses status.podIPs, or status.podIP when the list is empty.
func podIPs(p *corev1.Pod) []netip.Addr {
	raw := make([]string, 0, len(p.Status.PodIPs))
	for _, ip := range p.Status.PodIPs {
		raw = append(raw, ip.IP)
	}
	if len(raw) == 0 && p.Status.PodIP != "" {
		raw = append(raw, p.Status.PodIP)
	}
	return parseAddrs(raw)
}

// parseAddrs parses IPs, unmapped, skipping the unparsable (the API
// server validates them; this only guards against surprises).
func parseAddrs(raw []string) []netip.Addr {
	var out []netip.Addr
	for _, s := range raw {
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// serviceNameLabel links an EndpointSlice to its Service.
const serviceNameLabel = discoveryv1.LabelServiceName

// buildServices turns Services and their EndpointSlices into services
// (rules in the package doc), sorted by namespace/name.
func buildServices(svcs []*corev1.Service, eps []*discoveryv1.EndpointSlice) []discovery.Service {
	bySvc := map[string][]*discoveryv1.EndpointSlice{}
	for _, es := range eps {
		if name := es.Labels[serviceNameLabel]; name != "" {
			k := es.Namespace + "/" + name
			bySvc[k] = append(bySvc[k], es)
		}
	}
	var out []discovery.Service
	for _, s := range svcs {
		if s.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		vipStrs := s.Spec.ClusterIPs
		if len(vipStrs) == 0 && s.Spec.ClusterIP != "" {
			vipStrs = []string{s.Spec.ClusterIP}
		}
		vips := parseAddrs(vipStrs) // "None" (headless) does not parse
		headless := s.Spec.ClusterIP == corev1.ClusterIPNone
		if len(vips) == 0 && !headless {
			continue
		}
		own := bySvc[s.Namespace+"/"+s.Name]
		slices.SortFunc(own, func(a, b *discoveryv1.EndpointSlice) int { return strings.Compare(a.Name, b.Name) })
		svc := discovery.Service{
			Name:      s.Name,
			Namespace: s.Namespace,
			VIPs:      vips,
			Headless:  headless,
			Ports:     map[uint16]uint16{},
			Endpoints: endpoints(own, s.Spec.Ports, s.Spec.PublishNotReadyAddresses),
			NodeLocal: s.Spec.InternalTrafficPolicy != nil && *s.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal,
		}
		for _, sp := range s.Spec.Ports {
			if !isTCP(&sp.Protocol) || sp.Port <= 0 || sp.Port > 0xffff {
				continue
			}
			if target, ok := targetPort(sp, own); ok {
				svc.Ports[uint16(sp.Port)] = target
			}
		}
		out = append(out, svc)
	}
	slices.SortFunc(out, func(a, b discovery.Service) int { return strings.Compare(a.Key(), b.Key()) })
	return out
}

func isTCP(p *corev1.Protocol) bool { return p == nil || *p == "" || *p == corev1.ProtocolTCP }

// targetPort resolves a service port's target: a number as is (0: the
// same port), a name through the slices' port of the service port's name.
func targetPort(sp corev1.ServicePort, slices []*discoveryv1.EndpointSlice) (uint16, bool) {
	if sp.TargetPort.Type == intstr.Int {
		n := sp.TargetPort.IntVal
		if n == 0 {
			n = sp.Port
		}
		return uint16(n), n > 0 && n <= 0xffff
	}
	for _, es := range slices {
		for _, p := range es.Ports {
			if p.Name != nil && *p.Name == sp.Name && isTCP(p.Protocol) && p.Port != nil && *p.Port > 0 && *p.Port <= 0xffff {
				return uint16(*p.Port), true
			}
		}
	}
	return 0, false
}

// endpoints merges the IP endpoints of slices, sorted by address; an
// address is ready when any slice says it is, or always when the service
// publishes not-ready addresses (as Istio treats them). A named
// targetPort maps, per endpoint, to the number its own slice gives the
// port of that name (pods may number it differently), as ztunnel's
// per-endpoint port map.
func endpoints(own []*discoveryv1.EndpointSlice, svcPorts []corev1.ServicePort, publishNotReady bool) []discovery.Endpoint {
	type acc struct {
		ready bool
		node  string
		ports map[uint16]uint16
	}
	byIP := map[netip.Addr]*acc{}
	for _, es := range own {
		if es.AddressType != discoveryv1.AddressTypeIPv4 && es.AddressType != discoveryv1.AddressTypeIPv6 {
			continue // FQDN
		}
		named := map[uint16]uint16{}
		for _, sp := range svcPorts {
			if sp.TargetPort.Type != intstr.String || !isTCP(&sp.Protocol) || sp.Port <= 0 || sp.Port > 0xffff {
				continue
			}
			if t, ok := targetPort(sp, []*discoveryv1.EndpointSlice{es}); ok {
				named[uint16(sp.Port)] = t
			}
		}
		for _, ep := range es.Endpoints {
			ok := publishNotReady || ep.Conditions.Ready == nil || *ep.Conditions.Ready
			for _, ip := range parseAddrs(ep.Addresses) {
				a := byIP[ip]
				if a == nil {
					a = &acc{}
					byIP[ip] = a
				}
				a.ready = a.ready || ok
				if ep.NodeName != nil && a.node == "" {
					a.node = *ep.NodeName
				}
				for p, t := range named {
					if a.ports == nil {
						a.ports = map[uint16]uint16{}
					}
					if _, set := a.ports[p]; !set {
						a.ports[p] = t
					}
				}
			}
		}
	}
	out := make([]discovery.Endpoint, 0, len(byIP))
	notReady := false
	for ip, a := range byIP {
		e := discovery.Endpoint{IP: ip, Node: a.node, Ports: a.ports}
		if !a.ready {
			e.Ready = &notReady
		}
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b discovery.Endpoint) int { return a.IP.Compare(b.IP) })
	return out
}

// decodePolicy converts an AuthorizationPolicy object into authz.Policy.
// The spec is decoded strictly (an unknown field is an error, as in a
// discovery file: a misspelt field must not silently widen a policy) and
// validated.
func decodePolicy(u *unstructured.Unstructured) (authz.Policy, error) {
	p := authz.Policy{
		APIVersion: u.GetAPIVersion(),
		Kind:       u.GetKind(),
		Metadata: authz.ObjectMeta{Name: u.GetName(), Namespace: u.GetNamespace(), Labels: u.GetLabels(),
			Annotations: dryRunOnly(u.GetAnnotations())},
	}
	if spec, ok := u.Object["spec"]; ok && spec != nil {
		if err := decodeJSON(spec, &p.Spec, true); err != nil {
			return authz.Policy{}, fmt.Errorf("spec: %w", err)
		}
	}
	if err := p.Validate(); err != nil {
		return authz.Policy{}, err
	}
	return p, nil
}

// dryRunOnly keeps the one annotation the evaluator reads, so that the
// snapshot does not change with unrelated annotations
// (kubectl.kubernetes.io/last-applied-configuration).
func dryRunOnly(a map[string]string) map[string]string {
	if v, ok := a[authz.DryRunAnnotation]; ok {
		return map[string]string{authz.DryRunAnnotation: v}
	}
	return nil
}

// decodeJSON converts a JSON-shaped value (from an unstructured object)
// into out; strict refuses unknown fields.
func decodeJSON(v any, out any, strict bool) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	if strict {
		dec.DisallowUnknownFields()
	}
	return dec.Decode(out)
}

// buildPolicies decodes every AuthorizationPolicy, sorted by
// namespace/name, noting the malformed (skipped) and those with L7
// fields (kept).
func buildPolicies(objs []*unstructured.Unstructured, n *notes) []authz.Policy {
	var out []authz.Policy
	for _, u := range sortObjects(objs) {
		key := "AuthorizationPolicy " + u.GetNamespace() + "/" + u.GetName()
		p, err := decodePolicy(u)
		if err != nil {
			n.add(slog.LevelError, key, "malformed authorization policy: denying all traffic to the workloads it selects (fail closed)", "error", err)
			out = append(out, denyAll(u))
			continue
		}
		if p.DryRun() {
			n.add(slog.LevelInfo, key, "dry-run authorization policy: evaluated and logged, not enforced")
		}
		if l7 := p.L7Fields(); len(l7) > 0 {
			n.add(slog.LevelWarn, key, authz.HTTPAttributesWarning, "fields", l7)
		}
		out = append(out, p)
	}
	return out
}

// denyAll stands in for a policy that cannot be read. Skipping it could
// open traffic (a lost DENY, or a lost sole ALLOW that made others
// deny-by-default), so it becomes a DENY of everything for the workloads it
// selects; an unreadable selector widens that to its whole namespace.
func denyAll(u *unstructured.Unstructured) authz.Policy {
	p := authz.Policy{
		Metadata: authz.ObjectMeta{Name: u.GetName(), Namespace: u.GetNamespace()},
		Spec:     authz.Spec{Action: authz.ActionDeny, Rules: []authz.Rule{{}}},
	}
	if labels, ok, err := unstructured.NestedStringMap(u.Object, "spec", "selector", "matchLabels"); ok && err == nil {
		p.Spec.Selector = &authz.Selector{MatchLabels: labels}
	}
	return p
}

// sortObjects returns objs sorted by namespace/name, for a stable
// snapshot (informer caches list in map order).
func sortObjects(objs []*unstructured.Unstructured) []*unstructured.Unstructured {
	out := slices.Clone(objs)
	slices.SortFunc(out, func(a, b *unstructured.Unstructured) int {
		return cmp.Or(strings.Compare(a.GetNamespace(), b.GetNamespace()), strings.Compare(a.GetName(), b.GetName()))
	})
	return out
}

// locality is a node's region and zone.
type locality struct{ region, zone string }

// localityOf reads a node's locality as istiod does (ambient/nodes.go
// nodeLocality): the topology.kubernetes.io/region and /zone labels.
func localityOf(n *corev1.Node) locality {
	return locality{region: n.Labels[corev1.LabelTopologyRegion], zone: n.Labels[corev1.LabelTopologyZone]}
}

// topologyLabels keeps the labels localityOf reads.
func topologyLabels(l map[string]string) map[string]string {
	var out map[string]string
	for _, k := range []string{corev1.LabelTopologyRegion, corev1.LabelTopologyZone} {
		if v, ok := l[k]; ok {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}

// setLocality gives each workload its node's locality (none when the
// node is unknown or unlabelled, as istiod's getPodLocality).
func setLocality(workloads []discovery.Workload, nodes []*corev1.Node) {
	byName := make(map[string]locality, len(nodes))
	for _, n := range nodes {
		byName[n.Name] = localityOf(n)
	}
	for i := range workloads {
		l := byName[workloads[i].Node]
		workloads[i].Region, workloads[i].Zone = l.region, l.zone
	}
}
