package identity

import (
	"bytes"
	"cmp"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// File names of the two directory layouts LoadOrCreate understands.
const (
	CACertFile  = "ca.crt" // our layout: ca.crt + ca.key; cert-manager: the trust bundle
	CAKeyFile   = "ca.key"
	TLSCertFile = "tls.crt" // cert-manager secret layout: tls.crt + tls.key (+ ca.crt)
	TLSKeyFile  = "tls.key"
)

const (
	// DefaultLifetime is the workload certificate lifetime when Issue is
	// given zero.
	DefaultLifetime = 24 * time.Hour
	// backdate puts NotBefore in the past so that peers whose clocks run a
	// little behind still accept a freshly issued certificate.
	backdate = 5 * time.Minute
	// rootLifetime is the validity of a root created by LoadOrCreate.
	rootLifetime = 10 * 365 * 24 * time.Hour
)

// CA signs workload certificates. It holds the signing certificate and key,
// the intermediates between them and the root, and the trust bundle (the
// roots peers verify against). A CA is safe for concurrent use.
type CA struct {
	cert          *x509.Certificate
	key           crypto.Signer
	intermediates []*x509.Certificate // signing cert's chain up to, not including, the root
	roots         []*x509.Certificate
	pool          *x509.CertPool
}

// LoadOrCreate returns the CA kept in dir. If dir holds tls.crt and tls.key
// (a mounted cert-manager secret) it loads those; else if it holds ca.crt and
// ca.key it loads those; else, when neither file of our layout exists, it
// creates an ECDSA P-256 self-signed root there (key file mode 0600, written
// to temporary files and renamed into place so a crash never leaves a half
// written file). One of ca.crt/ca.key without the other is an error: a
// replaced key must never be silently paired with an old certificate.
func LoadOrCreate(dir string) (*CA, error) {
	if exists(filepath.Join(dir, TLSCertFile)) && exists(filepath.Join(dir, TLSKeyFile)) {
		return Load(filepath.Join(dir, TLSCertFile), filepath.Join(dir, TLSKeyFile))
	}
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	certOK, keyOK := exists(certPath), exists(keyPath)
	switch {
	case certOK && keyOK:
		return Load(certPath, keyPath)
	case certOK != keyOK:
		return nil, fmt.Errorf("load ca from %s: only one of %s and %s exists", dir, CACertFile, CAKeyFile)
	}
	return create(dir)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func create(dir string) (*CA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create ca dir %s: %w", dir, err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate ca key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"ambpf"}, CommonName: "ambpf mesh root CA"},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(rootLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("self-sign ca certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal ca key: %w", err)
	}
	// The key goes first: a crash between the two renames leaves a key
	// without a certificate, which LoadOrCreate reports instead of
	// overwriting.
	if err := writeAtomic(filepath.Join(dir, CAKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return nil, err
	}
	if err := writeAtomic(filepath.Join(dir, CACertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse new ca certificate: %w", err)
	}
	return newCA(cert, key, nil, []*x509.Certificate{cert})
}

// writeAtomic writes data to a temporary file in path's directory with mode
// perm, syncs it and renames it to path. It refuses to replace an existing
// file.
func writeAtomic(path string, data []byte, perm fs.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful link
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	// link(2) instead of rename(2): it fails if path exists, so two
	// processes creating the CA at once cannot overwrite each other.
	if err := os.Link(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// Load loads a signing CA. certFile holds the signing certificate in PEM,
// optionally followed by the certificates of its chain; keyFile holds its
// private key (PKCS#8, SEC 1 "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY").
// The trust bundle is the ca.crt beside certFile when certFile is not itself
// named ca.crt (the cert-manager secret layout tls.crt/tls.key/ca.crt);
// otherwise it is the self-signed certificate that ends the chain in
// certFile. Load checks that the key matches, that the certificate may sign
// certificates, and that it chains to the trust bundle.
func Load(certFile, keyFile string) (*CA, error) {
	certs, err := readCerts(certFile)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	if err := checkSigner(certs[0]); err != nil {
		return nil, fmt.Errorf("load ca: %s: %w", certFile, err)
	}
	key, err := readKey(keyFile)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	var roots []*x509.Certificate
	bundle := filepath.Join(filepath.Dir(certFile), CACertFile)
	if filepath.Base(certFile) != CACertFile && exists(bundle) {
		if roots, err = readCerts(bundle); err != nil {
			return nil, fmt.Errorf("load ca trust bundle: %w", err)
		}
	} else {
		last := certs[len(certs)-1]
		if !isSelfSigned(last) {
			return nil, fmt.Errorf("load ca: %s does not end in a self-signed root and there is no %s beside it", certFile, CACertFile)
		}
		roots = []*x509.Certificate{last}
	}
	// Intermediates are the chain minus any certificate that is a root.
	var inter []*x509.Certificate
	for _, c := range certs[1:] {
		if !containsCert(roots, c) {
			inter = append(inter, c)
		}
	}
	ca, err := newCA(certs[0], key, inter, roots)
	if err != nil {
		return nil, fmt.Errorf("load ca from %s and %s: %w", certFile, keyFile, err)
	}
	return ca, nil
}

func checkSigner(cert *x509.Certificate) error {
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return errors.New("certificate is not a CA (basic constraints)")
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return errors.New("certificate may not sign certificates (key usage)")
	}
	return nil
}

func newCA(cert *x509.Certificate, key crypto.Signer, inter, roots []*x509.Certificate) (*CA, error) {
	if err := checkSigner(cert); err != nil {
		return nil, err
	}
	if !publicKeyEqual(cert.PublicKey, key.Public()) {
		return nil, errors.New("private key does not match the certificate")
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	interPool := x509.NewCertPool()
	for _, c := range inter {
		interPool.AddCert(c)
	}
	if _, err := cert.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: interPool,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, fmt.Errorf("signing certificate does not chain to the trust bundle: %w", err)
	}
	return &CA{cert: cert, key: key, intermediates: inter, roots: roots, pool: pool}, nil
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

func isSelfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignatureFrom(c) == nil
}

func containsCert(list []*x509.Certificate, c *x509.Certificate) bool {
	for _, x := range list {
		if x.Equal(c) {
			return true
		}
	}
	return false
}

func readCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	certs, err := ParseCertificatesPEM(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs, nil
}

// ParseCertificatesPEM parses every CERTIFICATE block in data. It fails if
// there is none or if anything but certificates and whitespace is present.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q, want CERTIFICATE", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block")
	}
	if len(bytes.TrimSpace(data)) != 0 {
		return nil, errors.New("trailing data that is not PEM")
	}
	return certs, nil
}

func readKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM block", path)
	}
	var key any
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("%s: unexpected PEM block %q, want a private key", path, block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: parse %s: %w", path, block.Type, err)
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey, *rsa.PrivateKey:
		return k.(crypto.Signer), nil
	default:
		return nil, fmt.Errorf("%s: unsupported key type %T", path, key)
	}
}

func randomSerial() (*big.Int, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	return serial, nil
}

// validity is a new certificate's serial number and validity window: from
// backdate ago (clock skew) for lifetime, never past the CA's own expiry.
func (ca *CA) validity(lifetime time.Duration) (serial *big.Int, notBefore, notAfter time.Time, err error) {
	if serial, err = randomSerial(); err != nil {
		return nil, time.Time{}, time.Time{}, err
	}
	now := time.Now()
	notAfter = now.Add(lifetime)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	return serial, now.Add(-backdate), notAfter, nil
}

// Issue signs a workload certificate for id and the public key pub, valid
// from slightly in the past until now+lifetime (DefaultLifetime when zero),
// never beyond the signing certificate. It returns the leaf followed by the
// intermediates up to, not including, the root: what a TLS peer presents.
func (ca *CA) Issue(id Identity, pub crypto.PublicKey, lifetime time.Duration) ([]*x509.Certificate, error) {
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	if lifetime < 0 {
		return nil, fmt.Errorf("issue certificate for %s: negative lifetime %s", id, lifetime)
	}
	if lifetime == 0 {
		lifetime = DefaultLifetime
	}
	serial, notBefore, notAfter, err := ca.validity(lifetime)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		// An empty subject makes x509 mark the SAN extension critical, as
		// SPIFFE X.509-SVIDs require when the subject carries nothing.
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse certificate for %s: %w", id, err)
	}
	chain := []*x509.Certificate{leaf}
	if !containsCert(ca.roots, ca.cert) {
		chain = append(chain, ca.cert)
	}
	return append(chain, ca.intermediates...), nil
}

// IssueTLS generates a fresh ECDSA P-256 key and issues a certificate for
// it, returned ready for a tls.Config (Leaf set).
func (ca *CA) IssueTLS(id Identity, lifetime time.Duration) (*tls.Certificate, error) {
	return issueTLS(ca, id, lifetime)
}

// IssueKey implements Issuer: Issue for key's public key.
func (ca *CA) IssueKey(id Identity, key crypto.Signer, lifetime time.Duration) ([]*x509.Certificate, error) {
	return ca.Issue(id, key.Public(), lifetime)
}

func issueTLS(iss Issuer, id Identity, lifetime time.Duration) (*tls.Certificate, error) {
	// A fresh key for every certificate: a renewal also rotates the key.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key for %s: %w", id, err)
	}
	chain, err := iss.IssueKey(id, key, lifetime)
	if err != nil {
		return nil, err
	}
	tc := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, c := range chain {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return tc, nil
}

// IssueServing issues a TLS server certificate for the CA's own endpoint
// (a fresh ECDSA P-256 key; DNS names and IP addresses as SANs, no SPIFFE
// ID), chained like Issue's, valid for lifetime.
func (ca *CA) IssueServing(dnsNames []string, ips []net.IP, lifetime time.Duration) (*tls.Certificate, error) {
	if len(dnsNames) == 0 && len(ips) == 0 {
		return nil, errors.New("issue serving certificate: no name")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate serving key: %w", err)
	}
	serial, notBefore, notAfter, err := ca.validity(lifetime)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"ambpf"}, CommonName: cmp.Or(append(dnsNames, "ambpf-ca")...)},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              dnsNames,
		IPAddresses:           ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign serving certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse serving certificate: %w", err)
	}
	tc := &tls.Certificate{PrivateKey: key, Leaf: leaf, Certificate: [][]byte{der}}
	if !containsCert(ca.roots, ca.cert) {
		tc.Certificate = append(tc.Certificate, ca.cert.Raw)
	}
	for _, c := range ca.intermediates {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return tc, nil
}

// Roots returns the trust bundle as a pool. Callers must not modify it.
func (ca *CA) Roots() *x509.CertPool { return ca.pool }

// RootCertificates returns the trust bundle's certificates.
func (ca *CA) RootCertificates() []*x509.Certificate {
	return append([]*x509.Certificate(nil), ca.roots...)
}

// RootsPEM returns the trust bundle PEM encoded, as distributed to peers.
func (ca *CA) RootsPEM() []byte {
	var b bytes.Buffer
	for _, r := range ca.roots {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})
	}
	return b.Bytes()
}

// Certificate returns the signing certificate.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }
