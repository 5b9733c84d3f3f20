package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/ambpf/ambpf/pkg/identity"
)

// checkCSR parses a PEM certificate signing request and returns its
// public key when the request is for exactly id: one CERTIFICATE REQUEST
// block and nothing else, a valid self-signature (the requester holds the
// key), an accepted key type, and the SPIFFE ID as the only SAN of any
// kind. The subject is ignored (the certificate gets none).
func checkCSR(data []byte, id identity.Identity) (crypto.PublicKey, error) {
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("PEM block %q, want CERTIFICATE REQUEST", block.Type)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("data after the CERTIFICATE REQUEST block")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	if err := checkKey(csr.PublicKey); err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("signature: %w", err)
	}
	if n := len(csr.DNSNames) + len(csr.EmailAddresses) + len(csr.IPAddresses); n != 0 {
		return nil, fmt.Errorf("%d SANs besides the SPIFFE ID (DNS %v, email %v, IP %v): only %s may be asked for", n, csr.DNSNames, csr.EmailAddresses, csr.IPAddresses, id)
	}
	if len(csr.URIs) != 1 || csr.URIs[0].String() != id.String() {
		var got []string
		for _, u := range csr.URIs {
			got = append(got, u.String())
		}
		return nil, fmt.Errorf("URI SANs %v, want exactly [%s]", got, id)
	}
	return csr.PublicKey, nil
}

// checkKey accepts what Istio's clients generate: ECDSA P-256 (ztunnel's
// default) or P-384, RSA of 2048 to 4096 bits.
func checkKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("ECDSA curve %s not accepted (P-256 or P-384)", k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if b := k.N.BitLen(); b < 2048 || b > 4096 {
			return fmt.Errorf("RSA key of %d bits not accepted (2048 to 4096)", b)
		}
	default:
		return fmt.Errorf("key type %T not accepted (ECDSA P-256/P-384 or RSA)", pub)
	}
	return nil
}

func pemCert(der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}
