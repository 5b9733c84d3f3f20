package identity

import (
	"crypto/x509"
	"net/url"
	"strings"
	"testing"
)

func TestParseRoundTrip(t *testing.T) {
	for _, s := range []string{
		"spiffe://cluster.local/ns/default/sa/default",
		"spiffe://example.org/ns/kube-system/sa/ztunnel",
		"spiffe://td_1/ns/a.b/sa/Some_SA-1",
	} {
		id, err := Parse(s)
		if err != nil {
			t.Fatalf("Parse(%q): %v", s, err)
		}
		if got := id.String(); got != s {
			t.Errorf("Parse(%q).String() = %q", s, got)
		}
		if got := id.URL().String(); got != s {
			t.Errorf("Parse(%q).URL() = %q", s, got)
		}
	}
	id := MustParse("spiffe://cluster.local/ns/foo/sa/bar")
	want := Identity{TrustDomain: "cluster.local", Namespace: "foo", ServiceAccount: "bar"}
	if id != want {
		t.Fatalf("got %+v, want %+v", id, want)
	}
}

func TestParseRejects(t *testing.T) {
	for _, tc := range []struct{ in, wantErr string }{
		{"", "empty string"},
		{"http://cluster.local/ns/a/sa/b", "scheme must be"},
		{"SPIFFE://cluster.local/ns/a/sa/b", "scheme must be"},
		{"spiffe://cluster.local", "missing path"},
		{"spiffe:///ns/a/sa/b", "trust domain is empty"},
		{"spiffe://Cluster.local/ns/a/sa/b", `character 'C' not allowed`},
		{"spiffe://cluster.local:443/ns/a/sa/b", "user info or a port"},
		{"spiffe://u@cluster.local/ns/a/sa/b", "user info or a port"},
		{"spiffe://cluster.local/ns/a/sa/b?x=1", "query and fragment"},
		{"spiffe://cluster.local/ns/a/sa/b#f", "query and fragment"},
		{"spiffe://cluster.local/ns/a/sa", "path must be"},
		{"spiffe://cluster.local/ns/a/sa/b/", "path must be"},
		{"spiffe://cluster.local/ns/a/sa/b/c", "path must be"},
		{"spiffe://cluster.local/sa/b/ns/a", "path must be"},
		{"spiffe://cluster.local/ns//sa/b", "namespace is empty"},
		{"spiffe://cluster.local/ns/a/sa/", "service account is empty"},
		{"spiffe://cluster.local/ns/../sa/b", "relative path segment"},
		{"spiffe://cluster.local/ns/a%20b/sa/b", `character '%' not allowed`},
		{"spiffe://cluster.local/ns/a/sa/b c", `character ' ' not allowed`},
		{"spiffe://" + strings.Repeat("a", 2100) + "/ns/a/sa/b", "longer than 2048"},
	} {
		_, err := Parse(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("Parse(%q) error = %v, want one containing %q", tc.in, err, tc.wantErr)
		}
	}
}

func TestTextMarshal(t *testing.T) {
	var id Identity
	if err := id.UnmarshalText([]byte("spiffe://td/ns/n/sa/s")); err != nil {
		t.Fatal(err)
	}
	b, _ := id.MarshalText()
	if string(b) != "spiffe://td/ns/n/sa/s" {
		t.Fatalf("MarshalText = %q", b)
	}
	if err := id.UnmarshalText([]byte("spiffe://td/ns/n")); err == nil {
		t.Fatal("UnmarshalText accepted a malformed id")
	}
	if (Identity{}).String() != "" || !(Identity{}).IsZero() {
		t.Fatal("zero Identity must print empty and report IsZero")
	}
}

func TestFromCertificate(t *testing.T) {
	u := func(s string) *url.URL {
		v, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	one := &x509.Certificate{URIs: []*url.URL{u("https://example.com/x"), u("spiffe://td/ns/a/sa/b")}}
	id, err := FromCertificate(one)
	if err != nil || id.String() != "spiffe://td/ns/a/sa/b" {
		t.Fatalf("FromCertificate = %v, %v", id, err)
	}
	if _, err := FromCertificate(&x509.Certificate{}); err == nil || !strings.Contains(err.Error(), "no spiffe URI SAN") {
		t.Fatalf("no SAN: err = %v", err)
	}
	two := &x509.Certificate{URIs: []*url.URL{u("spiffe://td/ns/a/sa/b"), u("spiffe://td/ns/a/sa/c")}}
	if _, err := FromCertificate(two); err == nil || !strings.Contains(err.Error(), "want exactly one") {
		t.Fatalf("two SANs: err = %v", err)
	}
}
