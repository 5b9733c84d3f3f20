package hbone

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
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
// quotes because of the colon).
func FormatForwarded(client netip.AddrPort) string {
	return `for="` + client.String() + `"`
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
