package kubediscovery

import (
	"fmt"
	"log/slog"
	"slices"
	"strconv"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/discovery"
)

// peerAuthSpec is a PeerAuthentication spec: Istio's three fields, read
// strictly (a field the proxy does not know could change what the object
// means, so it makes the object malformed).
type peerAuthSpec struct {
	Selector      map[string]any          `json:"selector,omitempty"`
	MTLS          *peerAuthMTLS           `json:"mtls,omitempty"`
	PortLevelMTLS map[string]peerAuthMTLS `json:"portLevelMtls,omitempty"`
}

type peerAuthMTLS struct {
	Mode string `json:"mode,omitempty"`
}

// convertedPrefix names the DENY policies that enforce STRICT where a
// namespace mode cannot: "_" is not allowed in Kubernetes object names,
// so they never collide with an AuthorizationPolicy (istiod names its
// conversions for ztunnel alike).
const convertedPrefix = "converted_peer_authentication_"

// buildMTLS derives the mTLS modes from PeerAuthentications as istiod
// does for ztunnel (pilot/pkg/serviceregistry/ambient/authorization.go,
// convertedSelectorPeerAuthentications and convertPeerAuthentication):
//
//   - the oldest namespace-wide object (no selector, or an empty one) of
//     the root namespace sets the mesh mode, the oldest of another
//     namespace that namespace's; UNSET inherits, and DISABLE means "not
//     STRICT" (plaintext accepted, as ztunnel has no way to refuse mTLS);
//   - the oldest workload-level object (spec.selector.matchLabels, outside
//     the root namespace, where istiod ignores selectors) that selects a
//     workload sets its mode: STRICT, or PERMISSIVE for PERMISSIVE and
//     DISABLE, UNSET inheriting; its portLevelMtls then sets ports: STRICT
//     and PERMISSIVE as written, DISABLE as PERMISSIVE except where the
//     workload mode is UNSET under an inherited STRICT (istiod keeps its
//     static STRICT policy there), UNSET inheriting.
//
// The result is the mesh and namespace modes, and per workload (by
// namespace/name) the workload-level mode and ports. What it cannot
// apply fails closed: a malformed spec, an unsupported selector form, an
// unknown mode (mesh, or a port's) or a portLevelMtls key that is not a
// port becomes a DENY of plaintext for what the object selects (its
// whole namespace when the selector cannot be read); a port-level STRICT
// on a namespace-wide object (which istiod ignores) is kept, as such a
// DENY on those ports.
func buildMTLS(objs []*unstructured.Unstructured, root string, workloads []discovery.Workload, n *notes) (discovery.MTLSConfig, []authz.Policy, map[string]*discovery.WorkloadMTLS) {
	var cfg discovery.MTLSConfig
	var strict []authz.Policy
	// Oldest first: the first object of a namespace (or for a workload)
	// wins.
	objs = sortObjects(objs)
	slices.SortStableFunc(objs, func(a, b *unstructured.Unstructured) int {
		return a.GetCreationTimestamp().Compare(b.GetCreationTimestamp().Time)
	})
	type workloadPA struct {
		ns    string
		sel   *authz.Selector
		mode  string
		ports map[uint16]string
	}
	var selected []workloadPA
	decided := map[string]bool{}
	for _, u := range objs {
		ns := u.GetNamespace()
		key := "PeerAuthentication " + ns + "/" + u.GetName()
		var spec peerAuthSpec
		if err := decodeJSON(u.Object["spec"], &spec, true); err != nil {
			sel, _ := peerAuthSelector(u.Object["spec"]) // nil if unreadable: the namespace
			n.add(slog.LevelError, key, "malformed peer authentication: plaintext refused for the workloads it selects (fail closed)", "error", err)
			strict = append(strict, strictPolicy(u, sel, nil))
			continue
		}
		sel, err := peerAuthSelector(u.Object["spec"])
		if err != nil {
			n.add(slog.LevelError, key, "peer authentication with an unsupported selector: plaintext refused in its whole namespace (fail closed)", "error", err)
			strict = append(strict, strictPolicy(u, nil, nil))
			continue
		}
		mode := ""
		if spec.MTLS != nil {
			mode = spec.MTLS.Mode
		}
		if !knownMode(mode) {
			n.add(slog.LevelError, key, "peer authentication with an unknown mTLS mode: plaintext refused for the workloads it selects (fail closed)", "mode", mode)
			strict = append(strict, strictPolicy(u, sel, nil))
			continue
		}
		ports, err := portModes(spec.PortLevelMTLS)
		if err != nil {
			n.add(slog.LevelError, key, "malformed portLevelMtls: plaintext refused for the workloads it selects (fail closed)", "error", err)
			strict = append(strict, strictPolicy(u, sel, nil))
			continue
		}
		if sel != nil {
			if ns == root {
				n.add(slog.LevelWarn, key, "workload selector in the root namespace: ignored, as istiod ignores it")
				continue
			}
			selected = append(selected, workloadPA{ns: ns, sel: sel, mode: mode, ports: ports})
			continue
		}
		if len(ports) > 0 {
			var sp []string
			for p, m := range ports {
				if m == string(discovery.MTLSStrict) && mode != string(discovery.MTLSStrict) {
					sp = append(sp, strconv.Itoa(int(p)))
				}
			}
			slices.Sort(sp)
			if len(sp) > 0 {
				strict = append(strict, strictPolicy(u, nil, sp))
			}
			n.add(slog.LevelWarn, key+" portLevelMtls", "portLevelMtls needs a workload selector (istiod ignores it here); only its STRICT ports are kept, as a DENY of plaintext")
		}
		if decided[ns] {
			n.add(slog.LevelWarn, key, "namespace has an older namespace-wide peer authentication; ignored")
			continue
		}
		decided[ns] = true
		var m discovery.MTLSMode
		switch mode {
		case "", "UNSET":
			continue
		case "DISABLE":
			n.add(slog.LevelInfo, key, "mTLS mode DISABLE: plaintext accepted as under PERMISSIVE (HBONE is always mTLS)")
			m = discovery.MTLSPermissive
		default:
			m = discovery.MTLSMode(mode)
		}
		if ns == root {
			cfg.Mode = m
			continue
		}
		if cfg.Namespaces == nil {
			cfg.Namespaces = map[string]discovery.MTLSMode{}
		}
		cfg.Namespaces[ns] = m
	}
	inherited := func(ns string) bool {
		if m, ok := cfg.Namespaces[ns]; ok {
			return m == discovery.MTLSStrict
		}
		return cfg.Mode == discovery.MTLSStrict
	}
	perWorkload := map[string]*discovery.WorkloadMTLS{}
	for i := range workloads {
		w := &workloads[i]
		for _, pa := range selected {
			if pa.ns != w.Namespace || !selects(pa.sel, w.Labels) {
				continue
			}
			perWorkload[w.Key()] = workloadMTLS(pa.mode, pa.ports, inherited(w.Namespace))
			break // the oldest wins
		}
	}
	return cfg, strict, perWorkload
}

// workloadMTLS is the effective workload-level mode and port modes of a
// workload-level PeerAuthentication (rules in buildMTLS), given whether
// the workload inherits STRICT from its namespace or the mesh.
func workloadMTLS(mode string, ports map[uint16]string, inheritedStrict bool) *discovery.WorkloadMTLS {
	out := &discovery.WorkloadMTLS{}
	switch mode {
	case string(discovery.MTLSStrict):
		out.Mode = discovery.MTLSStrict
	case string(discovery.MTLSPermissive), "DISABLE":
		out.Mode = discovery.MTLSPermissive
	}
	for p, m := range ports {
		var pm discovery.MTLSMode
		switch m {
		case string(discovery.MTLSStrict):
			pm = discovery.MTLSStrict
		case string(discovery.MTLSPermissive):
			pm = discovery.MTLSPermissive
		case "DISABLE":
			if out.Mode == "" && inheritedStrict {
				continue // istiod keeps the static STRICT policy here
			}
			pm = discovery.MTLSPermissive
		default:
			continue // UNSET inherits
		}
		if out.Ports == nil {
			out.Ports = map[uint16]discovery.MTLSMode{}
		}
		out.Ports[p] = pm
	}
	return out
}

// selects reports whether every label of sel is in labels.
func selects(sel *authz.Selector, labels map[string]string) bool {
	for k, v := range sel.MatchLabels {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// knownMode reports Istio's mTLS modes (and no mode, which is UNSET).
func knownMode(m string) bool {
	switch m {
	case "", "UNSET", "DISABLE", string(discovery.MTLSPermissive), string(discovery.MTLSStrict):
		return true
	}
	return false
}

// peerAuthSelector reads spec.selector: nil for none (or an empty one,
// which selects the whole namespace, as in Istio), the labels for
// matchLabels, an error for any other form (matchExpressions, a wrong
// type), which this proxy cannot apply.
func peerAuthSelector(spec any) (*authz.Selector, error) {
	m, _ := spec.(map[string]any)
	raw, ok := m["selector"]
	if !ok || raw == nil {
		return nil, nil
	}
	var sel authz.Selector
	if err := decodeJSON(raw, &sel, true); err != nil {
		return nil, fmt.Errorf("spec.selector: only matchLabels is supported: %w", err)
	}
	if len(sel.MatchLabels) == 0 {
		return nil, nil
	}
	return &sel, nil
}

// portModes reads portLevelMtls: the mode of each port, a port with an
// unknown mode being STRICT (fail closed), or an error for a key that is
// not a port.
func portModes(levels map[string]peerAuthMTLS) (map[uint16]string, error) {
	out := map[uint16]string{}
	for p, m := range levels {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("port %q is not a port number", p)
		}
		mode := m.Mode
		if !knownMode(mode) {
			mode = string(discovery.MTLSStrict)
		}
		out[uint16(n)] = mode
	}
	return out, nil
}

// strictPolicy is a DENY of every connection without a peer identity
// (plaintext) for the workloads sel selects in u's namespace (all of them
// for nil; mesh-wide in the root namespace), on ports when given.
func strictPolicy(u *unstructured.Unstructured, sel *authz.Selector, ports []string) authz.Policy {
	rule := authz.Rule{From: []authz.From{{Source: authz.Source{NotPrincipals: []string{"*"}}}}}
	if len(ports) > 0 {
		rule.To = []authz.To{{Operation: authz.Operation{Ports: ports}}}
	}
	return authz.Policy{
		Metadata: authz.ObjectMeta{Name: convertedPrefix + u.GetName(), Namespace: u.GetNamespace()},
		Spec:     authz.Spec{Action: authz.ActionDeny, Selector: sel, Rules: []authz.Rule{rule}},
	}
}
