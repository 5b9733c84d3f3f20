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
// One field is ambpf's, not Istio's: WorkloadInfo.ambpf_fast_path (field
// 1000), set by ambpf-agent when the in-pod fast path may redirect the
// pod's sockets. It is omitted when false, so ambpf-agent's messages
// without the fast path are Istio's byte for byte, and Istio's side skips
// it as an unknown field.
package zds
