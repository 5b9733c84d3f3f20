package hbone

import (
	"net/netip"
	"regexp"
	"testing"
)

func TestForwardedRoundTrip(t *testing.T) {
	for _, s := range []string{"10.0.0.1:80", "[2001:db8::1]:443", "[fe80::1]:1"} {
		ap := netip.MustParseAddrPort(s)
		v := FormatForwarded(ap)
		if v != `for="`+s+`"` {
			t.Errorf("FormatForwarded(%s) = %s", s, v)
		}
		got, ok := ParseForwarded([]string{v})
		if !ok || got != ap {
			t.Errorf("ParseForwarded(%s) = %v, %v", v, got, ok)
		}
	}
}

func TestParseForwarded(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want string // "" = not ok
	}{
		{nil, ""},
		{[]string{`for=10.1.1.1`}, "10.1.1.1:0"},
		{[]string{`For="10.1.1.1:9"`}, "10.1.1.1:9"},
		{[]string{`proto=https;for="[::1]:9";by=x`}, "[::1]:9"},
		{[]string{`for="[2001:db8::2]"`}, "[2001:db8::2]:0"},
		{[]string{`for=10.0.0.1:1, for=10.0.0.2:2`}, "10.0.0.1:1"},
		{[]string{`for="[::ffff:10.0.0.3]:7"`}, "10.0.0.3:7"},
		{[]string{`for=unknown`}, ""},
		{[]string{`for=_hidden`}, ""},
		{[]string{`by=10.0.0.1`}, ""},
		{[]string{`for="10.0.0.1:99999"`}, ""},
		{[]string{`for="[fe80::1%eth0]:1"`}, ""}, // a zone is the sender's, never ours
	} {
		got, ok := ParseForwarded(tc.in)
		if tc.want == "" {
			if ok {
				t.Errorf("ParseForwarded(%q) = %v, want not ok", tc.in, got)
			}
			continue
		}
		if !ok || got.String() != tc.want {
			t.Errorf("ParseForwarded(%q) = %v, %v, want %s", tc.in, got, ok, tc.want)
		}
	}
}

func TestBaggage(t *testing.T) {
	if s := (Baggage{}).String(); s != "" {
		t.Fatalf("empty baggage = %q", s)
	}
	b := Baggage{ClusterName: "Kubernetes", Namespace: "ns", WorkloadKind: "StatefulSet", WorkloadName: "db", ServiceVersion: "a b;c%"}
	want := "k8s.cluster.name=Kubernetes,k8s.namespace.name=ns,k8s.statefulset.name=db,service.version=a%20b%3Bc%25"
	if s := b.String(); s != want {
		t.Fatalf("baggage = %q, want %q", s, want)
	}
}

func TestTraceparent(t *testing.T) {
	re := regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-00$`)
	seen := map[string]bool{}
	for range 100 {
		tp := NewTraceparent()
		if !re.MatchString(tp) {
			t.Fatalf("traceparent %q", tp)
		}
		if seen[tp] {
			t.Fatalf("repeated traceparent %q", tp)
		}
		seen[tp] = true
	}
}

// TestForwardedHost: the client names the Service it asked for as
// ztunnel does (outbound.rs build_forwarded: for="ip:port";host=name), and
// the server reads it back as ztunnel's parse_forwarded_host (quotes
// removed, for= still parsed).
func TestForwardedHost(t *testing.T) {
	ap := netip.MustParseAddrPort("10.0.0.1:4000")
	v := FormatForwarded(ap, "echo.ns.svc.cluster.local")
	if v != `for="10.0.0.1:4000";host=echo.ns.svc.cluster.local` {
		t.Fatalf("FormatForwarded = %s", v)
	}
	if h := ParseForwardedHost([]string{v}); h != "echo.ns.svc.cluster.local" {
		t.Errorf("ParseForwardedHost(%s) = %q", v, h)
	}
	if got, ok := ParseForwarded([]string{v}); !ok || got != ap {
		t.Errorf("ParseForwarded(%s) = %v, %v", v, got, ok)
	}
	for in, want := range map[string]string{
		`for="1.2.3.4:5"`:             "",
		`host="a.b";for="1.2.3.4:5"`:  "a.b",
		` Host = x `:                  "",
		`for=x; host=svc.ns.svc.corp`: "svc.ns.svc.corp",
	} {
		if h := ParseForwardedHost([]string{in}); h != want {
			t.Errorf("ParseForwardedHost(%q) = %q, want %q", in, h, want)
		}
	}
}

// TestParseBaggage: the members ztunnel writes (baggage.rs
// baggage_header_val, with region and zone) round-trip, the workload
// name is read under any of ztunnel's four kinds, empty values and
// unknown keys are ignored, and headers split over several values merge.
func TestParseBaggage(t *testing.T) {
	b := Baggage{ClusterName: "Kubernetes", Namespace: "ns", WorkloadKind: "pod", WorkloadName: "sleep",
		ServiceName: "sleep", ServiceVersion: "v 1", Region: "r1", Zone: "z1"}
	if got := ParseBaggage([]string{b.String()}); got != b {
		t.Errorf("round trip: %+v, want %+v", got, b)
	}
	if !regexp.MustCompile(`cloud\.region=r1,cloud\.availability_zone=z1$`).MatchString(b.String()) {
		t.Errorf("baggage %q lacks ztunnel's locality members", b.String())
	}
	got := ParseBaggage([]string{"k8s.deployment.name=web,service.name=", "k8s.namespace.name=prod,other=1,junk"})
	want := Baggage{WorkloadKind: "deployment", WorkloadName: "web", Namespace: "prod"}
	if got != want {
		t.Errorf("ParseBaggage = %+v, want %+v", got, want)
	}
}
