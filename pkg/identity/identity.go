// Package identity is the mesh's workload identity: SPIFFE IDs of the form
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, a local
// certificate authority that signs workload certificates carrying them, and
// a rotating holder of one workload's current certificate.
package identity

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Scheme is the URI scheme of every SPIFFE ID.
const Scheme = "spiffe"

// Limits from the SPIFFE ID specification.
const (
	maxTrustDomainLen = 255
	maxIDLen          = 2048
)

// Identity names a Kubernetes workload: its trust domain, namespace and
// service account. The zero value is not a valid identity.
type Identity struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

// New builds an identity and validates it.
func New(trustDomain, namespace, serviceAccount string) (Identity, error) {
	id := Identity{TrustDomain: trustDomain, Namespace: namespace, ServiceAccount: serviceAccount}
	if err := id.Validate(); err != nil {
		return Identity{}, err
	}
	return id, nil
}

// Parse parses spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
// It is strict: any other path shape, a port, user info, query, fragment,
// percent-encoding, upper-case trust domain or character outside the SPIFFE
// character set is an error that says which part is wrong.
func Parse(s string) (Identity, error) {
	if s == "" {
		return Identity{}, errors.New("parse spiffe id: empty string")
	}
	if len(s) > maxIDLen {
		return Identity{}, fmt.Errorf("parse spiffe id: longer than %d bytes", maxIDLen)
	}
	prefix := Scheme + "://"
	if !strings.HasPrefix(s, prefix) {
		return Identity{}, fmt.Errorf("parse spiffe id %q: scheme must be %q", s, prefix)
	}
	rest := s[len(prefix):]
	td, path, ok := strings.Cut(rest, "/")
	if !ok {
		return Identity{}, fmt.Errorf("parse spiffe id %q: missing path /ns/<namespace>/sa/<service-account>", s)
	}
	if strings.ContainsAny(td, "@:") {
		return Identity{}, fmt.Errorf("parse spiffe id %q: trust domain must not contain user info or a port", s)
	}
	if strings.ContainsAny(path, "?#") {
		return Identity{}, fmt.Errorf("parse spiffe id %q: query and fragment are not allowed", s)
	}
	seg := strings.Split(path, "/")
	if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" {
		return Identity{}, fmt.Errorf("parse spiffe id %q: path must be /ns/<namespace>/sa/<service-account>", s)
	}
	id := Identity{TrustDomain: td, Namespace: seg[1], ServiceAccount: seg[3]}
	if err := id.Validate(); err != nil {
		return Identity{}, fmt.Errorf("parse spiffe id %q: %w", s, err)
	}
	return id, nil
}

// MustParse is Parse for constants in tests and examples; it panics on error.
func MustParse(s string) Identity {
	id, err := Parse(s)
	if err != nil {
		panic(err)
	}
	return id
}

// Validate reports whether every part is present and uses only the
// characters the SPIFFE specification allows (trust domain: a-z 0-9 . - _;
// path segments: a-z A-Z 0-9 . - _, and not "." or "..").
func (id Identity) Validate() error {
	if id.TrustDomain == "" {
		return errors.New("trust domain is empty")
	}
	if len(id.TrustDomain) > maxTrustDomainLen {
		return fmt.Errorf("trust domain longer than %d bytes", maxTrustDomainLen)
	}
	for _, c := range id.TrustDomain {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return fmt.Errorf("trust domain %q: character %q not allowed (only a-z 0-9 . - _)", id.TrustDomain, c)
		}
	}
	if err := validSegment("namespace", id.Namespace); err != nil {
		return err
	}
	return validSegment("service account", id.ServiceAccount)
}

func validSegment(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if s == "." || s == ".." {
		return fmt.Errorf("%s %q is a relative path segment", what, s)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return fmt.Errorf("%s %q: character %q not allowed (only a-z A-Z 0-9 . - _)", what, s, c)
		}
	}
	return nil
}

// String returns the SPIFFE ID URI, or "" for the zero Identity.
func (id Identity) String() string {
	if id == (Identity{}) {
		return ""
	}
	return Scheme + "://" + id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// IsZero reports whether id is the zero Identity.
func (id Identity) IsZero() bool { return id == (Identity{}) }

// URL returns the SPIFFE ID as a URL, the form x509 certificates carry.
func (id Identity) URL() *url.URL {
	return &url.URL{Scheme: Scheme, Host: id.TrustDomain, Path: "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount}
}

// MarshalText implements encoding.TextMarshaler.
func (id Identity) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler with Parse.
func (id *Identity) UnmarshalText(b []byte) error {
	v, err := Parse(string(b))
	if err != nil {
		return err
	}
	*id = v
	return nil
}

// FromCertificate returns the identity in cert's URI SANs. The certificate
// must carry exactly one spiffe:// URI SAN; zero or several is an error,
// because an ambiguous identity cannot be authorized.
func FromCertificate(cert *x509.Certificate) (Identity, error) {
	var found []string
	for _, u := range cert.URIs {
		if u.Scheme == Scheme {
			found = append(found, u.String())
		}
	}
	switch len(found) {
	case 0:
		return Identity{}, errors.New("certificate has no spiffe URI SAN")
	case 1:
		return Parse(found[0])
	default:
		return Identity{}, fmt.Errorf("certificate has %d spiffe URI SANs %v, want exactly one", len(found), found)
	}
}
