// Package authz evaluates the L4 subset of Istio's AuthorizationPolicy
// (security.istio.io/v1) the way Istio's ztunnel does for a connection that
// arrives at a mesh workload.
//
// # What applies to a workload
//
// A policy in the root namespace (RootNamespace, default istio-system)
// applies mesh-wide; a policy in the workload's own namespace applies to
// that workload; spec.selector.matchLabels narrows either to the workloads
// whose labels contain every listed pair. A policy with spec.targetRef or
// spec.targetRefs is bound to a waypoint or gateway, which enforces it, so
// it never applies here (as in ztunnel).
//
// # Order
//
// DENY policies first: if any applicable DENY policy matches, the
// connection is denied. Then ALLOW: when no ALLOW policy applies, the
// connection is allowed; when some apply, at least one must match. AUDIT
// and CUSTOM policies are not enforced by ztunnel and are ignored.
//
// # Rules
//
// A policy matches when one of its rules matches; a policy with no rules
// matches nothing (so an ALLOW policy with `spec: {}` allows nothing) and a
// rule with no fields (`rules: [{}]`) matches everything. A rule matches
// when one of its from entries matches (or it has none), one of its to
// entries matches (or it has none) and every when condition holds. Inside
// a source or operation every field that is set must match; a list matches
// when one of its values matches, a not-list when none does.
//
// Principals are compared in Istio's form `<trust-domain>/ns/<ns>/sa/<sa>`
// (the SPIFFE ID without spiffe://). A value may start or end with `*`
// (suffix or prefix match), and `*` alone matches any authenticated peer.
// Namespaces use the same wildcards and are taken from the peer's SPIFFE
// ID, so they too require mTLS. serviceAccounts and notServiceAccounts
// hold `<ns>/<sa>` or `<sa>` (the policy's namespace), matched exactly
// against the peer's SPIFFE ID whatever its trust domain, as ztunnel does;
// Istio does not allow them next to principals or namespaces. ipBlocks
// hold IPs or CIDRs (v4 or v6) matched against the connection's source
// IP. Ports are decimal strings.
//
// # What L4 cannot see
//
// Istio marks these as HTTP attributes: methods, paths, hosts (and their
// not-forms), requestPrincipals, remoteIpBlocks and notRemoteIpBlocks
// (the client address a proxy in front reports, which needs HTTP
// headers), and every when key other than source.ip, source.namespace,
// source.principal, destination.ip and destination.port (so remote.ip and
// request.* are HTTP). istiod converts a policy for ztunnel by dropping
// them (pilot/pkg/serviceregistry/ambient/authorization.go), and this
// package evaluates the same result:
//
//   - in an ALLOW policy a rule that uses any HTTP attribute matches
//     nothing, so the workload gets no traffic through that rule;
//   - in a DENY policy the HTTP attributes are ignored and the L4 fields
//     of the same entry decide; an entry (a from source, a to operation
//     or a when condition) left with no L4 field matches nothing, as
//     ztunnel skips an empty match. "DENY from namespace X, methods
//     [DELETE]" therefore denies nothing at L4: its to entry is empty.
//
// The same holds for any entry with no field set at all (Istio's
// validation refuses those). A value that cannot be parsed (a bad CIDR, a
// non-numeric port) counts as not matching in ALLOW and as matching in
// DENY (fail safe). Validate reports bad values and L7Fields lists HTTP
// attributes, so a configuration loader can reject or warn before a
// policy is served.
//
// # Dry run
//
// A policy annotated istio.io/dry-run with a true value (strconv.ParseBool,
// as istiod reads it) is evaluated but never enforced: Decision.DryRun
// says what it would have done, and the Evaluator logs it, as ztunnel does
// with the dry-run policies istiod sends when
// AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY is on.
package authz

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// DefaultRootNamespace is Istio's default root namespace: policies there
// apply to every workload in the mesh.
const DefaultRootNamespace = "istio-system"

// Action is spec.action.
type Action string

// The actions of an AuthorizationPolicy. An empty action means ALLOW.
const (
	ActionAllow  Action = "ALLOW"
	ActionDeny   Action = "DENY"
	ActionAudit  Action = "AUDIT"
	ActionCustom Action = "CUSTOM"
)

// Policy is one AuthorizationPolicy object with Istio's field names, so
// Istio YAML/JSON unmarshals into it directly.
type Policy struct {
	APIVersion string     `json:"apiVersion,omitempty"`
	Kind       string     `json:"kind,omitempty"`
	Metadata   ObjectMeta `json:"metadata"`
	Spec       Spec       `json:"spec"`
}

// ObjectMeta is the part of Kubernetes metadata a policy needs.
type ObjectMeta struct {
	Name        string            `json:"name"`
	Namespace   string            `json:"namespace,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// DryRunAnnotation marks a policy to be logged, not enforced.
const DryRunAnnotation = "istio.io/dry-run"

// Spec is spec of an AuthorizationPolicy.
type Spec struct {
	Selector   *Selector   `json:"selector,omitempty"`
	TargetRef  *TargetRef  `json:"targetRef,omitempty"`
	TargetRefs []TargetRef `json:"targetRefs,omitempty"`
	Action     Action      `json:"action,omitempty"`
	Rules      []Rule      `json:"rules,omitempty"`
	// Provider is only meaningful for CUSTOM, which is not enforced here.
	Provider map[string]any `json:"provider,omitempty"`
}

// Selector is spec.selector.
type Selector struct {
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
}

// TargetRef names a waypoint, gateway or service a policy is bound to.
type TargetRef struct {
	Group     string `json:"group,omitempty"`
	Kind      string `json:"kind,omitempty"`
	Name      string `json:"name,omitempty"`
	Namespace string `json:"namespace,omitempty"`
}

// Rule is one entry of spec.rules.
type Rule struct {
	From []From      `json:"from,omitempty"`
	To   []To        `json:"to,omitempty"`
	When []Condition `json:"when,omitempty"`
}

// From is one entry of rules[].from.
type From struct {
	Source Source `json:"source"`
}

// Source is rules[].from[].source. The request principal and remote IP
// fields are HTTP attributes.
type Source struct {
	Principals           []string `json:"principals,omitempty"`
	NotPrincipals        []string `json:"notPrincipals,omitempty"`
	ServiceAccounts      []string `json:"serviceAccounts,omitempty"`
	NotServiceAccounts   []string `json:"notServiceAccounts,omitempty"`
	RequestPrincipals    []string `json:"requestPrincipals,omitempty"`
	NotRequestPrincipals []string `json:"notRequestPrincipals,omitempty"`
	Namespaces           []string `json:"namespaces,omitempty"`
	NotNamespaces        []string `json:"notNamespaces,omitempty"`
	IPBlocks             []string `json:"ipBlocks,omitempty"`
	NotIPBlocks          []string `json:"notIpBlocks,omitempty"`
	RemoteIPBlocks       []string `json:"remoteIpBlocks,omitempty"`
	NotRemoteIPBlocks    []string `json:"notRemoteIpBlocks,omitempty"`
}

// To is one entry of rules[].to.
type To struct {
	Operation Operation `json:"operation"`
}

// Operation is rules[].to[].operation. Only the port fields are L4.
type Operation struct {
	Hosts      []string `json:"hosts,omitempty"`
	NotHosts   []string `json:"notHosts,omitempty"`
	Ports      []string `json:"ports,omitempty"`
	NotPorts   []string `json:"notPorts,omitempty"`
	Methods    []string `json:"methods,omitempty"`
	NotMethods []string `json:"notMethods,omitempty"`
	Paths      []string `json:"paths,omitempty"`
	NotPaths   []string `json:"notPaths,omitempty"`
}

// Condition is one entry of rules[].when.
type Condition struct {
	Key       string   `json:"key"`
	Values    []string `json:"values,omitempty"`
	NotValues []string `json:"notValues,omitempty"`
}

// The when keys an L4 proxy can evaluate (istiod's l4WhenAttributes);
// every other key, remote.ip included, is an HTTP attribute.
const (
	keySourceIP        = "source.ip"
	keySourceNamespace = "source.namespace"
	keySourcePrincipal = "source.principal"
	keyDestinationIP   = "destination.ip"
	keyDestinationPort = "destination.port"
)

// ID is "namespace/name", the form used in decisions and log lines.
func (p *Policy) ID() string {
	return p.Metadata.Namespace + "/" + p.Metadata.Name
}

// action returns spec.action with the ALLOW default applied.
func (p *Policy) action() Action {
	if p.Spec.Action == "" {
		return ActionAllow
	}
	return p.Spec.Action
}

// DryRun reports whether p carries istio.io/dry-run with a true value.
// A value ParseBool refuses means enforced, as istiod logs and ignores it.
func (p *Policy) DryRun() bool {
	v, err := strconv.ParseBool(p.Metadata.Annotations[DryRunAnnotation])
	return err == nil && v
}

// AppliesTo reports whether p governs a workload in namespace with labels,
// given the mesh root namespace ("" means DefaultRootNamespace). It does
// not look at the action: AUDIT and CUSTOM policies "apply" but Evaluate
// ignores them.
func (p *Policy) AppliesTo(rootNamespace, namespace string, labels map[string]string) bool {
	if rootNamespace == "" {
		rootNamespace = DefaultRootNamespace
	}
	if p.Spec.TargetRef != nil || len(p.Spec.TargetRefs) > 0 {
		return false
	}
	if p.Metadata.Namespace != rootNamespace && p.Metadata.Namespace != namespace {
		return false
	}
	if p.Spec.Selector == nil {
		return true
	}
	for k, v := range p.Spec.Selector.MatchLabels {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// Validate reports what in p is malformed: an empty name, an unknown
// action, unparsable IPs, CIDRs or ports, wildcards Istio does not
// support. All problems are joined into one error. Fields that need L7
// are legal and not reported here; see L7Fields.
func (p *Policy) Validate() error {
	var errs []error
	add := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf(format, args...))
	}
	if p.Metadata.Name == "" {
		add("metadata.name is empty")
	}
	switch p.action() {
	case ActionAllow, ActionDeny, ActionAudit, ActionCustom:
	default:
		add("spec.action %q is not ALLOW, DENY, AUDIT or CUSTOM", p.Spec.Action)
	}
	for i, r := range p.Spec.Rules {
		at := fmt.Sprintf("spec.rules[%d]", i)
		for j, f := range r.From {
			s := f.Source
			fat := fmt.Sprintf("%s.from[%d].source", at, j)
			for _, l := range []struct {
				name string
				vals []string
				ok   func(string) bool
			}{
				{"principals", s.Principals, validWildcard},
				{"notPrincipals", s.NotPrincipals, validWildcard},
				{"serviceAccounts", s.ServiceAccounts, validServiceAccount},
				{"notServiceAccounts", s.NotServiceAccounts, validServiceAccount},
				{"namespaces", s.Namespaces, validWildcard},
				{"notNamespaces", s.NotNamespaces, validWildcard},
				{"ipBlocks", s.IPBlocks, validIPBlock},
				{"notIpBlocks", s.NotIPBlocks, validIPBlock},
				{"remoteIpBlocks", s.RemoteIPBlocks, validIPBlock},
				{"notRemoteIpBlocks", s.NotRemoteIPBlocks, validIPBlock},
			} {
				for _, v := range l.vals {
					if !l.ok(v) {
						add("%s.%s: invalid value %q", fat, l.name, v)
					}
				}
			}
			if len(s.ServiceAccounts)+len(s.NotServiceAccounts) > 0 && len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces) > 0 {
				add("%s: serviceAccounts cannot be set with namespaces or principals", fat)
			}
		}
		for j, t := range r.To {
			o := t.Operation
			oat := fmt.Sprintf("%s.to[%d].operation", at, j)
			for _, v := range append(append([]string(nil), o.Ports...), o.NotPorts...) {
				if !validPort(v) {
					add("%s: invalid port %q", oat, v)
				}
			}
		}
		for j, c := range r.When {
			wat := fmt.Sprintf("%s.when[%d]", at, j)
			valid, l4 := conditionValidator(c.Key)
			if !l4 {
				continue
			}
			for _, v := range append(append([]string(nil), c.Values...), c.NotValues...) {
				if !valid(v) {
					add("%s: key %q: invalid value %q", wat, c.Key, v)
				}
			}
		}
	}
	return errors.Join(errs...)
}

// L7Fields lists the HTTP attributes in p
// ("spec.rules[0].to[1].operation.methods"), which the evaluator drops as
// istiod does (see the package doc). Loaders log them as warnings: an
// ALLOW rule listed here never matches, a DENY entry only by its L4 part.
func (p *Policy) L7Fields() []string {
	var out []string
	for i, r := range p.Spec.Rules {
		at := fmt.Sprintf("spec.rules[%d]", i)
		for j, f := range r.From {
			s := f.Source
			if len(s.RequestPrincipals) > 0 {
				out = append(out, fmt.Sprintf("%s.from[%d].source.requestPrincipals", at, j))
			}
			if len(s.NotRequestPrincipals) > 0 {
				out = append(out, fmt.Sprintf("%s.from[%d].source.notRequestPrincipals", at, j))
			}
			if len(s.RemoteIPBlocks) > 0 {
				out = append(out, fmt.Sprintf("%s.from[%d].source.remoteIpBlocks", at, j))
			}
			if len(s.NotRemoteIPBlocks) > 0 {
				out = append(out, fmt.Sprintf("%s.from[%d].source.notRemoteIpBlocks", at, j))
			}
		}
		for j, t := range r.To {
			o := t.Operation
			for _, l := range []struct {
				name string
				vals []string
			}{
				{"hosts", o.Hosts}, {"notHosts", o.NotHosts},
				{"methods", o.Methods}, {"notMethods", o.NotMethods},
				{"paths", o.Paths}, {"notPaths", o.NotPaths},
			} {
				if len(l.vals) > 0 {
					out = append(out, fmt.Sprintf("%s.to[%d].operation.%s", at, j, l.name))
				}
			}
		}
		for j, c := range r.When {
			if _, l4 := conditionValidator(c.Key); !l4 {
				out = append(out, fmt.Sprintf("%s.when[%d].key=%s", at, j, c.Key))
			}
		}
	}
	return out
}

// HTTPAttributesWarning is the log message for a policy L7Fields flags,
// shared by the configuration loaders.
const HTTPAttributesWarning = "authorization policy uses HTTP attributes, which ztunnel cannot enforce: " +
	"dropped as istiod does (an ALLOW rule using one matches nothing; a DENY entry keeps only its L4 fields)"

// conditionValidator returns the value check for an L4 when key, and
// false when the key is not one an L4 proxy understands.
func conditionValidator(key string) (func(string) bool, bool) {
	switch key {
	case keySourceIP, keyDestinationIP:
		return validIPBlock, true
	case keySourceNamespace, keySourcePrincipal:
		return validWildcard, true
	case keyDestinationPort:
		return validPort, true
	}
	return nil, false
}

// validWildcard accepts Istio's string match forms: exact, "*", "*suffix"
// and "prefix*"; a "*" anywhere else is not supported by Istio.
func validWildcard(v string) bool {
	if v == "" {
		return false
	}
	inner := strings.TrimSuffix(strings.TrimPrefix(v, "*"), "*")
	return !strings.Contains(inner, "*") && !(strings.HasPrefix(v, "*") && strings.HasSuffix(v, "*") && len(v) > 1)
}

// validServiceAccount accepts Istio's forms `sa` and `ns/sa`, no
// wildcards (pkg/config/security CheckServiceAccount).
func validServiceAccount(v string) bool {
	ns, sa, found := strings.Cut(v, "/")
	if !found {
		sa = ns
	}
	return sa != "" && (!found || ns != "") && !strings.ContainsAny(v, "*") && !strings.Contains(sa, "/") && len(v) <= 320
}

func validIPBlock(v string) bool {
	_, ok := parseIPBlock(v)
	return ok
}

func validPort(v string) bool {
	_, ok := parsePort(v)
	return ok
}

// parseIPBlock parses an IP (a host prefix) or a CIDR, masked.
func parseIPBlock(v string) (netip.Prefix, bool) {
	if strings.Contains(v, "/") {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return netip.Prefix{}, false
		}
		return p.Masked(), true
	}
	a, err := netip.ParseAddr(v)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, a.BitLen()), true
}

func parsePort(v string) (uint16, bool) {
	n, err := strconv.ParseUint(v, 10, 16)
	if err != nil || n == 0 {
		return 0, false
	}
	return uint16(n), true
}
