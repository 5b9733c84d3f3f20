package discovery

import (
	"net/netip"
	"testing"
)

// TestInboundService: the Service an inbound connection is reported
// under is chosen as ztunnel's guess_inbound_service: the client's
// Forwarded host when it names one of the pod's Services, else the
// first Service (by namespace/name) whose target port is the connection's
// (the endpoint's own port map included); a host naming another Service
// is ignored.
func TestInboundService(t *testing.T) {
	s := NewStore()
	ip := netip.MustParseAddr("10.0.0.5")
	s.Layer("t", 0).Set(Snapshot{
		Workloads: []Workload{{Name: "web-1", Namespace: "ns", IPs: []netip.Addr{ip}, Labels: map[string]string{"app": "web"}}},
		Services: []Service{
			{Name: "b-web", Namespace: "ns", Ports: map[uint16]uint16{80: 8080}, Selector: map[string]string{"app": "web"}},
			{Name: "a-web", Namespace: "ns", Ports: map[uint16]uint16{80: 8080}, Selector: map[string]string{"app": "web"}},
			{Name: "admin", Namespace: "ns", Ports: map[uint16]uint16{9000: 0}, Endpoints: []Endpoint{{IP: ip, Ports: map[uint16]uint16{9000: 9901}}}},
			{Name: "other", Namespace: "ns", Ports: map[uint16]uint16{80: 8080}},
		},
	})
	for _, tc := range []struct {
		host string
		port uint16
		want string
	}{
		{"", 8080, "a-web"},
		{"b-web.ns.svc.cluster.local", 8080, "b-web"},
		{"other.ns.svc.cluster.local", 8080, "a-web"}, // not a Service of this pod
		{"", 9901, "admin"},                           // the endpoint's own target port
		{"", 7000, ""},
	} {
		svc, ok := s.InboundService(ip, tc.host, tc.port)
		got := ""
		if ok {
			got = svc.Name
		}
		if got != tc.want {
			t.Errorf("InboundService(%q, %d) = %q, want %q", tc.host, tc.port, got, tc.want)
		}
	}
}
