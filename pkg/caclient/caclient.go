// Package caclient gets workload certificates from a CA that serves
// Istio's certificate API (istio.v1.auth.IstioCertificateService): the
// project's ambpf-ca or istiod. It is what a node proxy uses instead of
// holding the CA key: per identity it generates a key (identity.Source
// does), sends a CSR for that identity with the ImpersonatedIdentity
// metadata key, authenticated by the proxy's own projected service
// account token (audience istio-ca), and verifies what comes back
// against the mesh root before using it.
package caclient

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/ambpf/ambpf/pkg/identity"
)

// Defaults of Config.
const (
	DefaultTokenFile = "/var/run/secrets/tokens/istio-token"
	DefaultRootFile  = "/var/run/secrets/istio/root-cert.pem"
	DefaultClusterID = "Kubernetes"
	DefaultTimeout   = 10 * time.Second
	reconnectMax     = 5 * time.Second
)

// Config configures a Client.
type Config struct {
	// Address is the CA's host:port (ambpf-ca.ambpf-system.svc:15012,
	// istiod.istio-system.svc:15012).
	Address string
	// RootFile holds the PEM mesh root(s): the CA's serving certificate
	// is verified against them, and so are peers' workload certificates
	// (Roots). The istio-ca-root-cert ConfigMap's root-cert.pem.
	RootFile string
	// TokenFile holds the proxy's projected service account token; it is
	// read for every request, as the kubelet rotates it.
	TokenFile string
	// ServerName overrides the name the CA's certificate is verified for
	// (default: Address's host).
	ServerName string
	// ClusterID is sent in the ClusterID header (DefaultClusterID when
	// empty).
	ClusterID string
	// Timeout bounds one request, retries included (DefaultTimeout).
	Timeout time.Duration
}

// Client implements identity.Authority against a remote CA, and
// prometheus.Collector for its request counter.
type Client struct {
	cfg      Config
	conn     *grpc.ClientConn
	svc      pb.IstioCertificateServiceClient
	roots    *x509.CertPool
	rootList []*x509.Certificate
	requests *prometheus.CounterVec
}

var (
	_ identity.Authority   = (*Client)(nil)
	_ prometheus.Collector = (*Client)(nil)
)

// New loads the roots and prepares the connection; it does not dial (the
// CA may be down at start; each request connects as needed).
func New(cfg Config) (*Client, error) {
	if cfg.Address == "" {
		return nil, errors.New("ca client: empty address")
	}
	if cfg.RootFile == "" {
		cfg.RootFile = DefaultRootFile
	}
	if cfg.TokenFile == "" {
		cfg.TokenFile = DefaultTokenFile
	}
	if cfg.ClusterID == "" {
		cfg.ClusterID = DefaultClusterID
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(cfg.Address)
		if err != nil {
			return nil, fmt.Errorf("ca client: address %q: %w", cfg.Address, err)
		}
		cfg.ServerName = host
	}
	data, err := os.ReadFile(cfg.RootFile)
	if err != nil {
		return nil, fmt.Errorf("ca client: read roots: %w", err)
	}
	list, err := identity.ParseCertificatesPEM(data)
	if err != nil {
		return nil, fmt.Errorf("ca client: roots %s: %w", cfg.RootFile, err)
	}
	pool := x509.NewCertPool()
	for _, c := range list {
		pool.AddCert(c)
	}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, ServerName: cfg.ServerName}
	conn, err := grpc.NewClient(cfg.Address,
		grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)),
		// gRPC's default reconnect backoff grows to 2 min: a CA that
		// restarted would be asked again only that late, while
		// certificates near expiry wait. Cap it at reconnectMax.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 200 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: reconnectMax},
			MinConnectTimeout: 5 * time.Second,
		}))
	if err != nil {
		return nil, fmt.Errorf("ca client %s: %w", cfg.Address, err)
	}
	return &Client{
		cfg: cfg, conn: conn, svc: pb.NewIstioCertificateServiceClient(conn),
		roots: pool, rootList: list,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambpf_ca_client_requests_total",
			Help: "Certificate requests to the CA by result (ok, or the gRPC code); a pod whose first certificate fails is refused.",
		}, []string{"result"}),
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Roots implements identity.Authority: the roots of RootFile.
func (c *Client) Roots() *x509.CertPool { return c.roots }

// Describe implements prometheus.Collector.
func (c *Client) Describe(ch chan<- *prometheus.Desc) { c.requests.Describe(ch) }

// Collect implements prometheus.Collector.
func (c *Client) Collect(ch chan<- prometheus.Metric) { c.requests.Collect(ch) }

// IssueKey implements identity.Issuer: a CSR for id signed by key, sent
// to the CA. Unavailable answers are retried with backoff within Timeout;
// a refusal is returned at once, its gRPC status wrapped.
func (c *Client) IssueKey(id identity.Identity, key crypto.Signer, lifetime time.Duration) ([]*x509.Certificate, error) {
	chain, err := c.issue(id, key, lifetime)
	result := "ok"
	if err != nil {
		result = status.Code(err).String()
	}
	c.requests.WithLabelValues(result).Inc()
	return chain, err
}

func (c *Client) issue(id identity.Identity, key crypto.Signer, lifetime time.Duration) ([]*x509.Certificate, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return nil, fmt.Errorf("CSR for %s: %w", id, err)
	}
	token, err := os.ReadFile(c.cfg.TokenFile)
	if err != nil {
		return nil, fmt.Errorf("certificate for %s: read token: %w", id, err)
	}
	req := &pb.IstioCertificateRequest{
		Csr:              string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})),
		ValidityDuration: int64(lifetime / time.Second),
		Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
			"ImpersonatedIdentity": structpb.NewStringValue(id.String()),
		}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.Timeout)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx,
		"authorization", "Bearer "+strings.TrimSpace(string(token)),
		"ClusterID", c.cfg.ClusterID)
	var resp *pb.IstioCertificateResponse
	for wait := 200 * time.Millisecond; ; wait *= 2 {
		resp, err = c.svc.CreateCertificate(ctx, req)
		if code := status.Code(err); code != codes.Unavailable && code != codes.ResourceExhausted {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
			continue
		}
		break
	}
	if err != nil {
		return nil, fmt.Errorf("certificate for %s from CA %s: %w", id, c.cfg.Address, err)
	}
	chain, err := c.verify(resp.GetCertChain(), id, key)
	if err != nil {
		return nil, fmt.Errorf("certificate for %s from CA %s: %w", id, c.cfg.Address, status.Error(codes.DataLoss, err.Error()))
	}
	return chain, nil
}

// verify parses the response (leaf, intermediates, root last, each
// element one or more PEM certificates), checks the leaf is for id and
// key and chains to Roots, and returns the chain without the roots.
func (c *Client) verify(elems []string, id identity.Identity, key crypto.Signer) ([]*x509.Certificate, error) {
	var all []*x509.Certificate
	for _, e := range elems {
		certs, err := identity.ParseCertificatesPEM([]byte(e))
		if err != nil {
			return nil, fmt.Errorf("response: %w", err)
		}
		all = append(all, certs...)
	}
	if len(all) == 0 {
		return nil, errors.New("response: no certificate")
	}
	leaf := all[0]
	if got, err := identity.FromCertificate(leaf); err != nil || got != id {
		return nil, fmt.Errorf("response: certificate for %q, want %s (%v)", got, id, err)
	}
	if k, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(key.Public()) {
		return nil, errors.New("response: certificate is not for the CSR's key")
	}
	var chain []*x509.Certificate
	inter := x509.NewCertPool()
	for _, cert := range all {
		if slices.ContainsFunc(c.rootList, cert.Equal) {
			continue
		}
		chain = append(chain, cert)
		inter.AddCert(cert)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: c.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("response: certificate does not chain to the mesh roots in %s: %w", c.cfg.RootFile, err)
	}
	return chain, nil
}
