//go:build linux

package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/hbone"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestHBONESourceIsTCPPeer: a mesh client (a valid certificate of the
// mesh CA, in pod0) that writes someone else's address into Forwarded
// for= gets neither past policy nor shown to the app. An ALLOW policy
// keyed on the claimed IP refuses it; one keyed on its real IP admits it,
// and the app sees the real IP.
func TestHBONESourceIsTCPPeer(t *testing.T) {
	const allowFrom = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-ip, namespace: ns-b}
spec:
  rules:
  - from:
    - source:
        ipBlocks: ["{{ip}}"]
`
	e := newEnv(t, envOptions{pods: 3})
	uidB := e.enroll(1, "ns-b", "sa-b")
	e.app(1, "b")
	real := e.lab.Pod(0).IPv4

	src, err := identity.NewSource(identity.SourceConfig{Identity: identity.MustParse("spiffe://cluster.local/ns/ns-a/sa/sa-a"), Issuer: e.p.CA()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	pod0 := e.lab.Pod(0)
	cl, err := hbone.NewClient(hbone.ClientConfig{
		TLS: hbone.TLSConfig{Credentials: src, Roots: e.p.CA().Roots},
		Dial: func(ctx context.Context, _ netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			return pod0.Dial(ctx, "tcp", dst.String())
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	dst := netip.AddrPortFrom(e.lab.Pod(1).IPv4, nettest.AppPort)
	dial := func(claimed netip.Addr) (*nettest.TCPConn, error) {
		return nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) {
			return cl.Dial(ctx, hbone.Target{
				Addr: netip.AddrPortFrom(dst.Addr(), hbone.Port), Authority: dst,
				ExpectedIdentities: []identity.Identity{identity.MustParse("spiffe://cluster.local/ns/ns-b/sa/sa-b")},
				SourceAddr:         netip.AddrPortFrom(claimed, 4242),
			})
		})
	}
	setPolicy := func(ip netip.Addr) {
		e.writeDiscovery(strings.ReplaceAll(allowFrom, "{{ip}}", ip.String()))
		waitFor(t, "policy keyed on "+ip.String()+" loaded", func() bool {
			w, ok := e.p.Store().WorkloadByUID(uidB)
			if !ok {
				return false
			}
			ps := e.p.Store().PoliciesFor(w)
			return len(ps) == 1 && ps[0].Spec.Rules[0].From[0].Source.IPBlocks[0] == ip.String()
		})
	}

	for _, claimed := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), e.lab.Pod(2).IPv4} {
		t.Run("claims "+claimed.String(), func(t *testing.T) {
			// Allowed only from the claimed IP: the claim must not count.
			setPolicy(claimed)
			if c, err := dial(claimed); err == nil {
				c.Close()
				t.Fatalf("policy allowing only %s let in a client at %s that claims it (greeting %q)", claimed, real, c.Greeting)
			} else if se := (*hbone.StatusError)(nil); !errors.As(err, &se) || se.Code != 401 {
				t.Fatalf("dial with a spoofed Forwarded: %v, want a 401 refusal", err)
			}
			// Allowed only from the real IP: admitted, and the app sees it.
			setPolicy(real)
			c, err := dial(claimed)
			if err != nil {
				t.Fatalf("policy allowing %s refused the client at %s: %v", real, real, err)
			}
			defer c.Close()
			if want := "app b peer=" + real.String(); c.Greeting != want {
				t.Fatalf("app greeting %q, want %q (the app must see the TCP peer, not Forwarded)", c.Greeting, want)
			}
			if err := c.Echo("hello"); err != nil {
				t.Fatal(err)
			}
		})
	}
}
