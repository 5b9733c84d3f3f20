//go:build linux

package bench

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"testing"

	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestSmoke runs every benchmark case for a handful of iterations and
// checks the harness, not the speed: connections succeed through each
// mechanism, the server sees the client's address, and with a capture the
// proxy (and, for ebpf, the datapath's counters) really saw every one.
func TestSmoke(t *testing.T) {
	requireRoot(t)
	const n = 5
	for _, dir := range []direction{outbound, inbound} {
		for _, m := range []string{mechNone, mechIPTables, mechEBPF} {
			t.Run(fmt.Sprintf("%s/%s", dir, m), func(t *testing.T) {
				t.Parallel()
				s := newScenario(t, m, dir)
				if err := s.connectLoop(n); err != nil {
					t.Fatal(err)
				}
				c, err := s.dial()
				if err != nil {
					t.Fatal(err)
				}
				out, in := message(), make([]byte, msgSize)
				for i := range n {
					if err := echo(c, out, in); err != nil {
						t.Fatalf("request %d: %v", i, err)
					}
				}
				c.Close()

				// n short connections and one long-lived one.
				const conns = n + 1
				want := map[netip.Addr]int{s.client.IPv4: conns}
				if got := s.server.Peers(); !maps.Equal(got, want) {
					t.Errorf("server saw peers %v, want %v", got, want)
				}
				if s.proxy == nil {
					return
				}
				caught := 0
				for _, o := range s.proxy.Observations() {
					if o.Listener != s.listenerPort() || !slices.Contains(s.dsts, o.OrigDst.String()) {
						t.Errorf("unexpected proxy observation %+v", o)
						continue
					}
					caught++
				}
				if caught != conns {
					t.Errorf("proxy listener %d caught %d connections, want %d", s.listenerPort(), caught, conns)
				}
				if e, ok := s.capture.(ebpfCapture); ok {
					st, err := e.l.Get(s.a.NSName)
					if err != nil {
						t.Fatal(err)
					}
					got := st.Counters.CapturedOut
					if dir == inbound {
						got = st.Counters.CapturedIn
					}
					if got < conns {
						t.Errorf("datapath counted %d captured %s connections, want >= %d (counters %+v)", got, dir, conns, st.Counters)
					}
				}
			})
		}
	}
	for _, m := range []string{mechIPTables, mechRestore, mechEBPF} {
		t.Run("enroll/"+m, func(t *testing.T) {
			t.Parallel()
			topo := nettest.NewTopology(t, 1)
			p := topo.Pod(0)
			c := newCapture(t, topo, m)
			for cycle := range 2 {
				if enrolled(t, c, p) {
					t.Fatalf("cycle %d: enrolled before Enroll", cycle)
				}
				if err := c.Enroll(p, nettest.CaptureOptions{}); err != nil {
					t.Fatalf("cycle %d: %v", cycle, err)
				}
				if !enrolled(t, c, p) {
					t.Fatalf("cycle %d: not enrolled after Enroll", cycle)
				}
				if err := c.Unenroll(p); err != nil {
					t.Fatalf("cycle %d: %v", cycle, err)
				}
			}
			if enrolled(t, c, p) {
				t.Fatal("still enrolled after Unenroll")
			}
		})
	}
}
