// Package meshconst holds the wire-level constants shared with Istio
// ambient mode: proxy ports, packet marks and the kubelet probe source
// addresses. They are defined here once so that the datapath, the proxy
// and the tests cannot drift apart.
package meshconst

import "net/netip"

// Proxy listener ports inside an enrolled pod.
const (
	// OutboundPort is the listener for TCP leaving the pod.
	OutboundPort = 15001
	// InboundPlaintextPort is the listener for plain TCP entering the pod.
	InboundPlaintextPort = 15006
	// InboundHBONEPort is the mTLS tunnel listener; it is never redirected.
	InboundHBONEPort = 15008
	// DNSPort is the proxy's DNS listener on 127.0.0.1 and ::1 (UDP and TCP).
	DNSPort = 15053
)

// Packet marks. Only the bits in MarkMask are owned by the mesh.
const (
	// ProxyMark is set by the proxy on every socket it opens in a pod;
	// traffic carrying it is never captured.
	ProxyMark uint32 = 0x539
	// LocalRouteMark asks the policy rule below to deliver a packet locally.
	LocalRouteMark uint32 = 0x111
	// MarkMask selects the mark bits the mesh uses.
	MarkMask uint32 = 0xfff
)

// Policy routing that delivers LocalRouteMark packets locally:
// "fwmark 0x111/0xfff pref 32764 lookup 100" with a "local 0.0.0.0/0 dev lo"
// (and "local ::/0 dev lo") route in table 100.
const (
	LocalRouteTable    = 100
	LocalRoutePriority = 32764
)

// Kubelet probe source addresses (SNAT'd on the host); connections from
// them are never captured.
var (
	ProbeSourceV4 = netip.MustParseAddr("169.254.7.127")
	ProbeSourceV6 = netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
)

// MigrateReqSysctl (under /proc/sys) makes a closing listener hand its
// queue (handshakes in flight, accepted connections not taken yet) to
// another listener of its SO_REUSEPORT group instead of resetting it
// (Linux 5.14; per network namespace): what lets a proxy rolling upgrade
// lose no queued connection. The agent and ambpf-cni set it in every
// enrolled pod.
const MigrateReqSysctl = "net/ipv4/tcp_migrate_req"
