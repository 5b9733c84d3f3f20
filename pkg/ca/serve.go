package ca

import (
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/ambpf/ambpf/pkg/identity"
)

// servingLifetime is the validity of the CA endpoint's own certificate;
// it is reissued at half of it.
const servingLifetime = 24 * time.Hour

// ServingCert is the CA endpoint's TLS certificate, issued by the CA
// itself for Names and IPs (so clients verify the endpoint with the mesh
// root, as Istio's clients verify istiod with istio-ca-root-cert), and
// reissued in the handshake once half its lifetime has passed.
type ServingCert struct {
	CA    *identity.CA
	Names []string
	IPs   []net.IP

	mu    sync.Mutex
	cur   *tls.Certificate
	renew time.Time
}

// GetCertificate is a tls.Config.GetCertificate callback.
func (s *ServingCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil || time.Now().After(s.renew) {
		tc, err := s.CA.IssueServing(s.Names, s.IPs, servingLifetime)
		if err != nil {
			return nil, fmt.Errorf("CA serving certificate: %w", err)
		}
		s.cur = tc
		s.renew = time.Now().Add(time.Until(tc.Leaf.NotAfter) / 2)
	}
	return s.cur, nil
}

// NewGRPCServer returns a gRPC server for srv on TLS 1.3 with cert, its
// receive size limited to MaxMessageBytes.
func NewGRPCServer(srv *Server, cert *ServingCert) *grpc.Server {
	g := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, GetCertificate: cert.GetCertificate})),
		grpc.MaxRecvMsgSize(MaxMessageBytes),
		// A client may not hold many idle streams open at no cost.
		grpc.MaxConcurrentStreams(64),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 5 * time.Minute}),
	)
	srv.Register(g)
	return g
}
