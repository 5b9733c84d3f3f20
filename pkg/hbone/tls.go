package hbone

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"

	"github.com/ambpf/ambpf/pkg/identity"
)

// ALPN is the application protocol of HBONE over TLS (HTTP/2); ALPNH3
// that of HBONE over QUIC (HTTP/3, this project's opt-in transport).
const (
	ALPN   = "h2"
	ALPNH3 = "h3"
)

// TLSConfig holds what both ends need for mutual TLS.
type TLSConfig struct {
	// Credentials present the local workload's certificate.
	Credentials Credentials
	// Roots returns the mesh trust bundle; it is called on every handshake
	// so that a bundle change applies to new connections.
	Roots func() *x509.CertPool
	// AllowTLS12 permits TLS 1.2 (ECDHE AES-GCM suites only). HBONE is
	// TLS 1.3 only otherwise.
	AllowTLS12 bool
}

func (c TLSConfig) check() error {
	if c.Credentials == nil {
		return errors.New("tls config: no credentials")
	}
	if c.Roots == nil {
		return errors.New("tls config: no trust bundle")
	}
	return nil
}

// base returns the settings shared by client and server, negotiating
// alpn. QUIC carries only TLS 1.3, so AllowTLS12 does not apply to ALPNH3.
func (c TLSConfig) base(alpn string) *tls.Config {
	conf := &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		NextProtos: []string{alpn},
		// No resumption: every connection proves its identity with a
		// full handshake, as ztunnel does.
		SessionTicketsDisabled: true,
	}
	if c.AllowTLS12 && alpn != ALPNH3 {
		conf.MinVersion = tls.VersionTLS12
		// Go does not let TLS 1.3 suites be chosen; its set is all AEAD.
		conf.CipherSuites = []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
		}
	}
	return conf
}

// ServerTLS returns the configuration of an HBONE listener: it presents the
// local certificate, demands a client certificate that chains to the
// roots, and accepts only peers of the local trust domain.
func ServerTLS(c TLSConfig) (*tls.Config, error) {
	return serverTLS(c, ALPN)
}

func serverTLS(c TLSConfig, alpn string) (*tls.Config, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	conf := c.base(alpn)
	conf.GetCertificate = c.Credentials.GetCertificate
	// Chain verification is ours (verifyPeer): the standard one would
	// also want DNS names, which mesh certificates do not carry.
	conf.ClientAuth = tls.RequireAnyClientCert
	conf.VerifyConnection = func(cs tls.ConnectionState) error {
		id, err := verifyPeer(cs, c.Roots(), x509.ExtKeyUsageClientAuth)
		if err != nil {
			return err
		}
		if td := c.Credentials.Identity().TrustDomain; id.TrustDomain != td {
			return fmt.Errorf("client %s is not in trust domain %q", id, td)
		}
		return nil
	}
	return conf, nil
}

// ClientTLS returns the configuration of an HBONE client connection that
// accepts only a server whose certificate names exactly one of expected.
// It sends no SNI.
func ClientTLS(c TLSConfig, expected []identity.Identity) (*tls.Config, error) {
	return clientTLS(c, expected, ALPN)
}

func clientTLS(c TLSConfig, expected []identity.Identity, alpn string) (*tls.Config, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	if len(expected) == 0 {
		return nil, errors.New("client tls config: no expected server identity")
	}
	conf := c.base(alpn)
	conf.GetClientCertificate = c.Credentials.GetClientCertificate
	// InsecureSkipVerify only turns off Go's name-based check, and an empty
	// ServerName then means no SNI; VerifyConnection does the real
	// verification on every handshake.
	conf.InsecureSkipVerify = true
	want := slices.Clone(expected)
	conf.VerifyConnection = func(cs tls.ConnectionState) error {
		id, err := verifyPeer(cs, c.Roots(), x509.ExtKeyUsageServerAuth)
		if err != nil {
			return err
		}
		if !slices.Contains(want, id) {
			return fmt.Errorf("server identity %s is not one of the expected %v", id, want)
		}
		return nil
	}
	return conf, nil
}

// verifyPeer checks that the peer's certificate chains to roots for usage
// and returns the SPIFFE identity it carries.
func verifyPeer(cs tls.ConnectionState, roots *x509.CertPool, usage x509.ExtKeyUsage) (identity.Identity, error) {
	if len(cs.PeerCertificates) == 0 {
		return identity.Identity{}, errors.New("peer sent no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	leaf := cs.PeerCertificates[0]
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{usage},
	}); err != nil {
		return identity.Identity{}, fmt.Errorf("verify peer certificate: %w", err)
	}
	id, err := identity.FromCertificate(leaf)
	if err != nil {
		return identity.Identity{}, fmt.Errorf("peer certificate: %w", err)
	}
	return id, nil
}

// peerIdentity returns the identity of an already verified connection.
func peerIdentity(cs tls.ConnectionState) identity.Identity {
	if len(cs.PeerCertificates) == 0 {
		return identity.Identity{}
	}
	id, _ := identity.FromCertificate(cs.PeerCertificates[0])
	return id
}
