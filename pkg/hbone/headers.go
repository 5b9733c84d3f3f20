package hbone

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
)

// Header names HBONE uses.
const (
	HeaderForwarded   = "Forwarded"
	HeaderBaggage     = "Baggage"
	HeaderTraceparent = "Traceparent"
)

// FormatForwarded returns the Forwarded header value for a client address:
// for="ip:port", with an IPv6 address in brackets (RFC 7239 requires the
// quotes because of the colon); with a host, ";host=<host>" follows, as
// ztunnel writes the Service the client asked for (outbound.rs
// build_forwarded).
func FormatForwarded(client netip.AddrPort, host ...string) string {
	v := `for="` + client.String() + `"`
	if len(host) > 0 && host[0] != "" {
		v += ";host=" + host[0]
	}
	return v
}

// ParseForwardedHost returns the host= parameter of a Forwarded header
// (quotes removed), as ztunnel's parse_forwarded_host reads it: the
// Service the client says it connected to. It is a claim; the server
// uses it only to choose among the destination's own Services.
func ParseForwardedHost(values []string) string {
	if len(values) == 0 {
		return ""
	}
	for pair := range strings.SplitSeq(values[0], ";") {
		k, v, found := strings.Cut(strings.TrimSpace(pair), "=")
		if found && strings.EqualFold(k, "host") {
			return strings.TrimSuffix(strings.TrimPrefix(v, `"`), `"`)
		}
	}
	return ""
}

// ParseForwarded returns the address in the for= parameter of the first
// element of a Forwarded header: what the client claims is the original
// client. It is informational only (logs, diagnostics); the server never
// takes a source from it (see Request.SrcAddr). The port is
// optional; ok is false when the header has no usable for= address (absent,
// "unknown", an obfuscated identifier, malformed, or with an IPv6 zone).
func ParseForwarded(values []string) (addr netip.AddrPort, ok bool) {
	if len(values) == 0 {
		return netip.AddrPort{}, false
	}
	first, _, _ := strings.Cut(values[0], ",")
	for pair := range strings.SplitSeq(first, ";") {
		k, v, found := strings.Cut(strings.TrimSpace(pair), "=")
		if !found || !strings.EqualFold(k, "for") {
			continue
		}
		if uq, err := strconv.Unquote(v); err == nil {
			v = uq
		}
		// A zone names an interface of the sender's host: meaningless here,
		// and a zoned address matches no policy ipBlock, so it is refused.
		ap, err := netip.ParseAddrPort(v)
		if err != nil {
			// No port: a bare or bracketed address.
			a, aerr := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(v, "["), "]"))
			ap, err = netip.AddrPortFrom(a, 0), aerr
		}
		if err != nil || ap.Addr().Zone() != "" {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
	}
	return netip.AddrPort{}, false
}

// Baggage is what a source tells the destination about itself, carried in
// the W3C baggage header as ztunnel does. Empty fields are left out.
type Baggage struct {
	ClusterName    string // k8s.cluster.name
	Namespace      string // k8s.namespace.name
	WorkloadKind   string // the <kind> in k8s.<kind>.name, e.g. "deployment"
	WorkloadName   string // k8s.<kind>.name
	ServiceName    string // service.name
	ServiceVersion string // service.version
	Region         string // cloud.region
	Zone           string // cloud.availability_zone
}

// ParseBaggage reads the baggage header values as ztunnel's
// parse_baggage_header does: comma-separated key=value members, the
// workload name under any of k8s.deployment|cronjob|pod|job.name, empty
// values ignored, unknown keys skipped. Percent-encoded values are
// decoded.
func ParseBaggage(values []string) Baggage {
	var b Baggage
	for _, v := range values {
		for member := range strings.SplitSeq(v, ",") {
			k, val, ok := strings.Cut(strings.TrimSpace(member), "=")
			if !ok {
				continue
			}
			val, _, _ = strings.Cut(val, ";") // member properties
			if u, err := url.PathUnescape(strings.TrimSpace(val)); err == nil {
				val = u
			}
			if val == "" {
				continue
			}
			switch k {
			case "k8s.cluster.name":
				b.ClusterName = val
			case "k8s.namespace.name":
				b.Namespace = val
			case "k8s.deployment.name", "k8s.cronjob.name", "k8s.pod.name", "k8s.job.name":
				b.WorkloadKind = strings.TrimSuffix(strings.TrimPrefix(k, "k8s."), ".name")
				b.WorkloadName = val
			case "service.name":
				b.ServiceName = val
			case "service.version":
				b.ServiceVersion = val
			case "cloud.region":
				b.Region = val
			case "cloud.availability_zone":
				b.Zone = val
			}
		}
	}
	return b
}

// String encodes b as a baggage header value ("" when b is empty).
func (b Baggage) String() string {
	var parts []string
	add := func(k, v string) {
		if v != "" {
			parts = append(parts, k+"="+escapeBaggage(v))
		}
	}
	add("k8s.cluster.name", b.ClusterName)
	add("k8s.namespace.name", b.Namespace)
	if b.WorkloadKind != "" {
		add("k8s."+strings.ToLower(b.WorkloadKind)+".name", b.WorkloadName)
	}
	add("service.name", b.ServiceName)
	add("service.version", b.ServiceVersion)
	add("cloud.region", b.Region)
	add("cloud.availability_zone", b.Zone)
	return strings.Join(parts, ",")
}

// escapeBaggage percent-encodes every byte the W3C baggage grammar does not
// allow in a value, and '%' itself.
func escapeBaggage(v string) string {
	const hexDigits = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c > 0x20 && c < 0x7f && c != '"' && c != ',' && c != ';' && c != '\\' && c != '%' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&0xf])
	}
	return b.String()
}

// NewTraceparent returns a W3C traceparent with a random trace and parent
// ID and no sampling flag: 00-<32 hex>-<16 hex>-00.
func NewTraceparent() string {
	var id [24]byte
	for {
		rand.Read(id[:])
		// All-zero IDs are invalid; the chance is nil but the check is free.
		if !allZero(id[:16]) && !allZero(id[16:]) {
			break
		}
	}
	return "00-" + hex.EncodeToString(id[:16]) + "-" + hex.EncodeToString(id[16:]) + "-00"
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
