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
 * One instance is loaded per pod, on the pod's veth peer in the node's
 * network namespace. When pods hang off a bridge that peer is a bridge
 * port: its egress sees both what the node sends to the pod and what the
 * bridge forwards from other pods, and its ingress everything the pod sends.
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
 * Not translated: IPv4 fragments after the first, IPv6 with extension
 * headers before TCP, and ICMP errors about probe connections (they carry
 * the probe address inside and are not rewritten; TCP recovers by timeout).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ambpf.h"

#define AF_INET 2
#define AF_INET6 10

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

/* Per-interface counters, one entry, updated atomically. */
struct probe_counters {
	__u64 translated; /* SYNs of host connections given the probe source (retransmissions too) */
	__u64 replaced;	  /* entries of finished connections reused by a new host address */
	__u64 refused;	  /* SYNs dropped: a live host connection holds the same pod-side 4-tuple */
	__u64 not_local;  /* SYNs passed untouched: no socket on the packet (forwarded) */
	__u64 not_owned;  /* SYNs passed untouched: a socket, but no host socket owns the 4-tuple */
	__u64 restored;	  /* packets from the pod given back the host address */
};

/* probe_info.setup */
#define PROBE_SETUP_QDISC (1 << 0) /* the clsact qdisc was created by the loader */

/*
 * What the loader attached, one entry, written by the loader and read by
 * nobody in the kernel: a restarted agent or bpftool sees the attachment
 * with nothing but the pins.
 */
struct probe_info {
	char ifname[16];
	__u64 netns_dev;
	__u64 netns_ino;
	__u64 attached_unix_ns;
	__u32 ifindex;
	__u32 mode; /* MODE_TCX or MODE_CLSACT */
	__u32 setup;
	__u8 program_tag[8]; /* first bytes of the object's SHA-256 */
	__u8 pad[4];
};

/*
 * Translated connections. LRU: a connection idle long enough to be evicted
 * by newer ones loses its translation, and its next packets reach the pod
 * with the host address (and are refused there); 65536 entries is far more
 * than the probes a node keeps open to one pod.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct probe_key);
	__type(value, struct probe_orig);
} probe_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_counters);
} probe_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_info);
} probe_meta SEC(".maps");

#define COUNT(field)                                                                               \
	do {                                                                                       \
		__u32 zero__ = 0;                                                                  \
		struct probe_counters *c__ = bpf_map_lookup_elem(&probe_stats, &zero__);        \
		if (c__)                                                                           \
			__sync_fetch_and_add(&c__->field, 1);                                      \
	} while (0)

/* A parsed IPv4/IPv6 TCP packet; addresses and ports in network order. */
struct tcp_pkt {
	struct addr saddr;
	struct addr daddr;
	__be16 sport;
	__be16 dport;
	__u16 l3_off;
	__u16 l4_off;
	__u8 family;
	__u8 syn; /* SYN without ACK: the first packet of a connection */
	__u8 rst;
};

static const __u8 probe_v6[16] = {0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37,
				  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static __always_inline void probe_addr(struct addr *a, __u8 family)
{
	__builtin_memset(a, 0, sizeof(*a));
	if (family == AF_INET) {
		a->b[0] = 169;
		a->b[1] = 254;
		a->b[2] = 7;
		a->b[3] = 127;
		return;
	}
	__builtin_memcpy(a->b, probe_v6, 16);
}

static __always_inline int addr_eq(const struct addr *a, const struct addr *b)
{
	__u8 diff = 0;

	/* Byte by byte: struct addr has no alignment the verifier could rely on. */
#pragma unroll
	for (int i = 0; i < 16; i++)
		diff |= a->b[i] ^ b->b[i];
	return diff == 0;
}

static __always_inline int parse_tcp_headers(struct __sk_buff *skb, struct tcp_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct tcphdr *th;
	__u32 off = sizeof(*eth);

	if ((void *)(eth + 1) > end)
		return -1;
	p->l3_off = off;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + off;

		if ((void *)(ip + 1) > end || ip->ihl < 5 || ip->protocol != IPPROTO_TCP)
			return -1;
		if (ip->frag_off & bpf_htons(0x1fff))
			return -1;
		p->family = AF_INET;
		__builtin_memcpy(p->saddr.b, &ip->saddr, 4);
		__builtin_memcpy(p->daddr.b, &ip->daddr, 4);
		off += ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;

		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return -1;
		p->family = AF_INET6;
		__builtin_memcpy(p->saddr.b, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr.b, &ip6->daddr, 16);
		off += sizeof(*ip6);
	} else {
		return -1;
	}
	if (off > 128)
		return -1;
	p->l4_off = off;
	th = data + off;
	if ((void *)(th + 1) > end)
		return -1;
	p->sport = th->source;
	p->dport = th->dest;
	p->syn = th->syn && !th->ack;
	p->rst = th->rst;
	return 0;
}

/*
 * parse_tcp reads the headers of a TCP packet, pulling them into the linear
 * area first when they arrived split. Anything else gives -1.
 */
static __always_inline int parse_tcp(struct __sk_buff *skb, struct tcp_pkt *p)
{
	__builtin_memset(p, 0, sizeof(*p));
	if (parse_tcp_headers(skb, p) == 0)
		return 0;
	if (bpf_skb_pull_data(skb, skb->len < 128 ? skb->len : 128))
		return -1;
	__builtin_memset(p, 0, sizeof(*p));
	return parse_tcp_headers(skb, p);
}

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
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 len;
	int state;

	if (family == AF_INET) {
		__builtin_memcpy(&t.ipv4.saddr, pod->b, 4);
		__builtin_memcpy(&t.ipv4.daddr, host->b, 4);
		t.ipv4.sport = pod_port;
		t.ipv4.dport = host_port;
		len = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, pod->b, 16);
		__builtin_memcpy(t.ipv6.daddr, host->b, 16);
		t.ipv6.sport = pod_port;
		t.ipv6.dport = host_port;
		len = sizeof(t.ipv6);
	}
	sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	state = sk->state;
	bpf_sk_release(sk);
	return state == BPF_TCP_LISTEN ? -1 : state;
}

/*
 * set_addr rewrites the source (dest=0) or destination (dest=1) address
 * and updates the IPv4 header checksum and the TCP checksum (its pseudo
 * header) incrementally; ports are left alone.
 */
static __always_inline int set_addr(struct __sk_buff *skb, struct tcp_pkt *p, int dest,
				    const struct addr *to)
{
	const struct addr *from = dest ? &p->daddr : &p->saddr;
	__u32 csum_off = p->l4_off + offsetof(struct tcphdr, check);
	__u32 addr_off;
	__s64 diff;

	if (p->family == AF_INET) {
		__be32 o, n;

		addr_off = p->l3_off + (dest ? offsetof(struct iphdr, daddr)
					     : offsetof(struct iphdr, saddr));
		__builtin_memcpy(&o, from->b, 4);
		__builtin_memcpy(&n, to->b, 4);
		if (bpf_l4_csum_replace(skb, csum_off, o, n, BPF_F_PSEUDO_HDR | 4))
			return -1;
		if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), o, n, 4))
			return -1;
		return bpf_skb_store_bytes(skb, addr_off, &n, 4, 0) ? -1 : 0;
	}
	addr_off = p->l3_off + (dest ? offsetof(struct ipv6hdr, daddr)
				     : offsetof(struct ipv6hdr, saddr));
	diff = bpf_csum_diff((__be32 *)from->b, 16, (__be32 *)to->b, 16, 0);
	if (diff < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR))
		return -1;
	return bpf_skb_store_bytes(skb, addr_off, to->b, 16, 0) ? -1 : 0;
}

/*
 * start_translation decides on the SYN of a host connection. It returns
 * TC_ACT_SHOT when the pod-side 4-tuple is held by another live host
 * connection, else records this connection and returns TC_ACT_OK.
 */
static __always_inline int start_translation(struct __sk_buff *skb, struct tcp_pkt *p,
					     struct probe_key *key)
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
	struct probe_key key = {};
	struct probe_orig *orig;
	struct addr probe;
	struct tcp_pkt p;

	if (parse_tcp(skb, &p))
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
		if (start_translation(skb, &p, &key) != TC_ACT_OK)
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
	if (set_addr(skb, &p, 0, &probe))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("tc")
int probe_unsnat(struct __sk_buff *skb)
{
	struct probe_key key = {};
	struct probe_orig *orig;
	struct addr probe, host;
	struct tcp_pkt p;

	if (parse_tcp(skb, &p))
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
	if (set_addr(skb, &p, 1, &host))
		return TC_ACT_SHOT;
	COUNT(restored);
	return TC_ACT_OK;
}
