//go:build linux

package nodelab

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"github.com/ambpf/ambpf/pkg/identity"
)

// meshRoot is the cluster's trust root: one self-signed certificate whose
// key signs one intermediate per node and is then forgotten (it is never
// written to disk), as an offline root would be.
type meshRoot struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

const pkiLifetime = 24 * time.Hour

func newMeshRoot() (*meshRoot, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate root key: %w", err)
	}
	tmpl := caTemplate("nodelab mesh root", 1)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("self-sign root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse root: %w", err)
	}
	return &meshRoot{cert: cert, key: key}, nil
}

func caTemplate(cn string, serial int64) *x509.Certificate {
	now := time.Now()
	return &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{Organization: []string{"ambpf nodelab"}, CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(pkiLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
}

// writeNodeCA writes an intermediate CA for one node into dir in the
// layout identity.LoadOrCreate reads as a mounted cert-manager secret:
// tls.crt (the intermediate), tls.key (its key) and ca.crt (the root, the
// trust bundle). The node's proxy signs its pods' certificates with the
// intermediate and sends it in every handshake; the other node verifies
// the chain against the shared root.
func (r *meshRoot) writeNodeCA(dir, node string, serial int64) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate %s intermediate key: %w", node, err)
	}
	tmpl := caTemplate(node+" intermediate", serial)
	tmpl.MaxPathLenZero = true
	der, err := x509.CreateCertificate(rand.Reader, tmpl, r.cert, &key.PublicKey, r.key)
	if err != nil {
		return fmt.Errorf("sign %s intermediate: %w", node, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal %s intermediate key: %w", node, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	for _, f := range []struct {
		name, typ string
		der       []byte
		mode      os.FileMode
	}{
		{identity.TLSCertFile, "CERTIFICATE", der, 0o644},
		{identity.TLSKeyFile, "PRIVATE KEY", keyDER, 0o600},
		{identity.CACertFile, "CERTIFICATE", r.cert.Raw, 0o644},
	} {
		data := pem.EncodeToMemory(&pem.Block{Type: f.typ, Bytes: f.der})
		if err := os.WriteFile(filepath.Join(dir, f.name), data, f.mode); err != nil {
			return fmt.Errorf("write %s CA: %w", node, err)
		}
	}
	return nil
}
