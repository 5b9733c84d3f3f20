package kubediscovery

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/netip"
	"reflect"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/discovery"
)

func fuzzObject(kind, ns string, spec any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": kind,
		"metadata": map[string]any{"name": "p", "namespace": ns}, "spec": spec}}
}

// FuzzPolicyConversion converts arbitrary AuthorizationPolicy specs (any
// JSON the API server could store). Properties: every object becomes
// exactly one policy; one that does not decode becomes a DENY that
// refuses every connection to the workloads it selects (fail closed); one
// that decodes validates, survives a JSON round trip unchanged, and
// evaluates the same way twice.
func FuzzPolicyConversion(f *testing.F) {
	for _, s := range []string{
		`{"action":"DENY","rules":[{"to":[{"operation":{"ports":["22"]}}]}]}`,
		`{"selector":{"matchLabels":{"app":"web"}},"rules":[{"from":[{"source":{"principals":["cluster.local/ns/a/sa/b"],"ipBlocks":["10.0.0.0/8"]}}]}]}`,
		`{"action":"ALLOW","rules":[{"when":[{"key":"source.ip","values":["10.1.0.0/16"]}]}]}`,
		`{"rules":[{"to":[{"operation":{"methods":["GET"],"paths":["/x"]}}]}]}`,
		`{"rule":[]}`, `{"rules":"all"}`, `{"action":"MAYBE"}`, `{"selector":{"matchLabels":{"app":1}}}`, `null`, `[]`,
	} {
		f.Add([]byte(s), "shop", []byte{10, 0, 0, 7}, uint16(22))
	}
	n := newNotes(slog.New(slog.DiscardHandler))
	f.Fuzz(func(t *testing.T, specJSON []byte, ns string, src []byte, port uint16) {
		var spec any
		if json.Unmarshal(specJSON, &spec) != nil {
			return // the API server stores JSON only
		}
		u := fuzzObject("AuthorizationPolicy", ns, spec)
		n.begin()
		built := buildPolicies([]*unstructured.Unstructured{u}, n)
		n.end()
		if len(built) != 1 {
			t.Fatalf("one object gave %d policies", len(built))
		}
		srcIP, _ := netip.AddrFromSlice(src)
		conn := authz.Conn{SrcIP: srcIP, DstPort: port, DstNamespace: ns, SrcIdentity: "spiffe://cluster.local/ns/a/sa/b"}
		if sel := built[0].Spec.Selector; sel != nil {
			conn.DstLabels = sel.MatchLabels
		}
		p, err := decodePolicy(u)
		if err != nil {
			if d := authz.Evaluate(built, conn); d.Allowed {
				t.Fatalf("undecodable policy (%v) let %+v through: %s", err, conn, d)
			}
			return
		}
		if !reflect.DeepEqual(built[0], p) {
			t.Fatalf("buildPolicies %+v, decodePolicy %+v", built[0], p)
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("decoded policy does not validate: %v", err)
		}
		raw, err := json.Marshal(p.Spec)
		if err != nil {
			t.Fatal(err)
		}
		var again any
		if err := json.Unmarshal(raw, &again); err != nil {
			t.Fatal(err)
		}
		// Compared as JSON: an empty and an absent list or map are the same
		// policy (omitempty), as they are to Evaluate.
		p2, err := decodePolicy(fuzzObject("AuthorizationPolicy", ns, again))
		raw2, _ := json.Marshal(p2.Spec)
		if err != nil || !bytes.Equal(raw2, raw) {
			t.Fatalf("round trip of %s: %s, %v", raw, raw2, err)
		}
		if d1, d2 := authz.Evaluate(built, conn), authz.Evaluate(built, conn); !reflect.DeepEqual(d1, d2) {
			t.Fatalf("two evaluations differ: %v, %v", d1, d2)
		}
	})
}

// FuzzPeerAuthConversion converts an arbitrary PeerAuthentication spec in
// the root namespace or another. Properties: only STRICT or PERMISSIVE
// ever comes out; a root-namespace object sets only the mesh-wide mode,
// another only its own namespace's.
func FuzzPeerAuthConversion(f *testing.F) {
	for _, s := range []string{
		`{"mtls":{"mode":"STRICT"}}`, `{"mtls":{"mode":"PERMISSIVE"}}`, `{"mtls":{"mode":"DISABLE"}}`, `{"mtls":{"mode":"UNSET"}}`,
		`{"selector":{"matchLabels":{"app":"x"}},"mtls":{"mode":"STRICT"}}`, `{"portLevelMtls":{"80":{"mode":"DISABLE"}},"mtls":{"mode":"STRICT"}}`,
		`{"mtls":{"mode":7}}`, `{"mtls":"STRICT"}`, `null`,
	} {
		f.Add([]byte(s), true)
		f.Add([]byte(s), false)
	}
	n := newNotes(slog.New(slog.DiscardHandler))
	const root = "istio-system"
	f.Fuzz(func(t *testing.T, specJSON []byte, inRoot bool) {
		var spec any
		if json.Unmarshal(specJSON, &spec) != nil {
			return
		}
		ns := "shop"
		if inRoot {
			ns = root
		}
		n.begin()
		cfg, deny, _ := buildMTLS([]*unstructured.Unstructured{fuzzObject("PeerAuthentication", ns, spec)}, root, nil, n)
		n.end()
		// What no namespace mode expresses fails closed: only DENY
		// policies, in the object's own namespace.
		for _, p := range deny {
			if p.Spec.Action != authz.ActionDeny || p.Metadata.Namespace != ns {
				t.Fatalf("converted policy %+v from one object in %s: want a DENY there", p, ns)
			}
		}
		legal := func(m discovery.MTLSMode) bool {
			return m == "" || m == discovery.MTLSStrict || m == discovery.MTLSPermissive
		}
		if !legal(cfg.Mode) {
			t.Fatalf("mesh mode %q", cfg.Mode)
		}
		for k, m := range cfg.Namespaces {
			if k != ns || inRoot || m == "" || !legal(m) {
				t.Fatalf("namespace modes %v from one object in %s", cfg.Namespaces, ns)
			}
		}
		if !inRoot && cfg.Mode != "" {
			t.Fatalf("an object in %s set the mesh mode %q", ns, cfg.Mode)
		}
	})
}
