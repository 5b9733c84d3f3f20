package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var testID = MustParse("spiffe://cluster.local/ns/default/sa/app")

func TestLoadOrCreateRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o600 {
		t.Fatalf("ca.key mode = %o, want 600", perm)
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("ca dir mode = %v (%v), want 700", st.Mode().Perm(), err)
	}
	root := ca.Certificate()
	if !root.IsCA || root.PublicKeyAlgorithm != x509.ECDSA {
		t.Fatalf("root: IsCA=%v alg=%v", root.IsCA, root.PublicKeyAlgorithm)
	}
	if k := root.PublicKey.(*ecdsa.PublicKey); k.Curve != elliptic.P256() {
		t.Fatalf("root curve = %v, want P-256", k.Curve.Params().Name)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Fatalf("ca dir holds %d entries, want ca.crt and ca.key only", len(entries))
	}

	again, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !again.Certificate().Equal(root) {
		t.Fatal("second LoadOrCreate made a new root instead of loading")
	}
	// A certificate issued by the reloaded CA verifies against the first
	// instance's bundle: same key, same root.
	chain, err := again.IssueTLS(testID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := chain.Leaf.Verify(x509.VerifyOptions{Roots: ca.Roots()}); err != nil {
		t.Fatalf("reloaded CA's leaf does not verify against the original root: %v", err)
	}
}

func TestIssue(t *testing.T) {
	ca, err := LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	chain, err := ca.Issue(testID, &key.PublicKey, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 1 {
		t.Fatalf("chain length %d, want 1 (root not included)", len(chain))
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != testID.String() {
		t.Fatalf("URI SANs = %v, want exactly [%s]", leaf.URIs, testID)
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Fatal("leaf carries SANs other than the SPIFFE URI")
	}
	if leaf.IsCA {
		t.Fatal("leaf is a CA")
	}
	if !leaf.NotBefore.Before(before) {
		t.Fatalf("NotBefore %v is not in the past", leaf.NotBefore)
	}
	if life := leaf.NotAfter.Sub(before); life < DefaultLifetime-time.Minute || life > DefaultLifetime+time.Minute {
		t.Fatalf("lifetime %v, want about %v", life, DefaultLifetime)
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Roots(), KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Fatalf("verify for usage %v: %v", usage, err)
		}
	}
	// The SAN extension must be critical: the subject is empty.
	for _, ext := range leaf.Extensions {
		if ext.Id.Equal([]int{2, 5, 29, 17}) && !ext.Critical {
			t.Fatal("subjectAltName is not critical although the subject is empty")
		}
	}
	// An independent verifier agrees.
	dir := t.TempDir()
	writePEM(t, filepath.Join(dir, "root.pem"), ca.Certificate().Raw)
	writePEM(t, filepath.Join(dir, "leaf.pem"), leaf.Raw)
	for _, purpose := range []string{"sslclient", "sslserver"} {
		out, err := exec.Command("openssl", "verify", "-purpose", purpose, "-CAfile", filepath.Join(dir, "root.pem"), filepath.Join(dir, "leaf.pem")).CombinedOutput()
		if err != nil {
			t.Fatalf("openssl verify -purpose %s: %v\n%s", purpose, err, out)
		}
	}

	short, err := ca.Issue(testID, &key.PublicKey, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if d := short[0].NotAfter.Sub(before); d > 10*time.Second {
		t.Fatalf("2s lifetime gave NotAfter %v after issue", d)
	}
	if _, err := ca.Issue(Identity{TrustDomain: "td"}, &key.PublicKey, 0); err == nil {
		t.Fatal("Issue accepted an invalid identity")
	}
}

// openssl builds a root and an intermediate in the cert-manager secret
// layout: tls.crt/tls.key (the intermediate, SEC 1 key) and ca.crt (root).
func certManagerDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	run := func(args ...string) {
		t.Helper()
		cmd := exec.Command("openssl", args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("openssl %v: %v\n%s", args, err, out)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "ext.cnf"), []byte("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "root.key", "-out", "ca.crt",
		"-days", "2", "-subj", "/CN=test root", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
	run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "int.key", "-out", "int.csr", "-subj", "/CN=test intermediate")
	run("x509", "-req", "-in", "int.csr", "-CA", "ca.crt", "-CAkey", "root.key", "-CAcreateserial", "-out", "tls.crt", "-days", "1", "-extfile", "ext.cnf")
	run("ec", "-in", "int.key", "-out", "tls.key")
	for _, f := range []string{"root.key", "int.key", "int.csr", "ext.cnf", "ca.srl"} {
		os.Remove(filepath.Join(dir, f))
	}
	return dir
}

func TestLoadCertManagerLayout(t *testing.T) {
	dir := certManagerDir(t)
	ca, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if ca.Certificate().Subject.CommonName != "test intermediate" {
		t.Fatalf("signing cert %q, want the intermediate", ca.Certificate().Subject.CommonName)
	}
	roots := ca.RootCertificates()
	if len(roots) != 1 || roots[0].Subject.CommonName != "test root" {
		t.Fatalf("trust bundle = %v, want the root from ca.crt", roots)
	}
	tc, err := ca.IssueTLS(testID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(tc.Certificate) != 2 {
		t.Fatalf("chain length %d, want leaf + intermediate", len(tc.Certificate))
	}
	inter := x509.NewCertPool()
	inter.AddCert(ca.Certificate())
	if _, err := tc.Leaf.Verify(x509.VerifyOptions{Roots: ca.Roots(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("leaf via intermediate: %v", err)
	}
	// LoadOrCreate must not have created our layout next to it.
	if _, err := os.Stat(filepath.Join(dir, CAKeyFile)); err == nil {
		t.Fatal("LoadOrCreate wrote ca.key into a cert-manager directory")
	}
	if got := strings.Count(string(ca.RootsPEM()), "BEGIN CERTIFICATE"); got != 1 {
		t.Fatalf("RootsPEM holds %d certificates, want 1", got)
	}
}

func TestLoadErrors(t *testing.T) {
	good := t.TempDir()
	if _, err := LoadOrCreate(good); err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if _, err := LoadOrCreate(other); err != nil {
		t.Fatal(err)
	}
	cert, key := filepath.Join(good, CACertFile), filepath.Join(good, CAKeyFile)
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca, _ := Load(cert, key)
	leaf, _ := ca.Issue(testID, &leafKey.PublicKey, time.Hour)
	leafPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf[0].Raw})
	leafKeyDER, _ := x509.MarshalPKCS8PrivateKey(leafKey)
	leafKeyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: leafKeyDER})
	rootPEM, _ := os.ReadFile(cert)

	for _, tc := range []struct {
		name, cert, key, want string
	}{
		{"missing cert", filepath.Join(dir, "nope.crt"), key, "no such file"},
		{"garbage cert", file("garbage.crt", "hello"), key, "no PEM CERTIFICATE block"},
		{"key as cert", file("keyascert.crt", string(leafKeyPEM)), key, `unexpected PEM block "PRIVATE KEY"`},
		{"trailing junk", file("junk.crt", string(rootPEM)+"junk"), key, "trailing data"},
		{"garbage key", cert, file("garbage.key", "hello"), "no PEM block"},
		{"cert as key", cert, file("certaskey.key", string(rootPEM)), `want a private key`},
		{"wrong key", cert, filepath.Join(other, CAKeyFile), "private key does not match"},
		{"not a CA", file("leaf.crt", string(leafPEM)), file("leaf.key", string(leafKeyPEM)), "not a CA"},
	} {
		_, err := Load(tc.cert, tc.key)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Load error = %v, want one containing %q", tc.name, err, tc.want)
		}
	}

	half := t.TempDir()
	if err := os.WriteFile(filepath.Join(half, CACertFile), rootPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreate(half); err == nil || !strings.Contains(err.Error(), "only one of") {
		t.Fatalf("LoadOrCreate with ca.crt but no ca.key: %v", err)
	}
}

func writePEM(t *testing.T, path string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
