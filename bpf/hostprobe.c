// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * ambpf host-side probe SNAT: the eBPF replacement for the host iptables
 * rule with which Istio ambient gives connections from the node itself
 * (kubelet probes) to an enrolled pod the source 169.254.7.127
 * (fd16:9254:7127:1337:ffff:ffff:ffff:ffff). The in-pod programs let
 * connections from that address through uncaptured, so probes reach the app
 * directly, while traffic the node merely forwards from other pods keeps its
 * source and stays captured.
 *
 * One instance is loaded per node and attached to every enrolled pod's
 * veth peer in the node's network namespace. When pods hang off a bridge
 * that peer is a bridge port: its egress sees both what the node sends to
 * the pod and what the bridge forwards from other pods, and its ingress
 * everything the pod sends. The maps are node-wide: probe_nat's key (pod
 * address, pod port, host port, family) is unique on the node, and the
 * per-interface counters and meta are keyed by the interface's ifindex,
 * which is unique in the node's namespace and is skb->ifindex on both
 * hooks (the device a packet leaves by on egress, arrives on at ingress).
 *
 *   probe_snat     TC egress  (towards the pod)  host connections: source -> probe address
 *   probe_unsnat   TC ingress (from the pod)     their replies: probe address -> host address
 *
 * Which packets are the node's own: a connection is translated from its
 * first SYN when that SYN carries a socket (skb->sk; forwarded packets do
 * not: the socket is dropped when a packet crosses into another network
 * namespace) and a socket of the node's own namespace owns its 4-tuple (the
 * connecting socket in SYN_SENT). Later packets are translated when the
 * connection has an entry in probe_nat for this very host address and a
 * host socket still owns the 4-tuple. SYN-ACKs and RSTs the node sends on
 * connections a pod opened never start an entry, so they keep their source.
 * Connections open before attach have no entry and keep their source too
 * (as under iptables, where NAT only changes new connections).
 *
 * Port collisions: the translation keeps the host's source port, so two host
 * sockets with different addresses but the same source port, talking to the
 * same pod address and port, would become one 4-tuple in the pod. The first
 * one keeps it: a SYN of the second is dropped (counted as refused, the
 * socket retries and eventually fails) for as long as the first one's socket
 * is alive; once that socket is gone or in TIME_WAIT the entry is reused.
 *
 * Headers are parsed and rewritten by the helpers shared with capture.c
 * (include/pkt.h), so VLAN tags, IPv4 options and IPv6 extension header
 * chains are walked the same way on both sides. Not translated (passed as
 * they are: this program guards nothing): what pkt_parse cannot classify
 * (TCP fragments, longer chains) and ICMP errors about probe connections
 * (they carry the probe address inside and are not rewritten; TCP
 * recovers by timeout).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "ambpf.h"
#include "pkt.h"

char __license[] SEC("license") = "Dual MIT/GPL";

/* A host connection as the pod sees it once translated. */
struct probe_key {
	struct addr pod;  /* the pod's address: destination of the host's packets */
	__be16 pod_port;  /* the pod's port */
	__be16 host_port; /* the host socket's source port, kept by the translation */
	__u8 family;	  /* AF_INET or AF_INET6 */
	__u8 pad[3];
};

/* The host end behind a translated connection. */
struct probe_orig {
	struct addr host; /* the host socket's real source address */
};

/* Per-interface counters (probe_stats, by ifindex), updated atomically. */
struct probe_counters {
	__u64 translated; /* SYNs of host connections given the probe source (retransmissions too) */
	__u64 replaced;	  /* entries of finished connections reused by a new host address */
	__u64 refused;	  /* SYNs dropped: a live host connection holds the same pod-side 4-tuple */
	__u64 not_local;  /* SYNs passed untouched: no socket on the packet (forwarded) */
	__u64 not_owned;  /* SYNs passed untouched: a socket, but no host socket owns the 4-tuple */
	__u64 restored;	  /* packets from the pod given back the host address */
};

/* probe_info.setup: a set of these bits. */
enum probe_setup {
	PROBE_SETUP_QDISC = 1 << 0, /* the clsact qdisc was created by the loader */
};

/*
 * What the loader attached to one interface (probe_meta, by ifindex),
 * written by the loader and read by nobody in the kernel: a restarted
 * agent or bpftool sees the attachment with nothing but the pins.
 */
struct probe_info {
	char ifname[16];
	__u64 netns_dev;
	__u64 netns_ino;
	__u64 attached_unix_ns;
	__u32 ifindex;
	enum tc_mode mode;
	enum probe_setup setup;
	__u8 program_tag[8]; /* first bytes of the object's SHA-256 */
	__u8 pad[4];
};

/*
 * Which build runs on the node and the sizes its maps were made with, one
 * entry, written by the loader and read by nobody in the kernel.
 */
struct probe_node_info {
	__u8 program_tag[8]; /* first bytes of the object's SHA-256 */
	__u64 loaded_unix_ns;
	__u32 nat_entries;
	__u32 max_interfaces;
};

/*
 * Translated connections of the whole node. LRU: a connection idle long
 * enough to be evicted by newer ones loses its translation, and its next
 * packets reach the pod with the host address (and are refused there). The
 * loader sizes it (DEFAULT_PROBE_NAT entries unless configured): far more
 * than the probes a node keeps open to all its pods.
 */
#define DEFAULT_PROBE_NAT 65536
#define DEFAULT_PROBE_INTERFACES 1024

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DEFAULT_PROBE_NAT);
	__type(key, struct probe_key);
	__type(value, struct probe_orig);
} probe_nat SEC(".maps");

/*
 * Counters and meta by ifindex. Entries are written by the loader at attach
 * and deleted at detach; not preallocated, so memory follows the interfaces
 * attached, not the capacity.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_PROBE_INTERFACES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct probe_counters);
} probe_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_PROBE_INTERFACES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct probe_info);
} probe_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_node_info);
} probe_node SEC(".maps");

/*
 * COUNT counts under the interface the packet is on, ifindex (a local each
 * program reads from skb->ifindex first: an offset ctx access the compiler
 * might otherwise form late is refused by the verifier). COUNT_AT only adds
 * to an entry that exists, so a packet on an interface whose entry the
 * loader has not written yet (or already deleted) counts nothing.
 */
#define COUNT(field) COUNT_AT(probe_stats, ifindex, field)

/*
 * host_socket_state returns the TCP state of the socket of this (the
 * node's) network namespace that owns the connection between host and pod,
 * or -1 when none does. A listener, found when no connection matches, does
 * not own one. The lookup tuple is written as the node receives: the pod
 * is the remote end.
 */
static __always_inline int host_socket_state(struct __sk_buff *skb, __u8 family,
					     const struct addr *pod, __be16 pod_port,
					     const struct addr *host, __be16 host_port)
{
	struct bpf_sock_tuple t;
	__u32 len = sock_tuple(&t, family, pod, pod_port, host, host_port);
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	int state;

	if (!sk)
		return -1;
	state = sk->state;
	bpf_sk_release(sk);
	return state == BPF_TCP_LISTEN ? -1 : state;
}

/*
 * start_translation decides on the SYN of a host connection. It returns
 * TC_ACT_SHOT when the pod-side 4-tuple is held by another live host
 * connection, else records this connection and returns TC_ACT_OK.
 */
static __always_inline int start_translation(struct __sk_buff *skb, struct pkt *p,
					     struct probe_key *key, __u32 ifindex)
{
	struct probe_orig orig = {};
	struct probe_orig *prev = bpf_map_lookup_elem(&probe_nat, key);

	if (prev && !addr_eq(&prev->host, &p->saddr)) {
		int state = host_socket_state(skb, p->family, &p->daddr, p->dport, &prev->host,
					      p->sport);

		if (state >= 0 && state != BPF_TCP_TIME_WAIT && state != BPF_TCP_CLOSE) {
			COUNT(refused);
			return TC_ACT_SHOT;
		}
		COUNT(replaced);
	}
	orig.host = p->saddr;
	if (bpf_map_update_elem(&probe_nat, key, &orig, BPF_ANY))
		return TC_ACT_SHOT;
	COUNT(translated);
	return TC_ACT_OK;
}

SEC("tc")
int probe_snat(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct probe_key key = {};
	struct probe_orig *orig;
	struct addr probe;
	struct pkt p;

	if (pkt_parse(skb, &p) || p.proto != IPPROTO_TCP)
		return TC_ACT_OK;
	/*
	 * No socket: forwarded from another pod, never the node's own. It is
	 * the bulk of what a bridge port sends, so it goes before any lookup.
	 */
	if (!skb->sk) {
		if (p.syn)
			COUNT(not_local);
		return TC_ACT_OK;
	}
	key.pod = p.daddr;
	key.pod_port = p.dport;
	key.host_port = p.sport;
	key.family = p.family;

	if (p.syn) {
		if (host_socket_state(skb, p.family, &p.daddr, p.dport, &p.saddr, p.sport) < 0) {
			COUNT(not_owned);
			return TC_ACT_OK;
		}
		if (start_translation(skb, &p, &key, ifindex) != TC_ACT_OK)
			return TC_ACT_SHOT;
	} else {
		orig = bpf_map_lookup_elem(&probe_nat, &key);
		if (!orig || !addr_eq(&orig->host, &p.saddr))
			return TC_ACT_OK;
		/*
		 * A socket closed by an abort is unhashed before its RST goes
		 * out; every other packet must still have its host socket.
		 */
		if (!p.rst &&
		    host_socket_state(skb, p.family, &p.daddr, p.dport, &p.saddr, p.sport) < 0)
			return TC_ACT_OK;
	}
	probe_addr(&probe, p.family);
	if (addr_eq(&probe, &p.saddr))
		return TC_ACT_OK; /* a host socket bound to the probe address itself */
	if (pkt_set_addr(skb, &p, 0, &probe, 0))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("tc")
int probe_unsnat(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct probe_key key = {};
	struct probe_orig *orig;
	struct addr probe, host;
	struct pkt p;

	if (pkt_parse(skb, &p) || p.proto != IPPROTO_TCP)
		return TC_ACT_OK;
	probe_addr(&probe, p.family);
	if (!addr_eq(&probe, &p.daddr))
		return TC_ACT_OK;
	key.pod = p.saddr;
	key.pod_port = p.sport;
	key.host_port = p.dport;
	key.family = p.family;
	orig = bpf_map_lookup_elem(&probe_nat, &key);
	if (!orig || addr_eq(&orig->host, &probe))
		return TC_ACT_OK;
	/* Copy before rewriting: the map value may change under us. */
	host = orig->host;
	if (pkt_set_addr(skb, &p, 1, &host, 0))
		return TC_ACT_SHOT;
	COUNT(restored);
	return TC_ACT_OK;
}
