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

// buildMTLS derives the mesh-wide and per-namespace modes from the
// namespace-wide PeerAuthentications, and DENY-plaintext policies for
// every STRICT it cannot express as a namespace mode: workload-level
// (selector) and port-level STRICT, and — fail closed — every object it
// cannot apply (malformed spec, unsupported selector form, unknown mode),
// which refuses plaintext to what the object selects (its whole namespace
// when the selector cannot be read). Rules in the package doc.
func buildMTLS(objs []*unstructured.Unstructured, root string, n *notes) (discovery.MTLSConfig, []authz.Policy) {
	var cfg discovery.MTLSConfig
	var strict []authz.Policy
	// Oldest first: the first namespace-wide object of a namespace wins.
	objs = sortObjects(objs)
	slices.SortStableFunc(objs, func(a, b *unstructured.Unstructured) int {
		return a.GetCreationTimestamp().Compare(b.GetCreationTimestamp().Time)
	})
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
		ports, err := strictPorts(spec.PortLevelMTLS)
		if err != nil {
			n.add(slog.LevelError, key, "malformed portLevelMtls: plaintext refused for the workloads it selects (fail closed)", "error", err)
			strict = append(strict, strictPolicy(u, sel, nil))
			continue
		}
		switch {
		case mode == string(discovery.MTLSStrict) && sel != nil:
			// Workload-level STRICT covers every port.
			strict = append(strict, strictPolicy(u, sel, nil))
		case len(ports) > 0 && mode != string(discovery.MTLSStrict):
			// Port-level STRICT under a looser or inherited mode.
			strict = append(strict, strictPolicy(u, sel, ports))
		}
		if len(spec.PortLevelMTLS) > len(ports) {
			n.add(slog.LevelWarn, key+" portLevelMtls", "port-level PERMISSIVE, DISABLE or UNSET cannot loosen the mode in ambient mode; ignored for those ports")
		}
		if sel != nil {
			if mode != string(discovery.MTLSStrict) && mode != "" && mode != "UNSET" {
				n.add(slog.LevelWarn, key, "workload-level PERMISSIVE or DISABLE is not supported; the workloads keep their namespace's mode")
			}
			continue
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
			n.add(slog.LevelWarn, key, "mTLS mode DISABLE cannot be honoured in ambient mode; the namespace inherits")
			continue
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
	return cfg, strict
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

// strictPorts returns the ports portLevelMtls makes STRICT, sorted, or an
// error for a key that is not a port. A port with an unknown mode is
// STRICT too (fail closed).
func strictPorts(levels map[string]peerAuthMTLS) ([]string, error) {
	var out []string
	for p, m := range levels {
		if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 {
			return nil, fmt.Errorf("port %q is not a port number", p)
		}
		if m.Mode == string(discovery.MTLSStrict) || !knownMode(m.Mode) {
			out = append(out, p)
		}
	}
	slices.Sort(out)
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
