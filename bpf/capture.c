// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * ambpf in-pod capture: the eBPF replacement for Istio ambient's in-pod
 * iptables rules. One instance of this object is loaded per pod; its maps are
 * that pod's state. Attach points (all inside the pod's network namespace,
 * except the cgroup program which sits on the pod's cgroup):
 *
 *   capture_egress   TC egress on eth0   classify what the pod sends
 *   capture_ingress  TC ingress on eth0  steer to the proxy with bpf_sk_assign
 *   dns_reply        TC egress on lo     give DNS replies their original source
 *   guard_mark       cgroup/setsockopt   only the proxy may carry the proxy mark
 *
 * Verdict policy: a packet that should reach the proxy but finds no proxy
 * socket is dropped, never passed on. That is what keeps the datapath closed
 * when the proxy is gone: nothing captured ever leaves in plaintext.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ambpf.h"

#define AF_INET 2
#define AF_INET6 10
#define SOL_SOCKET 1
#define SO_MARK 36
#define PAGE_SIZE 4096

#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_DEST 60

char __license[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} pod_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct counters);
} pod_counters SEC(".maps");

/*
 * TCP flows that go uncaptured, keyed as the pod sees them: flows open when
 * the datapath was attached (the loader records them; under iptables, NAT
 * likewise only touches new connections), and inbound flows let through by
 * bypass-inbound. Their packets leave directly; every other non-SYN packet
 * the pod sends must belong to a proxy socket.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow);
	__type(value, __u64);
} direct_flows SEC(".maps");

/* Original destinations of captured DNS traffic, for rewriting replies. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct dns_key);
	__type(value, struct dns_dest);
} dns_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pod_info);
} pod_meta SEC(".maps");

/* A parsed IPv4/IPv6 TCP or UDP packet. Ports and addresses in network order. */
struct pkt {
	struct addr saddr;
	struct addr daddr;
	__be16 sport;
	__be16 dport;
	__u16 l3_off;
	__u16 l4_off;
	__u8 family;
	__u8 proto;
	__u8 syn; /* SYN without ACK: the first packet of a connection */
};

/* flow_from_pod keys a packet's flow as the pod sees it, local end first. */
static __always_inline void flow_from_pod(struct flow *f, struct pkt *p, int outgoing)
{
	f->local = outgoing ? p->saddr : p->daddr;
	f->remote = outgoing ? p->daddr : p->saddr;
	f->local_port = outgoing ? p->sport : p->dport;
	f->remote_port = outgoing ? p->dport : p->sport;
	f->family = p->family;
}

static __always_inline struct counters *counters(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&pod_counters, &zero);
}

#define COUNT(field)                                                                               \
	do {                                                                                       \
		struct counters *c__ = counters();                                                 \
		if (c__)                                                                           \
			__sync_fetch_and_add(&c__->field, 1);                                      \
	} while (0)

static __always_inline __u32 config_flags(void)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&pod_config, &zero);
	return cfg ? cfg->flags : 0;
}

static __always_inline int parse_headers(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);

	if ((void *)(eth + 1) > end)
		return -1;
	p->l3_off = off;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + off;

		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return -1;
		/* Later fragments carry no L4 header: nothing to classify. */
		if (ip->frag_off & bpf_htons(0x1fff))
			return -1;
		p->family = AF_INET;
		p->proto = ip->protocol;
		__builtin_memcpy(p->saddr.b, &ip->saddr, 4);
		__builtin_memcpy(p->daddr.b, &ip->daddr, 4);
		off += ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;
		__u8 next;

		if ((void *)(ip6 + 1) > end)
			return -1;
		p->family = AF_INET6;
		__builtin_memcpy(p->saddr.b, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr.b, &ip6->daddr, 16);
		next = ip6->nexthdr;
		off += sizeof(*ip6);
		/*
		 * Walk the extension headers an app may add without privilege, so
		 * an option header cannot smuggle a connection past capture.
		 */
#pragma unroll
		for (int i = 0; i < 4; i++) {
			struct ipv6_opt_hdr *h;

			if (next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST)
				break;
			if (off > 512)
				return -1;
			h = data + off;
			if ((void *)(h + 1) > end)
				return -1;
			next = h->nexthdr;
			off += (h->hdrlen + 1) * 8;
		}
		p->proto = next;
	} else {
		return -1;
	}
	if (off > 1024)
		return -1;
	p->l4_off = off;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = data + off;

		if ((void *)(th + 1) > end)
			return -1;
		p->sport = th->source;
		p->dport = th->dest;
		p->syn = th->syn && !th->ack;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = data + off;

		if ((void *)(uh + 1) > end)
			return -1;
		p->sport = uh->source;
		p->dport = uh->dest;
		p->syn = 0;
	} else {
		p->sport = 0;
		p->dport = 0;
		p->syn = 0;
	}
	return 0;
}

/*
 * parse reads the headers, pulling them into the linear area first when the
 * packet arrived split (GSO, or a driver that left headers in frags).
 */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	__builtin_memset(p, 0, sizeof(*p));
	if (parse_headers(skb, p) == 0)
		return 0;
	if (bpf_skb_pull_data(skb, skb->len < 256 ? skb->len : 256))
		return -1;
	__builtin_memset(p, 0, sizeof(*p));
	return parse_headers(skb, p);
}

static __always_inline int is_probe_source(struct pkt *p, struct addr *a)
{
	/* 169.254.7.127 and fd16:9254:7127:1337:ffff:ffff:ffff:ffff */
	static const __u8 probe6[16] = {0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37,
					0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

	if (p->family == AF_INET)
		return a->b[0] == 169 && a->b[1] == 254 && a->b[2] == 7 && a->b[3] == 127;
#pragma unroll
	for (int i = 0; i < 16; i++)
		if (a->b[i] != probe6[i])
			return 0;
	return 1;
}

static __always_inline __u32 tuple_for(struct pkt *p, struct bpf_sock_tuple *t, __be16 sport,
				       __be16 dport, int with_source)
{
	__builtin_memset(t, 0, sizeof(*t));
	if (p->family == AF_INET) {
		if (with_source)
			__builtin_memcpy(&t->ipv4.saddr, p->saddr.b, 4);
		__builtin_memcpy(&t->ipv4.daddr, p->daddr.b, 4);
		t->ipv4.sport = sport;
		t->ipv4.dport = dport;
		return sizeof(t->ipv4);
	}
	if (with_source)
		__builtin_memcpy(t->ipv6.saddr, p->saddr.b, 16);
	__builtin_memcpy(t->ipv6.daddr, p->daddr.b, 16);
	t->ipv6.sport = sport;
	t->ipv6.dport = dport;
	return sizeof(t->ipv6);
}

/*
 * flow_socket returns a referenced socket that owns this packet's 4-tuple in
 * the pod (established, SYN_RECV request, or TIME_WAIT for a non-SYN), or
 * NULL. A listener answering only by port does not own a flow.
 */
static __always_inline struct bpf_sock *flow_socket(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_sock_tuple t;
	__u32 len = tuple_for(p, &t, p->sport, p->dport, 1);
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);

	if (!sk)
		return NULL;
	if (sk->state == BPF_TCP_LISTEN || (sk->state == BPF_TCP_TIME_WAIT && p->syn)) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

/* assign hands the packet to sk and releases it; a refusal drops the packet. */
static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk)
{
	long err = bpf_sk_assign(skb, sk, 0);

	bpf_sk_release(sk);
	if (err) {
		COUNT(assign_failed);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

/*
 * assign_listener hands a new connection to the proxy's listener on port,
 * found by port alone (source and destination left open, so a listener on
 * [::] or on the original destination both match). No listener: drop.
 */
static __always_inline int assign_listener(struct __sk_buff *skb, struct pkt *p, __u16 port)
{
	struct bpf_sock_tuple t;
	__u32 len = tuple_for(p, &t, 0, bpf_htons(port), 0);
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);

	if (!sk) {
		COUNT(dropped_no_listener);
		return TC_ACT_SHOT;
	}
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		COUNT(dropped_no_listener);
		return TC_ACT_SHOT;
	}
	return assign(skb, sk);
}

/*
 * Outbound, second half: the packet left the app, went through
 * capture_egress and was sent back into eth0 ingress. Its destination is not
 * local, so whatever it is assigned to, it also gets the local-route mark
 * for the policy rule (fwmark 0x111 lookup 100) to deliver it locally.
 */
static __always_inline int steer_outbound(struct __sk_buff *skb)
{
	struct bpf_sock *sk;
	struct pkt p;
	int verdict;

	/* Only our own redirect sets the mark, so this packet must parse. */
	if (parse(skb, &p) || p.proto != IPPROTO_TCP)
		return TC_ACT_SHOT;
	/* The L2 destination is the gateway's: make the stack take it as ours. */
	if (bpf_skb_change_type(skb, PACKET_HOST))
		return TC_ACT_SHOT;
	skb->mark = LOCAL_ROUTE_MARK;

	/*
	 * A proxy socket owns this flow: the app talking to the proxy's
	 * accepted socket, or the app answering a connection the proxy made to
	 * it from a client's address.
	 */
	sk = flow_socket(skb, &p);
	if (sk)
		return assign(skb, sk);
	if (!p.syn) {
		COUNT(dropped_no_flow);
		return TC_ACT_SHOT;
	}
	verdict = assign_listener(skb, &p, OUTBOUND_PORT);
	if (verdict == TC_ACT_OK)
		COUNT(captured_out);
	return verdict;
}

SEC("tc")
int capture_ingress(struct __sk_buff *skb)
{
	struct bpf_sock *sk;
	struct pkt p;
	int verdict;

	if (skb->mark == MARK_FROM_EGRESS)
		return steer_outbound(skb);

	if (parse(skb, &p) || p.proto != IPPROTO_TCP)
		return TC_ACT_OK;
	if (config_flags() & CFG_BYPASS_INBOUND) {
		if (p.syn) {
			/* Remember it, so the app's answers leave directly too. */
			struct flow f = {};

			flow_from_pod(&f, &p, 0);
			bpf_map_update_elem(&direct_flows, &f, &(__u64){1}, BPF_ANY);
			COUNT(bypassed);
		}
		return TC_ACT_OK;
	}
	if (is_probe_source(&p, &p.saddr)) {
		if (p.syn)
			COUNT(bypassed);
		return TC_ACT_OK;
	}
	if (p.dport == bpf_htons(HBONE_PORT)) {
		if (p.syn)
			COUNT(hbone_in);
		return TC_ACT_OK;
	}
	/* Packets of flows some socket here already owns go their way. */
	sk = flow_socket(skb, &p);
	if (sk) {
		bpf_sk_release(sk);
		return TC_ACT_OK;
	}
	verdict = assign_listener(skb, &p, INBOUND_PORT);
	if (verdict == TC_ACT_OK && p.syn)
		COUNT(captured_in);
	return verdict;
}

static __always_inline int rewrite_addr(struct __sk_buff *skb, struct pkt *p, int dest,
					struct addr *to, __be16 port, int l4_csum_flags)
{
	__u32 addr_off, port_off, csum_off;
	__be16 old_port = dest ? p->dport : p->sport;
	struct addr *from = dest ? &p->daddr : &p->saddr;

	if (p->family == AF_INET) {
		addr_off = p->l3_off + (dest ? offsetof(struct iphdr, daddr)
					     : offsetof(struct iphdr, saddr));
	} else {
		addr_off = p->l3_off + (dest ? offsetof(struct ipv6hdr, daddr)
					     : offsetof(struct ipv6hdr, saddr));
	}
	port_off = p->l4_off + (dest ? 2 : 0);
	csum_off = p->l4_off + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							: offsetof(struct udphdr, check));

	if (p->family == AF_INET) {
		__be32 o, n;

		__builtin_memcpy(&o, from->b, 4);
		__builtin_memcpy(&n, to->b, 4);
		if (bpf_l4_csum_replace(skb, csum_off, o, n, BPF_F_PSEUDO_HDR | 4 | l4_csum_flags))
			return -1;
		if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), o, n, 4))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &n, 4, 0))
			return -1;
	} else {
		__s64 diff = bpf_csum_diff((__be32 *)from->b, 16, (__be32 *)to->b, 16, 0);

		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | l4_csum_flags))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, to->b, 16, 0))
			return -1;
	}
	if (bpf_l4_csum_replace(skb, csum_off, old_port, port, 2 | l4_csum_flags))
		return -1;
	if (bpf_skb_store_bytes(skb, port_off, &port, 2, 0))
		return -1;
	return 0;
}

/*
 * dns_to_proxy sends a DNS query (UDP, or a packet of a TCP DNS connection)
 * to the proxy's resolver on the pod's loopback, 127.0.0.1:15053 or
 * [::1]:15053, the way Istio's REDIRECT does, and remembers the original
 * destination so dns_reply can restore it on the answers. The packet enters
 * lo directly, which needs accept_local and route_localnet on lo (set by the
 * loader): its source is the pod's own address and its destination loopback.
 */
static __always_inline int dns_to_proxy(struct __sk_buff *skb, struct pkt *p)
{
	struct dns_key key = {};
	struct dns_dest orig = {};
	struct addr lo = {};
	static const __u8 zero_mac[ETH_ALEN] = {};
	int csum_flags = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	key.app = p->saddr;
	key.app_port = p->sport;
	key.family = p->family;
	key.proto = p->proto;
	orig.addr = p->daddr;
	orig.port = p->dport;
	if (bpf_map_update_elem(&dns_nat, &key, &orig, BPF_ANY))
		return TC_ACT_SHOT;

	if (p->family == AF_INET) {
		lo.b[0] = 127;
		lo.b[3] = 1;
	} else {
		lo.b[15] = 1;
	}
	if (rewrite_addr(skb, p, 1, &lo, bpf_htons(DNS_PROXY_PORT), csum_flags))
		return TC_ACT_SHOT;
	/* lo's address is all zeroes: this makes the packet PACKET_HOST there. */
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), zero_mac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	if (p->proto == IPPROTO_UDP || p->syn)
		COUNT(captured_dns);
	return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

SEC("tc")
int capture_egress(struct __sk_buff *skb)
{
	struct flow f = {};
	struct pkt p;
	__u32 flags;

	if (parse(skb, &p))
		return TC_ACT_OK;
	if (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP)
		return TC_ACT_OK;
	/*
	 * The proxy's own sockets are never captured. The mark alone is not a
	 * credential: guard_mark keeps apps from setting it.
	 */
	if ((skb->mark & MARK_MASK) == PROXY_MARK) {
		if (p.syn)
			COUNT(bypassed);
		return TC_ACT_OK;
	}
	flags = config_flags();
	if ((flags & CFG_DNS_CAPTURE) && p.dport == bpf_htons(DNS_PORT))
		return dns_to_proxy(skb, &p);
	if (p.proto != IPPROTO_TCP)
		return TC_ACT_OK;
	/* Replies to kubelet probes. */
	if (is_probe_source(&p, &p.daddr))
		return TC_ACT_OK;
	flow_from_pod(&f, &p, 1);
	if (p.syn) {
		/* A new connection: whatever used this 4-tuple before is over. */
		bpf_map_delete_elem(&direct_flows, &f);
	} else if (bpf_map_lookup_elem(&direct_flows, &f)) {
		COUNT(direct);
		return TC_ACT_OK;
	}
	skb->mark = MARK_FROM_EGRESS;
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

SEC("tc")
int dns_reply(struct __sk_buff *skb)
{
	struct dns_key key = {};
	struct dns_dest *orig;
	struct pkt p;

	if (parse(skb, &p))
		return TC_ACT_OK;
	if ((p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP) ||
	    p.sport != bpf_htons(DNS_PROXY_PORT))
		return TC_ACT_OK;
	key.app = p.daddr;
	key.app_port = p.dport;
	key.family = p.family;
	key.proto = p.proto;
	orig = bpf_map_lookup_elem(&dns_nat, &key);
	if (!orig)
		return TC_ACT_OK;
	if (rewrite_addr(skb, &p, 0, &orig->addr, orig->port,
			 p.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/*
 * guard_mark refuses setsockopt(SO_MARK) with the proxy mark or the
 * local-route mark for every process in the pod's cgroup. The proxy runs in
 * its own cgroup, so it alone can mark sockets as "proxy traffic"; an app
 * holding CAP_NET_RAW or CAP_NET_ADMIN gets EPERM instead of leaving the mesh.
 */
SEC("cgroup/setsockopt")
int guard_mark(struct bpf_sockopt *ctx)
{
	__u32 *val;

	if (ctx->level != SOL_SOCKET || ctx->optname != SO_MARK) {
		/* Values beyond a page are not visible here: let the kernel use the original. */
		if (ctx->optlen > PAGE_SIZE)
			ctx->optlen = 0;
		return 1;
	}
	val = ctx->optval;
	if ((void *)(val + 1) > ctx->optval_end)
		return 1; /* too short: the kernel refuses it itself */
	if ((*val & MARK_MASK) == PROXY_MARK || (*val & MARK_MASK) == LOCAL_ROUTE_MARK) {
		COUNT(mark_refused);
		return 0;
	}
	return 1;
}
