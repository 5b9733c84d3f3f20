//go:build linux

package proxy

import (
	"net/netip"
	"testing"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/hbone"
	"github.com/ambpf/ambpf/pkg/metrics"
)

// TestPeerLabelsFromBaggage: the inbound source labels are derived from
// the client's baggage first and the source workload, when discovery
// knows it, wins (ztunnel inbound.rs: with_derived_source, then
// with_source); source_app from baggage is the workload name, as
// ztunnel's with_derived_source sets it.
func TestPeerLabelsFromBaggage(t *testing.T) {
	store := discovery.NewStore()
	known := netip.MustParseAddr("10.0.0.7")
	store.Layer("t", 0).Set(discovery.Snapshot{Workloads: []discovery.Workload{{
		Name: "api-5d-x", Namespace: "shop", WorkloadName: "api", IPs: []netip.Addr{known},
		Labels: map[string]string{"app": "api", "version": "v3"}, Region: "r9", Zone: "z9",
	}}})
	pd := &pod{p: &Proxy{store: store}}
	bag := hbone.Baggage{ClusterName: "east", Namespace: "web", WorkloadKind: "pod", WorkloadName: "front",
		ServiceName: "frontend", ServiceVersion: "v1", Region: "r1", Zone: "z1"}
	const id = "spiffe://cluster.local/ns/web/sa/front"

	var l metrics.Labels
	pd.peerLabels(&l, netip.MustParseAddr("10.9.9.9"), id, bag)
	want := metrics.Labels{
		SourceWorkload: "front", SourceWorkloadNamespace: "web", SourceCanonicalService: "frontend", SourceCanonicalRevision: "v1",
		SourceApp: "front", SourceVersion: "v1", SourceCluster: "east", SourceRegion: "r1", SourceZone: "z1",
		SourcePrincipal: id, ConnectionSecurityPolicy: metrics.SecurityMutualTLS,
	}
	if l != want {
		t.Errorf("unknown source, from baggage:\n got %+v\nwant %+v", l, want)
	}

	l = metrics.Labels{}
	pd.peerLabels(&l, known, id, bag)
	want = metrics.Labels{
		SourceWorkload: "api", SourceWorkloadNamespace: "shop", SourcePod: "api-5d-x", SourceCanonicalService: "api", SourceCanonicalRevision: "v3",
		SourceApp: "api", SourceVersion: "v3", SourceRegion: "r9", SourceZone: "z9",
		SourcePrincipal: id, ConnectionSecurityPolicy: metrics.SecurityMutualTLS,
	}
	if l != want {
		t.Errorf("known source wins over baggage:\n got %+v\nwant %+v", l, want)
	}
}
