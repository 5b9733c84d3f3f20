package discovery

import (
	"os"
	"reflect"
	"testing"

	"sigs.k8s.io/yaml"
)

// FuzzParse feeds arbitrary discovery files to Parse. Properties: it never
// panics; a file it accepts holds only policies that validate; and the
// snapshot it returns, written back out as one document, parses to the
// same snapshot (nothing accepted is lost or changed on the way).
func FuzzParse(f *testing.F) {
	example, err := os.ReadFile("testdata/discovery/example.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	for _, s := range []string{
		"workloads:\n- {name: a, namespace: ns, ips: [10.0.0.1, 'fd00::1'], protocol: HBONE}\n",
		"services:\n- {name: s, namespace: ns, vips: [10.96.0.1], ports: {80: 8080}}\n",
		"kind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec: {action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}\n",
		"kind: PeerAuthentication\nmetadata: {name: a, namespace: ns}\nspec: {mtls: {mode: STRICT}}\n---\nmtls: {mode: PERMISSIVE}\n",
		"rootNamespace: mesh\ntrustDomain: td\n---\n",
		"workloads: [{name: a}]\n",
		"\xff\xfe",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		snap, err := Parse(data)
		if err != nil {
			return
		}
		for i := range snap.Policies {
			if err := snap.Policies[i].Validate(); err != nil {
				t.Fatalf("accepted policy %s does not validate: %v", snap.Policies[i].ID(), err)
			}
		}
		out, err := yaml.Marshal(snap)
		if err != nil {
			t.Fatalf("marshal accepted snapshot: %v", err)
		}
		again, err := Parse(out)
		if err != nil {
			t.Fatalf("snapshot written back does not parse: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(normal(again), normal(snap)) {
			t.Fatalf("snapshot changed on the way back:\n%#v\n%#v\n%s", snap, again, out)
		}
	})
}

// normal makes snapshots comparable: empty and nil collections are the
// same snapshot.
func normal(s Snapshot) Snapshot {
	out, _ := yaml.Marshal(s)
	var n Snapshot
	yaml.Unmarshal(out, &n)
	return n
}
