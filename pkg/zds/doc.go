// Package zds implements ZDS, the protocol between the node agent and the
// in-pod proxy, wire-compatible with Istio's istio-cni (agent) and
// ztunnel (proxy) so that either side can be swapped for Istio's.
//
// The transport is a SOCK_SEQPACKET unix socket (default DefaultPath)
// carrying one protobuf message per datagram, each smaller than
// MaxMessageSize bytes. The agent listens (Server), the proxy connects
// (Client) and says ZdsHello{V1}. The agent then sends its snapshot: an
// AddWorkload, with the pod's network namespace as one SCM_RIGHTS fd, for
// every pod whose netns it holds and a KeepWorkload for every pod it knows
// but cannot open, then SnapshotSent, at which the proxy tears down every
// pod not named. After that the agent sends AddWorkload and DelWorkload.
// Every request is answered with an Ack whose error text is empty on
// success and is the reason otherwise (a "nack").
//
// The schema is in zds.proto (package istio.workload.zds). The codec is
// hand-written with protowire and follows proto3 rules: unknown fields and
// known fields with an unexpected wire type are skipped, the last value of
// a scalar wins, a repeated message field is merged, strings must be UTF-8.
//
// Two fields are ambpf's, not Istio's, both in WorkloadInfo and far above
// Istio's field numbers. ambpf_fast_path (field 1000, a bool) is set by
// ambpf-agent when the in-pod fast path may redirect the pod's sockets.
// ambpf_reuseport (field 1001, the enum AmbpfReusePort) says whether the
// proxy may put SO_REUSEPORT on the pod's listeners, as the agent's probe
// of the kernel found: ambpf-agent always sends ALLOWED or REFUSED, and
// UNKNOWN, the zero value, means an agent that does not say (Istio's, an
// older ambpf-agent), for which the proxy decides by itself. Both are
// omitted at their zero values, so a WorkloadInfo without them is encoded
// byte for byte as Istio's, and Istio's side skips them as unknown fields.
package zds
