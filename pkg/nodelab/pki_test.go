//go:build linux

package nodelab

import (
	"crypto/x509"
	"path/filepath"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/identity"
)

// TestNodeCAs: each node's CA directory loads as a signing intermediate
// of its own; a pod certificate issued on node 1 carries node 1's
// intermediate and verifies against node 2's trust bundle (the shared
// root), and the other way round.
func TestNodeCAs(t *testing.T) {
	root, err := newMeshRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var cas []*identity.CA
	for i, node := range []string{"node1", "node2"} {
		d := filepath.Join(dir, node)
		if err := root.writeNodeCA(d, node, int64(i+2)); err != nil {
			t.Fatal(err)
		}
		ca, err := identity.LoadOrCreate(d)
		if err != nil {
			t.Fatalf("load %s CA: %v", node, err)
		}
		if ca.Certificate().Subject.CommonName != node+" intermediate" {
			t.Fatalf("%s signs with %q, want its intermediate", node, ca.Certificate().Subject.CommonName)
		}
		cas = append(cas, ca)
	}
	if cas[0].Certificate().Equal(cas[1].Certificate()) {
		t.Fatal("both nodes got the same intermediate")
	}
	id := identity.MustParse("spiffe://cluster.local/ns/ns-a/sa/default")
	for i, j := range []int{1, 0} {
		leaf, err := cas[i].IssueTLS(id, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if len(leaf.Certificate) != 2 {
			t.Fatalf("node%d chain has %d certificates, want leaf + intermediate", i+1, len(leaf.Certificate))
		}
		inter := x509.NewCertPool()
		c, err := x509.ParseCertificate(leaf.Certificate[1])
		if err != nil {
			t.Fatal(err)
		}
		inter.AddCert(c)
		if _, err := leaf.Leaf.Verify(x509.VerifyOptions{Roots: cas[j].Roots(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("node%d's pod certificate does not verify against node%d's bundle: %v", i+1, j+1, err)
		}
		if _, err := leaf.Leaf.Verify(x509.VerifyOptions{Roots: cas[j].Roots(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
			t.Errorf("node%d's pod certificate verified without its intermediate: the root signed it directly", i+1)
		}
	}
}
