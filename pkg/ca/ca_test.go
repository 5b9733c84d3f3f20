//go:build linux

package ca_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambpf/ambpf/pkg/ca"
	"github.com/ambpf/ambpf/pkg/ca/catest"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/kubetest"
)

func td(ns, sa string) identity.Identity {
	return identity.Identity{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: sa}
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestNodeProxyGetsCertificatesOfItsNodeOnly drives the ambpf-ca binary
// with the chart's RBAC: a node proxy's projected token gets certificates
// for the service accounts of pods on its node, is refused those of
// another node's pods, and the trust bundle is published in every
// namespace, including one created later.
func TestNodeProxyGetsCertificatesOfItsNodeOnly(t *testing.T) {
	m := catest.NewMesh(t, kubetest.Shared(t), "cam")
	nodeA, nodeB := m.Node("a"), m.Node("b")
	proxyA := m.Pod(m.Sys, "proxy-a", m.ProxySA, nodeA)
	proxyB := m.Pod(m.Sys, "proxy-b", m.ProxySA, nodeB)
	m.Pod(m.App, "web-0", "web", nodeA)
	m.Pod(m.App, "db-0", "db", nodeB)
	p := m.StartCA()

	a := p.Client(m.Token(proxyA, ca.Audience))
	key := newKey(t)
	chain, err := a.IssueKey(td(m.App, "web"), key, time.Hour)
	if err != nil {
		t.Fatalf("proxy on %s, identity of a pod on its node: %v", nodeA, err)
	}
	if got, err := identity.FromCertificate(chain[0]); err != nil || got != td(m.App, "web") {
		t.Fatalf("issued for %v (%v)", got, err)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: a.Roots(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("issued certificate does not verify against the published root: %v", err)
	}
	if d := time.Until(chain[0].NotAfter); d > time.Hour || d < 50*time.Minute {
		t.Errorf("asked for 1h, valid for %s", d)
	}

	_, err = a.IssueKey(td(m.App, "db"), newKey(t), time.Hour)
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), nodeA) {
		t.Fatalf("proxy on %s asking for db (on %s): %v, want PermissionDenied naming its node", nodeA, nodeB, err)
	}
	// The other node's proxy gets it.
	b := p.Client(m.Token(proxyB, ca.Audience))
	if _, err := b.IssueKey(td(m.App, "db"), newKey(t), time.Hour); err != nil {
		t.Fatalf("proxy on %s asking for db: %v", nodeB, err)
	}
	// The whole proxy path: a rotating source over the client.
	src, err := identity.NewSource(identity.SourceConfig{Identity: td(m.App, "web"), Issuer: a})
	if err != nil {
		t.Fatal(err)
	}
	src.Close()

	root, err := os.ReadFile(p.RootFile())
	if err != nil {
		t.Fatal(err)
	}
	late := m.Release + "-late"
	m.Create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: late}})
	for _, ns := range []string{m.Sys, m.App, late} {
		catest.Eventually(t, 30*time.Second, func() error {
			cm, err := m.CP.Client.CoreV1().ConfigMaps(ns).Get(context.Background(), ca.RootConfigMap, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if cm.Data[ca.RootCertKey] != string(root) {
				return fmt.Errorf("%s/%s holds %q", ns, ca.RootConfigMap, cm.Data[ca.RootCertKey])
			}
			return nil
		})
	}
}

// rawClient speaks the gRPC API directly, for requests the proxy's client
// would never send.
type rawClient struct {
	t   *testing.T
	svc pb.IstioCertificateServiceClient
}

func raw(t *testing.T, p *catest.CAProcess) *rawClient {
	t.Helper()
	roots := x509.NewCertPool()
	pemData, err := os.ReadFile(p.RootFile())
	if err != nil {
		t.Fatal(err)
	}
	roots.AppendCertsFromPEM(pemData)
	conn, err := grpc.NewClient(p.Addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost"})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &rawClient{t: t, svc: pb.NewIstioCertificateServiceClient(conn)}
}

// request sends a CSR for the impersonated identity with token.
func (r *rawClient) request(token, impersonated string, csr []byte) (*pb.IstioCertificateResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	return r.svc.CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(csr), ValidityDuration: 3600,
		Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{ca.ImpersonatedIdentityKey: structpb.NewStringValue(impersonated)}},
	})
}

func csrPEM(t *testing.T, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func uris(ids ...string) []*url.URL {
	var out []*url.URL
	for _, s := range ids {
		u, _ := url.Parse(s)
		out = append(out, u)
	}
	return out
}

func readToken(t *testing.T, file string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestBadInputIsRefused sends each kind of bad request to the ambpf-ca
// binary and checks the gRPC code and message, and that the CA's count of
// issued certificates did not move.
func TestBadInputIsRefused(t *testing.T) {
	m := catest.NewMesh(t, kubetest.Shared(t), "cab")
	nodeA, nodeB := m.Node("a"), m.Node("b")
	proxyA := m.Pod(m.Sys, "proxy-a", m.ProxySA, nodeA)
	m.Pod(m.App, "web-0", "web", nodeA)
	m.Pod(m.App, "db-0", "db", nodeB)
	other := m.Pod(m.App, "other-0", "other", nodeA) // not a node account
	m.Create(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "other", Namespace: m.App}})
	p := m.StartCA("--burst=100", "--rate=100")
	r := raw(t, p)
	web := td(m.App, "web").String()
	good := csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: uris(web)})
	tokA := readToken(t, m.Token(proxyA, ca.Audience))

	// The control: the same request with a good token is issued.
	if _, err := r.request(tokA, web, good); err != nil {
		t.Fatalf("good request: %v", err)
	}
	issued := p.Counter("issued")

	expired := signedToken(t, m, proxyA, ca.Audience, time.Now().Add(-time.Hour))
	fresh := signedToken(t, m, proxyA, ca.Audience, time.Now().Add(time.Hour))
	if _, err := r.request(fresh, web, good); err != nil {
		t.Fatalf("control for the expired token (same token, valid expiry): %v", err)
	}
	issued++

	rsaBig := make([]byte, 20<<10)
	for i := range rsaBig {
		rsaBig[i] = 'A'
	}
	edPub, edKey, _ := ed25519.GenerateKey(rand.Reader)
	_ = edPub
	huge := csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: uris(web), ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1}, Value: mustASN1(t, string(rsaBig))}}})

	cases := []struct {
		name     string
		token    string
		identity string
		csr      []byte
		code     codes.Code
		msg      string
	}{
		{"no token", "", web, good, codes.Unauthenticated, "no bearer token"},
		{"expired token", expired, web, good, codes.Unauthenticated, "token rejected"},
		{"wrong audience", readToken(t, m.Token(proxyA, "not-istio-ca")), web, good, codes.Unauthenticated, "token rejected"},
		{"pod on another node", tokA, td(m.App, "db").String(), csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: uris(td(m.App, "db").String())}), codes.PermissionDenied, "on node \"" + nodeA + "\""},
		{"pod that does not exist", tokA, td(m.App, "ghost").String(), csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: uris(td(m.App, "ghost").String())}), codes.PermissionDenied, "no running pod with service account " + m.App + "/ghost"},
		{"caller is not a node account", readToken(t, m.Token(other, ca.Audience)), web, good, codes.PermissionDenied, "not a trusted node account"},
		{"other trust domain", tokA, "spiffe://evil.example/ns/" + m.App + "/sa/web", good, codes.PermissionDenied, "outside trust domain"},
		{"extra DNS SAN", tokA, web, csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: uris(web), DNSNames: []string{"evil.example"}}), codes.InvalidArgument, "SANs besides the SPIFFE ID"},
		{"second URI SAN", tokA, web, csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: uris(web, td(m.App, "db").String())}), codes.InvalidArgument, "want exactly"},
		{"CSR for another identity", tokA, web, csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: uris(td(m.App, "db").String())}), codes.InvalidArgument, "want exactly"},
		{"ed25519 key", tokA, web, csrPEM(t, edKey, &x509.CertificateRequest{URIs: uris(web)}), codes.InvalidArgument, "key type"},
		{"P-224 key", tokA, web, csrPEM(t, mustP224(t), &x509.CertificateRequest{URIs: uris(web)}), codes.InvalidArgument, "curve"},
		{"CSR too large", tokA, web, huge, codes.InvalidArgument, "the limit is"},
		{"not a CSR", tokA, web, []byte("hello"), codes.InvalidArgument, "no PEM block"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, err := r.request(c.token, c.identity, c.csr)
			if status.Code(err) != c.code || !strings.Contains(status.Convert(err).Message(), c.msg) {
				t.Fatalf("got %v (response %v), want %s containing %q", err, resp, c.code, c.msg)
			}
		})
	}
	if got := p.Counter("issued"); got != issued {
		t.Errorf("CA issued %v certificates, want %v: a refused request was signed", got, issued)
	}

	t.Run("flood", func(t *testing.T) {
		// A CA of its own with a small budget: burst 5, 1/s per caller
		// (so 20, 4/s per address).
		p := m.StartCA("--burst=5", "--rate=1")
		r := raw(t, p)
		flooder := m.Pod(m.Sys, "proxy-flood", m.ProxySA, nodeA)
		tok := readToken(t, m.Token(flooder, ca.Audience))
		var mu sync.Mutex
		seen := map[codes.Code]int{}
		namedCaller := false
		var wg sync.WaitGroup
		for range 40 {
			wg.Go(func() {
				_, err := r.request(tok, web, good)
				mu.Lock()
				defer mu.Unlock()
				seen[status.Code(err)]++
				if strings.Contains(status.Convert(err).Message(), "too many requests from "+m.Sys+"/"+m.ProxySA+" (pod "+m.Sys+"/proxy-flood)") {
					namedCaller = true
				}
			})
		}
		wg.Wait()
		if seen[codes.ResourceExhausted] < 25 || seen[codes.OK] < 1 || seen[codes.OK] > 15 {
			t.Fatalf("40 requests at once, burst 5: %v, want most ResourceExhausted", seen)
		}
		if !namedCaller {
			t.Errorf("no refusal named the flooding caller")
		}
		if got := p.Counter("ResourceExhausted"); got != float64(seen[codes.ResourceExhausted]) {
			t.Errorf("CA counted %v refusals, the client saw %d", got, seen[codes.ResourceExhausted])
		}
		// Another caller is not limited by the flooder's budget (the
		// per-address limit, shared here as every test caller is on
		// loopback, refills within a second).
		catest.Eventually(t, 10*time.Second, func() error {
			_, err := r.request(tokA, web, good)
			if err != nil && strings.Contains(err.Error(), "proxy-flood") {
				t.Fatalf("another caller limited by the flooder's budget: %v", err)
			}
			return err
		})
	})
}

func mustASN1(t *testing.T, s string) []byte {
	b, err := asn1.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustP224(t *testing.T) crypto.Signer {
	k, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// signedToken makes a token shaped like a pod-bound projected token,
// signed with the API server's service account key, expiring at exp: the
// API server has no API to issue an already expired one.
func signedToken(t *testing.T, m *catest.Mesh, p *corev1.Pod, audience string, exp time.Time) string {
	t.Helper()
	sa, err := m.CP.Client.CoreV1().ServiceAccounts(p.Namespace).Get(context.Background(), p.Spec.ServiceAccountName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := os.ReadFile(m.CP.ServiceAccountSigningKeyFile())
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(keyPEM)
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	key := k.(*ecdsa.PrivateKey)
	iat := exp.Add(-2 * time.Hour)
	claims := map[string]any{
		"iss": "https://kubernetes.default.svc.cluster.local",
		"aud": []string{audience},
		"sub": "system:serviceaccount:" + p.Namespace + ":" + p.Spec.ServiceAccountName,
		"iat": iat.Unix(), "nbf": iat.Unix(), "exp": exp.Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      p.Namespace,
			"pod":            map[string]string{"name": p.Name, "uid": string(p.UID)},
			"serviceaccount": map[string]string{"name": sa.Name, "uid": string(sa.UID)},
		},
	}
	enc := base64.RawURLEncoding
	hdr, _ := json.Marshal(map[string]string{"alg": "ES256", "typ": "JWT"})
	body, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	signing := enc.EncodeToString(hdr) + "." + enc.EncodeToString(body)
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + enc.EncodeToString(sig)
}

// TestIntermediateInCertManagerLayout: the CA signs with an intermediate
// given in cert-manager's Secret layout (tls.crt, tls.key, ca.crt = the
// root): the issued chain carries the intermediate, the client verifies it
// to the root alone, and the root is what is published.
func TestIntermediateInCertManagerLayout(t *testing.T) {
	m := catest.NewMesh(t, kubetest.Shared(t), "cai")
	node := m.Node("a")
	proxy := m.Pod(m.Sys, "proxy-a", m.ProxySA, node)
	m.Pod(m.App, "web-0", "web", node)

	dir := t.TempDir()
	rootKey, interKey := newKey(t), newKey(t)
	now := time.Now()
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "corp root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	interDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "mesh intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}, root, &interKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(interKey)
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{
		"tls.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: interDER}),
		"tls.key": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		"ca.crt":  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rootDER}),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	p := m.StartCAIn(dir)
	c := p.Client(m.Token(proxy, ca.Audience))
	chain, err := c.IssueKey(td(m.App, "web"), newKey(t), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || !bytes.Equal(chain[1].Raw, interDER) {
		t.Fatalf("chain of %d, want leaf and the intermediate", len(chain))
	}
	if chain[0].NotAfter.After(chain[1].NotAfter) {
		t.Errorf("leaf outlives the intermediate")
	}
	catest.Eventually(t, 30*time.Second, func() error {
		cm, err := m.CP.Client.CoreV1().ConfigMaps(m.App).Get(context.Background(), ca.RootConfigMap, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if got, _ := identity.ParseCertificatesPEM([]byte(cm.Data[ca.RootCertKey])); len(got) != 1 || !got[0].Equal(root) {
			return fmt.Errorf("published %q, want the root only", cm.Data[ca.RootCertKey])
		}
		return nil
	})
}
