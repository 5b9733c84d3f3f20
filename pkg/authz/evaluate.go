package authz

import (
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
)

// Conn is what an L4 proxy knows about one inbound connection.
type Conn struct {
	// SrcIdentity is the peer's SPIFFE ID from its mTLS certificate
	// ("spiffe://cluster.local/ns/foo/sa/bar"); empty for plaintext.
	SrcIdentity string
	// SrcIP is the client's address (the original source for HBONE).
	SrcIP netip.Addr
	// DstIP and DstPort are the destination the client asked for.
	DstIP   netip.Addr
	DstPort uint16
	// DstNamespace and DstLabels describe the destination workload; they
	// pick which policies apply.
	DstNamespace string
	DstLabels    map[string]string
}

// Decision is the outcome of Evaluate and the reason for it, for logs.
type Decision struct {
	Allowed bool
	// Policy is "namespace/name" of the policy that decided, or "" when
	// the default decided (no policy applies, or no ALLOW policy matched).
	Policy string
	// Rule is the index of the matching rule in Policy, or -1.
	Rule int
	// Reason is a human sentence: "denied by DENY policy ns/name rule 0".
	Reason string
	// DryRun says what each applicable dry-run policy would have done
	// ("dry-run: DENY policy ns/name rule 0 matches"); it never changes
	// Allowed.
	DryRun []string
}

func (d Decision) String() string { return d.Reason }

// Evaluator evaluates policies with a given root namespace.
type Evaluator struct {
	// RootNamespace holds mesh-wide policies; "" means DefaultRootNamespace.
	RootNamespace string
	// Log receives one line per dry-run outcome; nil means slog.Default().
	Log *slog.Logger
}

// Evaluate applies policies to c with the default root namespace; see
// Evaluator.Evaluate.
func Evaluate(policies []Policy, c Conn) Decision {
	return Evaluator{}.Evaluate(policies, c)
}

// Evaluate decides whether c is allowed by policies, following Istio's
// order (see the package doc). policies may contain policies that do not
// apply to c's destination; they are skipped. Evaluate does not modify
// policies and is safe for concurrent use.
func (e Evaluator) Evaluate(policies []Policy, c Conn) Decision {
	d := e.evaluate(policies, c)
	if len(d.DryRun) > 0 {
		log := e.Log
		if log == nil {
			log = slog.Default()
		}
		for _, line := range d.DryRun {
			log.Info(line, "src", c.SrcIP, "src_identity", c.SrcIdentity, "dst", netip.AddrPortFrom(c.DstIP, c.DstPort), "decision", d.Reason)
		}
	}
	return d
}

func (e Evaluator) evaluate(policies []Policy, c Conn) Decision {
	peer := newPeer(c)
	var allowApplicable, dryRun []string
	dryAllow, dryAllowMatched := false, false
	var denied *Decision
	for i := range policies {
		p := &policies[i]
		if !p.AppliesTo(e.RootNamespace, c.DstNamespace, c.DstLabels) {
			continue
		}
		act := p.action()
		if act != ActionDeny && act != ActionAllow {
			continue
		}
		r := p.match(peer)
		switch {
		case p.DryRun():
			if act == ActionAllow {
				dryAllow = true
				dryAllowMatched = dryAllowMatched || r >= 0
			}
			if r >= 0 {
				dryRun = append(dryRun, fmt.Sprintf("dry-run: %s policy %s rule %d matches", act, p.ID(), r))
			}
		case act == ActionDeny:
			if r >= 0 && denied == nil {
				denied = &Decision{Policy: p.ID(), Rule: r,
					Reason: fmt.Sprintf("denied by DENY policy %s rule %d", p.ID(), r)}
			}
		default:
			allowApplicable = append(allowApplicable, p.ID())
		}
	}
	if dryAllow && !dryAllowMatched {
		dryRun = append(dryRun, "dry-run: no dry-run ALLOW policy matches")
	}
	if denied != nil {
		denied.DryRun = dryRun
		return *denied
	}
	if len(allowApplicable) == 0 {
		return Decision{Allowed: true, Rule: -1, Reason: "allowed: no ALLOW policy applies", DryRun: dryRun}
	}
	for i := range policies {
		p := &policies[i]
		if p.action() != ActionAllow || p.DryRun() || !p.AppliesTo(e.RootNamespace, c.DstNamespace, c.DstLabels) {
			continue
		}
		if r := p.match(peer); r >= 0 {
			return Decision{Allowed: true, Policy: p.ID(), Rule: r, DryRun: dryRun,
				Reason: fmt.Sprintf("allowed by ALLOW policy %s rule %d", p.ID(), r)}
		}
	}
	return Decision{Rule: -1, DryRun: dryRun, Reason: "denied: no rule matched in ALLOW policies " + strings.Join(allowApplicable, ", ")}
}

// peer is Conn with the identity pre-split once per evaluation.
type peer struct {
	Conn
	principal string // trust-domain/ns/x/sa/y, "" when unauthenticated
	namespace string // from the principal, "" when unknown
	sa        string // from the principal, "" when unknown
	srcIP     netip.Addr
}

func newPeer(c Conn) peer {
	p := peer{Conn: c, srcIP: c.SrcIP.Unmap()}
	p.principal = strings.TrimPrefix(c.SrcIdentity, "spiffe://")
	if parts := strings.Split(p.principal, "/"); len(parts) == 5 && parts[1] == "ns" && parts[3] == "sa" {
		p.namespace, p.sa = parts[2], parts[4]
	}
	return p
}

// tri is the result of one check: L7 fields and bad values are unknown
// and resolved by the policy's action (fail safe).
type tri int8

const (
	no tri = iota
	yes
	unknown
)

func (t tri) not() tri {
	switch t {
	case yes:
		return no
	case no:
		return yes
	}
	return unknown
}

// match returns the index of the first matching rule, or -1. An ALLOW
// rule with an HTTP attribute is dropped, as istiod drops it for ztunnel.
func (p *Policy) match(c peer) int {
	// failSafe is what a value that cannot be parsed counts as.
	failSafe := p.action() == ActionDeny
	for i := range p.Spec.Rules {
		r := &p.Spec.Rules[i]
		if !failSafe && r.hasHTTP() {
			continue
		}
		if r.matches(c, failSafe, p.Metadata.Namespace) {
			return i
		}
	}
	return -1
}

// hasHTTP reports whether r uses an HTTP attribute anywhere.
func (r *Rule) hasHTTP() bool {
	for i := range r.From {
		s := &r.From[i].Source
		if len(s.RequestPrincipals)+len(s.NotRequestPrincipals)+len(s.RemoteIPBlocks)+len(s.NotRemoteIPBlocks) > 0 {
			return true
		}
	}
	for i := range r.To {
		o := &r.To[i].Operation
		if len(o.Hosts)+len(o.NotHosts)+len(o.Methods)+len(o.NotMethods)+len(o.Paths)+len(o.NotPaths) > 0 {
			return true
		}
	}
	for i := range r.When {
		if _, l4 := conditionValidator(r.When[i].Key); !l4 {
			return true
		}
	}
	return false
}

// matches: every clause (the from list, the to list, each when) holds.
// HTTP attributes are not consulted: in a DENY they are dropped (see the
// package doc), and an ALLOW rule with any never gets here.
func (r *Rule) matches(c peer, failSafe bool, policyNS string) bool {
	if len(r.From) > 0 && !anyEntry(r.From, func(f *From) bool { return f.Source.matches(c, failSafe, policyNS) }) {
		return false
	}
	if len(r.To) > 0 && !anyEntry(r.To, func(t *To) bool { return t.Operation.matches(c, failSafe) }) {
		return false
	}
	for i := range r.When {
		if !r.When[i].matches(c, failSafe) {
			return false
		}
	}
	return true
}

func anyEntry[T any](entries []T, f func(*T) bool) bool {
	for i := range entries {
		if f(&entries[i]) {
			return true
		}
	}
	return false
}

// field is one list of an entry: the values and how one value compares.
// A field with no values holds trivially; negate turns it into a not-list.
type field struct {
	vals   []string
	match  func(string) tri
	negate bool
}

// allFields reports whether every set field holds, resolving unknown to
// failSafe per field. An entry with no field set matches nothing: that is
// an empty match, which ztunnel skips (rbac.rs), and what remains of an
// entry whose only fields were HTTP attributes.
func allFields(failSafe bool, fields ...field) bool {
	set := false
	for _, f := range fields {
		if len(f.vals) == 0 {
			continue
		}
		set = true
		res := no
		for _, v := range f.vals {
			t := f.match(v)
			if t == yes {
				res = yes
				break
			}
			if t == unknown {
				res = unknown
			}
		}
		if f.negate {
			res = res.not()
		}
		if res == no || (res == unknown && !failSafe) {
			return false
		}
	}
	return set
}

func (s *Source) matches(c peer, failSafe bool, policyNS string) bool {
	principal := func(v string) tri { return wildcard(v, c.principal) }
	namespace := func(v string) tri { return wildcard(v, c.namespace) }
	sa := func(v string) tri { return serviceAccountIs(v, policyNS, c) }
	srcIP := func(v string) tri { return inBlock(v, c.srcIP) }
	return allFields(failSafe,
		field{s.Principals, principal, false},
		field{s.NotPrincipals, principal, true},
		field{s.Namespaces, namespace, false},
		field{s.NotNamespaces, namespace, true},
		field{s.ServiceAccounts, sa, false},
		field{s.NotServiceAccounts, sa, true},
		field{s.IPBlocks, srcIP, false},
		field{s.NotIPBlocks, srcIP, true},
	)
}

func (o *Operation) matches(c peer, failSafe bool) bool {
	port := func(v string) tri { return portIs(v, c.DstPort) }
	return allFields(failSafe,
		field{o.Ports, port, false},
		field{o.NotPorts, port, true},
	)
}

func (w *Condition) matches(c peer, failSafe bool) bool {
	var m func(string) tri
	switch w.Key {
	case keySourceIP:
		m = func(v string) tri { return inBlock(v, c.srcIP) }
	case keyDestinationIP:
		m = func(v string) tri { return inBlock(v, c.DstIP.Unmap()) }
	case keySourceNamespace:
		m = func(v string) tri { return wildcard(v, c.namespace) }
	case keySourcePrincipal:
		m = func(v string) tri { return wildcard(v, c.principal) }
	case keyDestinationPort:
		m = func(v string) tri { return portIs(v, c.DstPort) }
	default:
		return false // an HTTP key: an empty match
	}
	return allFields(failSafe, field{w.Values, m, false}, field{w.NotValues, m, true})
}

// serviceAccountIs matches "ns/sa" or "sa" (in policyNS) exactly against
// the peer's identity, ignoring the trust domain as ztunnel does; no
// identity matches nothing.
func serviceAccountIs(v, policyNS string, c peer) tri {
	if !validServiceAccount(v) {
		return unknown
	}
	ns, sa, found := strings.Cut(v, "/")
	if !found {
		ns, sa = policyNS, v
	}
	return boolTri(c.sa != "" && c.namespace == ns && c.sa == sa)
}

// wildcard matches got against an Istio string pattern: "*" is any
// non-empty value, "*x" a suffix, "x*" a prefix, otherwise exact. An empty
// got (no identity) matches nothing.
func wildcard(pattern, got string) tri {
	if !validWildcard(pattern) {
		return unknown
	}
	if got == "" {
		return no
	}
	var ok bool
	switch {
	case pattern == "*":
		ok = true
	case strings.HasPrefix(pattern, "*"):
		ok = strings.HasSuffix(got, pattern[1:])
	case strings.HasSuffix(pattern, "*"):
		ok = strings.HasPrefix(got, pattern[:len(pattern)-1])
	default:
		ok = got == pattern
	}
	return boolTri(ok)
}

func inBlock(block string, ip netip.Addr) tri {
	p, ok := parseIPBlock(block)
	if !ok {
		return unknown
	}
	return boolTri(ip.IsValid() && p.Contains(ip))
}

func portIs(v string, port uint16) tri {
	n, ok := parsePort(v)
	if !ok {
		return unknown
	}
	return boolTri(n == port)
}

func boolTri(b bool) tri {
	if b {
		return yes
	}
	return no
}
