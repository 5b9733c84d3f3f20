package caclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/ambpf/ambpf/pkg/identity"
)

var (
	web = identity.MustParse("spiffe://cluster.local/ns/app/sa/web")
	db  = identity.MustParse("spiffe://cluster.local/ns/app/sa/db")
)

// lyingCA serves the certificate API with the mesh CA's TLS identity and
// answers with what answer makes of the request: the client must check
// the answer rather than trust the channel.
type lyingCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	answer func(csr *x509.CertificateRequest) ([]*x509.Certificate, error)
	md     atomic.Pointer[metadata.MD]
	req    atomic.Pointer[pb.IstioCertificateRequest]
}

func (l *lyingCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	l.md.Store(&md)
	l.req.Store(req)
	block, _ := pem.Decode([]byte(req.Csr))
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	chain, err := l.answer(csr)
	if err != nil {
		return nil, err
	}
	resp := &pb.IstioCertificateResponse{}
	for _, c := range chain {
		resp.CertChain = append(resp.CertChain, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	return resp, nil
}

func newCA(t *testing.T) *identity.CA {
	t.Helper()
	ca, err := identity.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// serve starts l on loopback with TLS from mesh and returns a client
// trusting mesh's root.
func serve(t *testing.T, mesh *identity.CA, l *lyingCA) *Client {
	t.Helper()
	cert, err := mesh.IssueServing([]string{"localhost"}, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewServerTLSFromCert(cert)))
	pb.RegisterIstioCertificateServiceServer(g, l)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(ln)
	t.Cleanup(g.Stop)
	dir := t.TempDir()
	root, token := filepath.Join(dir, "root.pem"), filepath.Join(dir, "token")
	if err := os.WriteFile(root, mesh.RootsPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(token, []byte("tok-123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := New(Config{Address: ln.Addr().String(), ServerName: "localhost", RootFile: root, TokenFile: token, ClusterID: "c1", Timeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func key(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestClientSendsIstioRequest: the request carries what Istio's CA
// expects (CSR with only the SPIFFE ID, ImpersonatedIdentity, bearer
// token, ClusterID, validity) and a good answer is returned without the
// root.
func TestClientSendsIstioRequest(t *testing.T) {
	mesh := newCA(t)
	l := &lyingCA{answer: func(csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
		chain, err := mesh.Issue(web, csr.PublicKey, time.Hour)
		return append(chain, mesh.RootCertificates()...), err
	}}
	c := serve(t, mesh, l)
	chain, err := c.IssueKey(web, key(t), 90*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 1 {
		t.Errorf("chain of %d certificates, want the leaf only (the root is not sent to peers)", len(chain))
	}
	md := *l.md.Load()
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer tok-123" {
		t.Errorf("authorization %q", got)
	}
	if got := md.Get("clusterid"); len(got) != 1 || got[0] != "c1" {
		t.Errorf("ClusterID %q", got)
	}
	req := l.req.Load()
	if got := req.Metadata.GetFields()["ImpersonatedIdentity"].GetStringValue(); got != web.String() {
		t.Errorf("ImpersonatedIdentity %q", got)
	}
	if req.ValidityDuration != 5400 {
		t.Errorf("validity %d s, want 5400", req.ValidityDuration)
	}
}

// TestClientRefusesBadAnswers: a certificate for another identity, for
// another key, or from another CA is refused (DataLoss), never used.
func TestClientRefusesBadAnswers(t *testing.T) {
	mesh, other := newCA(t), newCA(t)
	for name, answer := range map[string]func(*x509.CertificateRequest) ([]*x509.Certificate, error){
		"other identity": func(csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
			return mesh.Issue(db, csr.PublicKey, time.Hour)
		},
		"other key": func(*x509.CertificateRequest) ([]*x509.Certificate, error) {
			return mesh.Issue(web, &key(t).PublicKey, time.Hour)
		},
		"other CA": func(csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
			return other.Issue(web, csr.PublicKey, time.Hour)
		},
		"empty": func(*x509.CertificateRequest) ([]*x509.Certificate, error) { return nil, nil },
	} {
		t.Run(name, func(t *testing.T) {
			c := serve(t, mesh, &lyingCA{answer: answer})
			_, err := c.IssueKey(web, key(t), time.Hour)
			if status.Code(err) != codes.DataLoss || !strings.Contains(err.Error(), "response") {
				t.Fatalf("got %v, want DataLoss about the response", err)
			}
		})
	}
}

// TestClientPassesRefusalsOn: a CA refusal arrives with its code and
// reason and is not retried; Unavailable is retried until it succeeds.
func TestClientPassesRefusalsOn(t *testing.T) {
	mesh := newCA(t)
	var calls atomic.Int32
	c := serve(t, mesh, &lyingCA{answer: func(*x509.CertificateRequest) ([]*x509.Certificate, error) {
		calls.Add(1)
		return nil, status.Error(codes.PermissionDenied, "no pod of app/web on node n1")
	}})
	_, err := c.IssueKey(web, key(t), time.Hour)
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "node n1") || calls.Load() != 1 {
		t.Fatalf("got %v after %d calls, want PermissionDenied passed on after one call", err, calls.Load())
	}
	var n atomic.Int32
	c = serve(t, mesh, &lyingCA{answer: func(csr *x509.CertificateRequest) ([]*x509.Certificate, error) {
		if n.Add(1) < 3 {
			return nil, status.Error(codes.Unavailable, "starting")
		}
		return mesh.Issue(web, csr.PublicKey, time.Hour)
	}})
	if _, err := c.IssueKey(web, key(t), time.Hour); err != nil || n.Load() != 3 {
		t.Fatalf("got %v after %d calls, want success on the third", err, n.Load())
	}
}
