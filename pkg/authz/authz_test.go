package authz

import (
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

const (
	sleepID   = "spiffe://cluster.local/ns/demo/sa/sleep"
	curlID    = "spiffe://cluster.local/ns/other/sa/curl"
	foreignID = "spiffe://example.org/ns/demo/sa/sleep"
)

// conn is the default connection the table cases modify: an mTLS peer
// "sleep" in namespace demo calling httpbin:8080 in namespace demo.
func conn(mod func(*Conn)) Conn {
	c := Conn{
		SrcIdentity:  sleepID,
		SrcIP:        netip.MustParseAddr("10.1.2.3"),
		DstIP:        netip.MustParseAddr("10.1.9.9"),
		DstPort:      8080,
		DstNamespace: "demo",
		DstLabels:    map[string]string{"app": "httpbin", "version": "v1"},
	}
	if mod != nil {
		mod(&c)
	}
	return c
}

// pol parses one policy from YAML, as a user would write it.
func pol(t *testing.T, doc string) Policy {
	t.Helper()
	var p Policy
	if err := yaml.UnmarshalStrict([]byte(doc), &p); err != nil {
		t.Fatalf("parse policy: %v\n%s", err, doc)
	}
	return p
}

// allowRule builds an ALLOW policy in demo with one rule given as YAML.
func allowRule(t *testing.T, rule string) Policy {
	return ruleIn(t, "ALLOW", rule)
}

func denyRule(t *testing.T, rule string) Policy {
	return ruleIn(t, "DENY", rule)
}

func ruleIn(t *testing.T, action, rule string) Policy {
	t.Helper()
	doc := "metadata: {name: p, namespace: demo}\nspec:\n  action: " + action + "\n  rules:\n  - " +
		strings.ReplaceAll(strings.TrimSpace(rule), "\n", "\n    ") + "\n"
	return pol(t, doc)
}

func TestEvaluateFields(t *testing.T) {
	v6 := func(c *Conn) { c.SrcIP = netip.MustParseAddr("fd00:10::5") }
	plain := func(c *Conn) { c.SrcIdentity = "" }
	tests := []struct {
		name  string
		rule  string
		mod   func(*Conn)
		allow bool // verdict for the ALLOW policy; a DENY policy must give the opposite
	}{
		{"principal exact", "from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]", nil, true},
		{"principal exact other", "from: [{source: {principals: [cluster.local/ns/demo/sa/other]}}]", nil, false},
		{"principal spiffe prefix is not part of the form", "from: [{source: {principals: [spiffe://cluster.local/ns/demo/sa/sleep]}}]", nil, false},
		{"principal suffix wildcard", "from: [{source: {principals: ['*/sa/sleep']}}]", nil, true},
		{"principal suffix wildcard miss", "from: [{source: {principals: ['*/sa/curl']}}]", nil, false},
		{"principal prefix wildcard", "from: [{source: {principals: [cluster.local/ns/demo/*]}}]", nil, true},
		{"principal prefix wildcard other td", "from: [{source: {principals: [cluster.local/*]}}]", func(c *Conn) { c.SrcIdentity = foreignID }, false},
		{"principal star any authenticated", "from: [{source: {principals: ['*']}}]", nil, true},
		{"principal star plaintext", "from: [{source: {principals: ['*']}}]", plain, false},
		{"principal one of list", "from: [{source: {principals: [a/ns/b/sa/c, cluster.local/ns/demo/sa/sleep]}}]", nil, true},
		{"notPrincipals excludes", "from: [{source: {notPrincipals: [cluster.local/ns/demo/sa/sleep]}}]", nil, false},
		{"notPrincipals other", "from: [{source: {notPrincipals: [cluster.local/ns/demo/sa/x]}}]", nil, true},
		{"notPrincipals star matches plaintext", "from: [{source: {notPrincipals: ['*']}}]", plain, true},
		{"notPrincipals star authenticated", "from: [{source: {notPrincipals: ['*']}}]", nil, false},
		{"namespace exact", "from: [{source: {namespaces: [demo]}}]", nil, true},
		{"namespace other", "from: [{source: {namespaces: [prod]}}]", nil, false},
		{"namespace needs identity", "from: [{source: {namespaces: [demo]}}]", plain, false},
		{"namespace prefix wildcard", "from: [{source: {namespaces: ['de*']}}]", nil, true},
		{"namespace suffix wildcard", "from: [{source: {namespaces: ['*mo']}}]", nil, true},
		{"namespace from peer", "from: [{source: {namespaces: [other]}}]", func(c *Conn) { c.SrcIdentity = curlID }, true},
		{"notNamespaces", "from: [{source: {notNamespaces: [demo]}}]", nil, false},
		{"notNamespaces other", "from: [{source: {notNamespaces: [prod]}}]", nil, true},
		{"ipBlocks single IP", "from: [{source: {ipBlocks: [10.1.2.3]}}]", nil, true},
		{"ipBlocks CIDR", "from: [{source: {ipBlocks: [10.1.0.0/16]}}]", nil, true},
		{"ipBlocks unmasked CIDR", "from: [{source: {ipBlocks: [10.1.2.200/24]}}]", nil, true},
		{"ipBlocks miss", "from: [{source: {ipBlocks: [10.2.0.0/16, 192.168.0.1]}}]", nil, false},
		{"ipBlocks v4-mapped source", "from: [{source: {ipBlocks: [10.1.0.0/16]}}]", func(c *Conn) { c.SrcIP = netip.MustParseAddr("::ffff:10.1.2.3") }, true},
		{"ipBlocks IPv6 CIDR", "from: [{source: {ipBlocks: ['fd00:10::/64']}}]", v6, true},
		{"ipBlocks IPv6 CIDR miss", "from: [{source: {ipBlocks: ['fd00:11::/64']}}]", v6, false},
		{"ipBlocks IPv6 single", "from: [{source: {ipBlocks: ['fd00:10::5']}}]", v6, true},
		{"ipBlocks v4 block v6 source", "from: [{source: {ipBlocks: [0.0.0.0/0]}}]", v6, false},
		{"notIpBlocks", "from: [{source: {notIpBlocks: [10.1.2.0/24]}}]", nil, false},
		{"notIpBlocks other", "from: [{source: {notIpBlocks: ['fd00::/8']}}]", nil, true},
		{"serviceAccounts ns/sa", "from: [{source: {serviceAccounts: [demo/sleep]}}]", nil, true},
		{"serviceAccounts bare sa is the policy's namespace", "from: [{source: {serviceAccounts: [sleep]}}]", nil, true},
		{"serviceAccounts bare sa other namespace", "from: [{source: {serviceAccounts: [curl]}}]", func(c *Conn) { c.SrcIdentity = curlID }, false},
		{"serviceAccounts ignores the trust domain", "from: [{source: {serviceAccounts: [demo/sleep]}}]", func(c *Conn) { c.SrcIdentity = foreignID }, true},
		{"serviceAccounts needs identity", "from: [{source: {serviceAccounts: [demo/sleep]}}]", plain, false},
		{"notServiceAccounts", "from: [{source: {notServiceAccounts: [demo/sleep]}}]", nil, false},
		{"notServiceAccounts matches plaintext", "from: [{source: {notServiceAccounts: [demo/sleep]}}]", plain, true},
		{"source fields are ANDed", "from: [{source: {namespaces: [demo], ipBlocks: [192.168.0.0/16]}}]", nil, false},
		{"from entries are ORed", "from: [{source: {namespaces: [prod]}}, {source: {ipBlocks: [10.0.0.0/8]}}]", nil, true},
		{"ports", "to: [{operation: {ports: ['8080']}}]", nil, true},
		{"ports miss", "to: [{operation: {ports: ['80', '443']}}]", nil, false},
		{"notPorts", "to: [{operation: {notPorts: ['8080']}}]", nil, false},
		{"notPorts other", "to: [{operation: {notPorts: ['9090']}}]", nil, true},
		{"from and to ANDed", "from: [{source: {namespaces: [demo]}}]\nto: [{operation: {ports: ['9090']}}]", nil, false},
		{"when source.ip", "when: [{key: source.ip, values: [10.1.2.0/24]}]", nil, true},
		{"when source.ip notValues", "when: [{key: source.ip, notValues: [10.1.2.0/24]}]", nil, false},
		{"when source.namespace", "when: [{key: source.namespace, values: [demo]}]", nil, true},
		{"when source.principal wildcard", "when: [{key: source.principal, values: ['*/sa/sleep']}]", nil, true},
		{"when destination.port", "when: [{key: destination.port, values: ['8080']}]", nil, true},
		{"when destination.port miss", "when: [{key: destination.port, values: ['80']}]", nil, false},
		{"when destination.ip v6", "when: [{key: destination.ip, values: ['fd00::/8']}]", func(c *Conn) { c.DstIP = netip.MustParseAddr("fd00::9") }, true},
		{"when conditions ANDed", "when: [{key: source.namespace, values: [demo]}, {key: destination.port, values: ['1']}]", nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := conn(tc.mod)
			got := Evaluate([]Policy{allowRule(t, tc.rule)}, c)
			if got.Allowed != tc.allow {
				t.Errorf("ALLOW policy: Allowed=%v, want %v (%s)", got.Allowed, tc.allow, got.Reason)
			}
			// The same rule under DENY matches exactly when it matched
			// under ALLOW, since every field here is L4 and well-formed.
			got = Evaluate([]Policy{denyRule(t, tc.rule)}, c)
			if got.Allowed == tc.allow {
				t.Errorf("DENY policy: Allowed=%v, want %v (%s)", got.Allowed, !tc.allow, got.Reason)
			}
		})
	}
}

// TestHTTPAttributes: HTTP attributes are dropped as istiod drops them
// for ztunnel (pilot/pkg/serviceregistry/ambient/authorization.go): an
// ALLOW rule using one matches nothing; in a DENY the L4 fields of the
// entry decide and an entry left empty matches nothing. Bad values are
// fail safe: not matching in ALLOW, matching in DENY.
func TestHTTPAttributes(t *testing.T) {
	tests := []struct {
		name      string
		rule      string
		allowWant bool // verdict with only the ALLOW policy
		denyWant  bool // verdict with only the DENY policy
	}{
		// The example: DENY from ns X, methods [DELETE] must not
		// deny all traffic from X.
		{"DENY from namespace, methods only", "from: [{source: {namespaces: [demo]}}]\nto: [{operation: {methods: [DELETE]}}]", false, true},
		{"methods", "to: [{operation: {methods: [GET]}}]", false, true},
		{"notMethods", "to: [{operation: {notMethods: [GET]}}]", false, true},
		{"paths with L4 match", "from: [{source: {namespaces: [demo]}}]\nto: [{operation: {paths: [/x]}}]", false, true},
		// An operation with a port and a method: the port decides in DENY.
		{"port and method in one operation", "to: [{operation: {ports: ['8080'], methods: [GET]}}]", false, false},
		{"port miss and method in one operation", "to: [{operation: {ports: ['80'], methods: [GET]}}]", false, true},
		// One L7-only to entry next to an L4 one: the L4 one decides.
		{"L7 entry next to a matching L4 entry", "to: [{operation: {methods: [GET]}}, {operation: {ports: ['8080']}}]", false, false},
		{"hosts with L4 miss", "from: [{source: {namespaces: [prod]}}]\nto: [{operation: {hosts: [a.com]}}]", false, true},
		{"requestPrincipals", "from: [{source: {requestPrincipals: ['*']}}]", false, true},
		{"remoteIpBlocks", "from: [{source: {remoteIpBlocks: [10.1.2.3/32]}}]", false, true},
		{"notRemoteIpBlocks", "from: [{source: {notRemoteIpBlocks: [192.168.0.0/16]}}]", false, true},
		{"remoteIpBlocks next to a matching namespace", "from: [{source: {namespaces: [demo], remoteIpBlocks: [192.168.0.0/16]}}]", false, false},
		{"when remote.ip", "when: [{key: remote.ip, values: [10.1.2.0/24]}]", false, true},
		{"when request header", "when: [{key: 'request.headers[x-user]', values: [a]}]", false, true},
		{"when HTTP key next to a matching L4 from", "from: [{source: {namespaces: [demo]}}]\nwhen: [{key: 'request.auth.claims[iss]', values: [a]}]", false, true},
		{"bad CIDR", "from: [{source: {ipBlocks: [10.0.0.0/33]}}]", false, false},
		{"bad port", "to: [{operation: {ports: [http]}}]", false, false},
		// A valid value that matches wins over a bad one in the same list.
		{"bad CIDR next to a match", "from: [{source: {ipBlocks: [nope, 10.0.0.0/8]}}]", true, false},
		// An entry with no field: ztunnel skips an empty match.
		{"empty source", "from: [{source: {}}]", false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := conn(nil)
			allow := allowRule(t, tc.rule)
			if got := Evaluate([]Policy{allow}, c); got.Allowed != tc.allowWant {
				t.Errorf("ALLOW: Allowed=%v want %v (%s)", got.Allowed, tc.allowWant, got.Reason)
			}
			deny := denyRule(t, tc.rule)
			if got := Evaluate([]Policy{deny}, c); got.Allowed != tc.denyWant {
				t.Errorf("DENY: Allowed=%v want %v (%s)", got.Allowed, tc.denyWant, got.Reason)
			}
			if tc.name != "empty source" && allow.Validate() == nil && len(allow.L7Fields()) == 0 {
				t.Errorf("neither Validate nor L7Fields flagged a rule that is not pure L4: %s", tc.rule)
			}
		})
	}
	// An ALLOW rule with an HTTP attribute is dropped whole, even when
	// another from entry would match at L4.
	p := allowRule(t, "from: [{source: {requestPrincipals: ['*']}}, {source: {namespaces: [demo]}}]")
	if d := Evaluate([]Policy{p}, conn(nil)); d.Allowed {
		t.Errorf("ALLOW rule with an HTTP attribute matched: %s", d.Reason)
	}
}

// TestDryRun: istio.io/dry-run policies (ParseBool values) are evaluated
// and reported, never enforced, as ztunnel does (src/state.rs
// assert_rbac).
func TestDryRun(t *testing.T) {
	denyAll := pol(t, "metadata: {name: deny-all, namespace: demo, annotations: {istio.io/dry-run: 'True'}}\nspec: {action: DENY, rules: [{}]}")
	allowNone := pol(t, "metadata: {name: allow-none, namespace: demo, annotations: {istio.io/dry-run: '1'}}\nspec: {}")
	notDry := pol(t, "metadata: {name: deny-all2, namespace: demo, annotations: {istio.io/dry-run: 'yes'}}\nspec: {action: DENY, rules: [{}]}")
	var logged strings.Builder
	ev := Evaluator{Log: slog.New(slog.NewTextHandler(&logged, nil))}
	d := ev.Evaluate([]Policy{denyAll, allowNone}, conn(nil))
	if !d.Allowed {
		t.Fatalf("dry-run policies enforced: %s", d.Reason)
	}
	want := []string{"dry-run: DENY policy demo/deny-all rule 0 matches", "dry-run: no dry-run ALLOW policy matches"}
	if !slices.Equal(d.DryRun, want) {
		t.Errorf("DryRun = %q, want %q", d.DryRun, want)
	}
	for _, w := range want {
		if !strings.Contains(logged.String(), w) {
			t.Errorf("log lacks %q:\n%s", w, logged.String())
		}
	}
	// "yes" is not a ParseBool true: the policy is enforced.
	if d := ev.Evaluate([]Policy{notDry}, conn(nil)); d.Allowed || len(d.DryRun) != 0 {
		t.Errorf("istio.io/dry-run: yes: got %+v, want enforced deny", d)
	}
}

func TestEvaluatePolicies(t *testing.T) {
	allowNothing := pol(t, "metadata: {name: allow-nothing, namespace: demo}\nspec: {}")
	allowAll := pol(t, "metadata: {name: allow-all, namespace: demo}\nspec: {rules: [{}]}")
	denyNoRules := pol(t, "metadata: {name: deny-none, namespace: demo}\nspec: {action: DENY}")
	denyAll := pol(t, "metadata: {name: deny-all, namespace: demo}\nspec: {action: DENY, rules: [{}]}")
	rootDenyOther := pol(t, `
metadata: {name: root-deny, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [other]}}]}]`)
	customRootDeny := pol(t, `
metadata: {name: mesh-deny, namespace: mesh-root}
spec: {action: DENY, rules: [{}]}`)
	otherNSAllowNothing := pol(t, "metadata: {name: allow-nothing, namespace: prod}\nspec: {}")
	selectorMiss := pol(t, `
metadata: {name: only-web, namespace: demo}
spec: {selector: {matchLabels: {app: web}}}`)
	selectorHit := pol(t, `
metadata: {name: httpbin-v1, namespace: demo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  rules: [{to: [{operation: {ports: ['8080']}}]}]`)
	selectorPartial := pol(t, `
metadata: {name: httpbin-v2, namespace: demo}
spec: {selector: {matchLabels: {app: httpbin, version: v2}}, action: DENY, rules: [{}]}`)
	waypointBound := pol(t, `
metadata: {name: at-waypoint, namespace: demo}
spec: {targetRefs: [{kind: Service, group: "", name: httpbin}]}`)
	audit := pol(t, "metadata: {name: audit, namespace: demo}\nspec: {action: AUDIT, rules: [{}]}")
	allowSleep := allowRule(t, "from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]")
	allowSleep.Metadata.Name = "allow-sleep"

	fromCurl := func(c *Conn) { c.SrcIdentity = curlID }
	tests := []struct {
		name     string
		policies []Policy
		root     string
		mod      func(*Conn)
		allowed  bool
		policy   string
	}{
		{"no policies", nil, "", nil, true, ""},
		{"ALLOW with no rules allows nothing", []Policy{allowNothing}, "", nil, false, ""},
		{"ALLOW rules [{}] allows all", []Policy{allowAll}, "", nil, true, "demo/allow-all"},
		{"allow-nothing plus a matching ALLOW", []Policy{allowNothing, allowSleep}, "", nil, true, "demo/allow-sleep"},
		{"allow-nothing plus a non-matching ALLOW", []Policy{allowNothing, allowSleep}, "", fromCurl, false, ""},
		{"DENY with no rules denies nothing", []Policy{denyNoRules}, "", nil, true, ""},
		{"DENY rules [{}] wins over ALLOW", []Policy{allowAll, denyAll}, "", nil, false, "demo/deny-all"},
		{"root namespace DENY applies mesh-wide", []Policy{rootDenyOther, allowAll}, "", fromCurl, false, "istio-system/root-deny"},
		{"root namespace DENY rule miss", []Policy{rootDenyOther}, "", nil, true, ""},
		{"configured root namespace", []Policy{customRootDeny}, "mesh-root", nil, false, "mesh-root/mesh-deny"},
		{"istio-system is not root when configured otherwise", []Policy{rootDenyOther}, "mesh-root", fromCurl, true, ""},
		{"other namespace does not apply", []Policy{otherNSAllowNothing}, "", nil, true, ""},
		{"selector mismatch does not apply", []Policy{selectorMiss}, "", nil, true, ""},
		{"selector match applies", []Policy{selectorHit}, "", nil, true, "demo/httpbin-v1"},
		{"selector match port miss", []Policy{selectorHit}, "", func(c *Conn) { c.DstPort = 9090 }, false, ""},
		{"selector needs every label", []Policy{selectorPartial}, "", nil, true, ""},
		{"targetRefs policies belong to waypoints", []Policy{waypointBound}, "", nil, true, ""},
		{"AUDIT is not enforced", []Policy{audit, allowNothing}, "", nil, false, ""},
		{"AUDIT alone allows", []Policy{audit}, "", nil, true, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := Evaluator{RootNamespace: tc.root}.Evaluate(tc.policies, conn(tc.mod))
			if d.Allowed != tc.allowed || d.Policy != tc.policy {
				t.Errorf("got Allowed=%v Policy=%q (%s), want Allowed=%v Policy=%q",
					d.Allowed, d.Policy, d.Reason, tc.allowed, tc.policy)
			}
			if d.Reason == "" {
				t.Error("empty Reason")
			}
			if (d.Policy == "") != (d.Rule == -1) {
				t.Errorf("Rule=%d inconsistent with Policy=%q", d.Rule, d.Policy)
			}
		})
	}
}

func TestDecisionReason(t *testing.T) {
	p := denyRule(t, "from: [{source: {namespaces: [prod]}}]\n")
	p2 := denyRule(t, "from: [{source: {namespaces: [demo]}}]\n")
	p2.Metadata.Name = "second"
	p2.Spec.Rules = append([]Rule{{From: []From{{Source: Source{Namespaces: []string{"x"}}}}}}, p2.Spec.Rules...)
	d := Evaluate([]Policy{p, p2}, conn(nil))
	if d.Allowed || d.Policy != "demo/second" || d.Rule != 1 {
		t.Fatalf("got %+v, want deny by demo/second rule 1", d)
	}
	if want := "denied by DENY policy demo/second rule 1"; d.Reason != want {
		t.Errorf("Reason = %q, want %q", d.Reason, want)
	}
	a := pol(t, "metadata: {name: a, namespace: demo}\nspec: {}")
	d = Evaluate([]Policy{a}, conn(nil))
	if !strings.Contains(d.Reason, "demo/a") {
		t.Errorf("default-deny reason %q does not name the ALLOW policies", d.Reason)
	}
}

func TestValidate(t *testing.T) {
	good := pol(t, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: good, namespace: demo}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ['*', '*/sa/x', 'td/ns/a/*']
        ipBlocks: [10.0.0.1, 'fd00::/8']
    to: [{operation: {ports: ['80'], notPorts: ['65535']}}]
    when: [{key: destination.port, values: ['8080']}, {key: source.ip, notValues: [1.2.3.4]}]`)
	if err := good.Validate(); err != nil {
		t.Errorf("Validate(good) = %v", err)
	}
	bad := pol(t, `
metadata: {name: bad, namespace: demo}
spec:
  action: REJECT
  rules:
  - from: [{source: {principals: ['a*b*'], notIpBlocks: [10.0.0.0/40]}}]
    to: [{operation: {ports: ['0'], methods: [GET]}}]
    when: [{key: 'request.auth.claims[iss]', values: [x]}, {key: destination.port, values: ['99999']}]`)
	err := bad.Validate()
	if err == nil {
		t.Fatal("Validate(bad) = nil")
	}
	for _, want := range []string{`spec.action "REJECT"`, `principals: invalid value "a*b*"`,
		`notIpBlocks: invalid value "10.0.0.0/40"`, `invalid port "0"`, `invalid value "99999"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Validate error lacks %q:\n%v", want, err)
		}
	}
	l7 := strings.Join(bad.L7Fields(), " ")
	if want := "spec.rules[0].to[0].operation.methods spec.rules[0].when[0].key=request.auth.claims[iss]"; l7 != want {
		t.Errorf("L7Fields = %q, want %q", l7, want)
	}
	if f := good.L7Fields(); len(f) != 0 {
		t.Errorf("L7Fields(good) = %v", f)
	}
}

func TestAppliesTo(t *testing.T) {
	p := pol(t, "metadata: {name: p, namespace: istio-system}\nspec: {selector: {matchLabels: {app: a}}}")
	if !p.AppliesTo("", "any", map[string]string{"app": "a", "x": "y"}) {
		t.Error("root-namespace policy with matching selector should apply in any namespace")
	}
	if p.AppliesTo("", "any", map[string]string{"app": "b"}) {
		t.Error("selector mismatch should not apply")
	}
	if p.AppliesTo("", "any", nil) {
		t.Error("selector against a workload without labels should not apply")
	}
	if p.AppliesTo("root2", "any", map[string]string{"app": "a"}) {
		t.Error("istio-system policy applied when the root namespace is root2")
	}
}
