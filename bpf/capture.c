// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * ambpf in-pod capture: the eBPF replacement for Istio ambient's in-pod
 * iptables rules. One instance of this object is loaded per node and serves
 * every pod: a pod's devices carry its entry programs (bpf/podentry.c),
 * which put the pod's index in cb[POD_CB] and tail-call these through the
 * node's capture_progs array. Every map here is node-wide and keyed by that
 * index (arrays) or carries it in its key (flows, DNS). Programs:
 *
 *   capture_egress   TC egress on eth0   classify what the pod sends
 *   capture_ingress  TC ingress on eth0  steer to the proxy with bpf_sk_assign
 *   dns_reply        TC egress on lo     give DNS replies their original source
 *
 * proxy_cgroups is pinned by name at the loader's root; the loader pins the
 * others in <root>/node/.
 *
 * Verdict policy: a packet that should reach the proxy but finds no proxy
 * socket is dropped, never passed on. That is what keeps the datapath closed
 * when the proxy is gone: nothing captured ever leaves in plaintext.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>

#include "ambpf.h"
#include "pkt.h"

char __license[] SEC("license") = "Dual MIT/GPL";

/* Per-pod options, by pod index. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_MAX_PODS);
	__type(key, __u32);
	__type(value, struct config);
} pod_config SEC(".maps");

/* Per-pod counters, by pod index; the pods' mark guards count here too. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_MAX_PODS);
	__type(key, __u32);
	__type(value, struct counters);
} pod_counters SEC(".maps");

/*
 * TCP flows that go uncaptured, keyed as the pod sees them: flows open when
 * the datapath was attached (the loader records them; under iptables, NAT
 * likewise only touches new connections), and inbound flows let through by
 * bypass-inbound. Their packets leave directly; every other non-SYN packet
 * the pod sends must belong to a proxy socket, or it is dropped.
 *
 * Design (docs/ARCHITECTURE.md, "Flows open before attach"):
 *   - direct_flows is a plain HASH, not an LRU: nothing the network sends
 *     can evict a live flow. Only established flows are in it: the loader's
 *     attach-time flows, and bypassed inbound flows once the pod has
 *     answered past the handshake. When it is full, a new bypassed flow is
 *     not recorded and its packets are dropped (direct_full): a flood costs
 *     new connections, never a live one.
 *   - inbound_pending, a small LRU, holds bypassed inbound SYNs until the
 *     pod answers past its SYN-ACK. A SYN flood churns only this map.
 *   - Each entry expires: DIRECT_IDLE_NS after the pod last sent in it,
 *     DIRECT_CLOSING_NS once both sides sent FIN, at once on an RST the pod
 *     sends or an RST from the peer that its socket will accept (exact
 *     sequence number, RFC 5961; a blind RST with another seq changes
 *     nothing). A SYN the pod sends, or an inbound SYN no socket owns the
 *     4-tuple of, deletes the old entry, so a stale entry never carries a
 *     new connection. Expired entries are deleted when found, and by the
 *     loader's sweep (Loader.ExpireFlows), which keeps the map from filling
 *     with flows that ended silently.
 */
#define DIRECT_IDLE_NS (24ULL * 3600 * 1000000000)
#define DIRECT_CLOSING_NS (60ULL * 1000000000)
#define DIRECT_PENDING_NS (30ULL * 1000000000)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_DIRECT_FLOWS);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory follows the flows, not the size */
	__type(key, struct flow);
	__type(value, struct direct_flow);
} direct_flows SEC(".maps");

/* Bypassed inbound SYNs, until the pod's side of the handshake is done; value: expiry (ns). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DEFAULT_INBOUND_PENDING);
	__type(key, struct flow);
	__type(value, __u64);
} inbound_pending SEC(".maps");

/* Original destinations of captured DNS traffic, for rewriting replies. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DEFAULT_DNS_NAT);
	__type(key, struct dns_key);
	__type(value, struct dns_dest);
} dns_nat SEC(".maps");

/* What the loader attached for each pod, by pod index (userspace only). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_MAX_PODS);
	__type(key, __u32);
	__type(value, struct pod_info);
} pod_meta SEC(".maps");

/* Which build these programs are (userspace only). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_info);
} node_meta SEC(".maps");

/*
 * The cgroups (v2 ids) of the proxy processes, written by the node agent for
 * every process connected to its ZDS socket. A socket's cgroup is fixed by
 * the kernel when the socket is created, so an app cannot claim it the way
 * it can claim the proxy mark (CAP_NET_RAW, the 32-bit setsockopt ABI that
 * cgroup/setsockopt programs never see, a socket marked before enrolment).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, struct proxy_cgroup);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} proxy_cgroups SEC(".maps");

/*
 * direct_delete deletes a flow of direct_flows and keeps its pod's count
 * of entries (counters.direct_entries) right: only a delete that removed
 * something counts, so two CPUs deleting the same flow count it once.
 */
static __always_inline void direct_delete(struct flow *f)
{
	struct counters *c;
	__u32 pod = f->pod;

	if (bpf_map_delete_elem(&direct_flows, f))
		return;
	c = bpf_map_lookup_elem(&pod_counters, &pod);
	if (c)
		__sync_fetch_and_add(&c->direct_entries, -1);
}

/* pod_of is the index of the pod the packet belongs to, set by its entry program. */
static __always_inline __u32 pod_of(struct __sk_buff *skb)
{
	return skb->cb[POD_CB];
}

/* flow_from_pod keys a packet's flow as the pod sees it, local end first. */
static __always_inline void flow_from_pod(struct flow *f, struct __sk_buff *skb, struct pkt *p, int outgoing)
{
	f->pod = pod_of(skb);
	f->local = outgoing ? p->saddr : p->daddr;
	f->remote = outgoing ? p->daddr : p->saddr;
	f->local_port = outgoing ? p->sport : p->dport;
	f->remote_port = outgoing ? p->dport : p->sport;
	f->family = p->family;
}

#define COUNT(skb, field) COUNT_AT(pod_counters, pod_of(skb), field)

static __always_inline __u32 config_flags(struct __sk_buff *skb)
{
	__u32 pod = pod_of(skb);
	struct config *cfg = bpf_map_lookup_elem(&pod_config, &pod);
	return cfg ? cfg->flags : 0;
}

/*
 * flow_socket returns a referenced socket that owns this packet's 4-tuple in
 * the pod (established, SYN_RECV request, or TIME_WAIT for a non-SYN), or
 * NULL. A listener answering only by port does not own a flow.
 */
static __always_inline struct bpf_sock *flow_socket(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_sock_tuple t;
	__u32 len = sock_tuple(&t, p->family, &p->saddr, p->sport, &p->daddr, p->dport);
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);

	if (!sk)
		return NULL;
	if (sk->state == BPF_TCP_LISTEN || (sk->state == BPF_TCP_TIME_WAIT && p->syn)) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

/*
 * flow_owned reports whether a socket in the pod owns the 4-tuple of an
 * inbound packet: any state but TIME_WAIT (a listener answering by port
 * owns no flow).
 */
static __always_inline int flow_owned(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_sock_tuple t;
	__u32 len = sock_tuple(&t, p->family, &p->saddr, p->sport, &p->daddr, p->dport);
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	int owned;

	if (!sk)
		return 0;
	owned = sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT;
	bpf_sk_release(sk);
	return owned;
}

/*
 * rst_accepted reports whether the pod's socket will accept an inbound
 * RST: its sequence number is exactly the next one expected (RFC 5961;
 * any other one only draws a challenge ACK), or no socket owns the flow.
 */
static __always_inline int rst_accepted(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_sock_tuple t;
	__u32 len = sock_tuple(&t, p->family, &p->saddr, p->sport, &p->daddr, p->dport);
	struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	struct bpf_tcp_sock *tp;
	int accepted = 1;

	if (!sk)
		return 1;
	tp = bpf_tcp_sock(sk);
	if (tp && sk->state != BPF_TCP_LISTEN)
		accepted = bpf_ntohl(p->seq) == tp->rcv_nxt;
	bpf_sk_release(sk);
	return accepted;
}

/*
 * direct_inbound_end follows the FIN and RST the peer sends in a direct
 * flow: a flow both sides closed expires shortly, one the peer reset (in a
 * way the pod's socket accepts), at once.
 */
static __always_inline void direct_inbound_end(struct __sk_buff *skb, struct pkt *p)
{
	struct flow f = {};
	struct direct_flow *d;

	if (!p->fin && !p->rst)
		return;
	flow_from_pod(&f, skb, p, 0);
	d = bpf_map_lookup_elem(&direct_flows, &f);
	if (!d)
		return;
	if (p->rst) {
		if (rst_accepted(skb, p))
			direct_delete(&f);
		return;
	}
	d->fin_in = 1;
	if (d->fin_out)
		d->expires_ns = bpf_ktime_get_ns() + DIRECT_CLOSING_NS;
}

/*
 * direct_outbound reports whether a non-SYN packet the pod sends belongs to
 * a direct flow, and keeps the flow's entry: refreshed, closing after both
 * FINs, deleted on the pod's RST or when found expired. With bypass-inbound,
 * a bypassed inbound flow moves from inbound_pending to direct_flows on the
 * first packet after the pod's SYN-ACK. Captured flows pay one lookup (two
 * with bypass-inbound) per packet.
 */
static __always_inline int direct_outbound(struct __sk_buff *skb, struct pkt *p, struct flow *f, __u32 flags)
{
	struct direct_flow *d = bpf_map_lookup_elem(&direct_flows, f);
	__u64 *pending, now;

	if (d) {
		now = bpf_ktime_get_ns();
		if (d->expires_ns < now) {
			direct_delete(f);
			return 0;
		}
		if (p->rst) {
			direct_delete(f);
			return 1;
		}
		if (p->fin)
			d->fin_out = 1;
		d->expires_ns = now + (d->fin_out && d->fin_in ? DIRECT_CLOSING_NS : DIRECT_IDLE_NS);
		return 1;
	}
	if (!(flags & CFG_BYPASS_INBOUND))
		return 0;
	pending = bpf_map_lookup_elem(&inbound_pending, f);
	if (!pending)
		return 0;
	now = bpf_ktime_get_ns();
	if (*pending < now) {
		bpf_map_delete_elem(&inbound_pending, f);
		return 0;
	}
	if (p->synack)
		return 1;
	bpf_map_delete_elem(&inbound_pending, f);
	if (!p->rst) {
		struct direct_flow n = {
			.expires_ns = now + DIRECT_IDLE_NS,
			.origin = DIRECT_INBOUND,
			.fin_out = p->fin,
		};
		__u32 pod = f->pod;
		struct config *cfg = bpf_map_lookup_elem(&pod_config, &pod);
		struct counters *c = bpf_map_lookup_elem(&pod_counters, &pod);

		/*
		 * The map is the node's: a pod's share is bounded, so a flood of
		 * connections to one pod cannot take other pods' room. (Two CPUs
		 * may pass the check together: the bound holds within a few.)
		 */
		if (!cfg || !c || c->direct_entries + cfg->direct_adjust >= (__s64)cfg->direct_max ||
		    bpf_map_update_elem(&direct_flows, f, &n, BPF_NOEXIST)) {
			COUNT(skb, direct_full);
			return 0;
		}
		__sync_fetch_and_add(&c->direct_entries, 1);
	}
	return 1;
}

/*
 * parse_failed is the verdict for a packet pkt_parse did not return PKT_OK
 * for: what is not IP passes, what may be TCP but cannot be classified is
 * dropped, never passed uncaptured.
 */
static __always_inline int parse_failed(struct __sk_buff *skb, int res)
{
	if (res == PKT_PASS)
		return TC_ACT_OK;
	COUNT(skb, dropped_unparsed);
	return TC_ACT_SHOT;
}

/* assign hands the packet to sk and releases it; a refusal drops the packet. */
static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk)
{
	long err = bpf_sk_assign(skb, sk, 0);

	bpf_sk_release(sk);
	if (err) {
		COUNT(skb, assign_failed);
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
	__u32 len = sock_tuple(&t, p->family, NULL, 0, &p->daddr, bpf_htons(port));
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);

	if (!sk) {
		COUNT(skb, dropped_no_listener);
		return TC_ACT_SHOT;
	}
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		COUNT(skb, dropped_no_listener);
		return TC_ACT_SHOT;
	}
	return assign(skb, sk);
}

/*
 * from_proxy decides whether a packet carrying the proxy mark really is the
 * proxy's: its socket belongs to a proxy cgroup. One more kind may leave on
 * the mark alone: a TCP segment with neither SYN nor payload that no socket
 * in the pod owns as a captured flow. Those are the proxy's TIME_WAIT ACKs
 * and the kernel's RSTs, which have no full socket of the proxy's (cgroup
 * id 0, or the netns's control socket) but carry the mark of the socket
 * they answer for. Such a segment opens no connection and carries no data,
 * so a forged mark gains nothing from it; a bare segment of a captured flow
 * still goes to the proxy's socket, keeping the forging app's own
 * connection intact.
 */
static __always_inline int from_proxy(struct __sk_buff *skb, struct pkt *p)
{
	__u64 cg = bpf_skb_cgroup_id(skb);
	struct bpf_sock *sk;
	__u8 doff;

	if (cg && bpf_map_lookup_elem(&proxy_cgroups, &cg))
		return 1;
	if (p->proto != IPPROTO_TCP || p->syn)
		return 0;
	/* Data offset: the high nibble of byte 12 of the TCP header. */
	if (bpf_skb_load_bytes(skb, p->l4_off + 12, &doff, 1))
		return 0;
	if (skb->len != (__u32)p->l4_off + (doff >> 4) * 4)
		return 0;
	sk = flow_socket(skb, p);
	if (sk) {
		bpf_sk_release(sk);
		return 0;
	}
	return 1;
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
	if (pkt_parse(skb, &p) || p.proto != IPPROTO_TCP)
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
		COUNT(skb, dropped_no_flow);
		return TC_ACT_SHOT;
	}
	verdict = assign_listener(skb, &p, OUTBOUND_PORT);
	if (verdict == TC_ACT_OK)
		COUNT(skb, captured_out);
	return verdict;
}

SEC("tc")
int capture_ingress(struct __sk_buff *skb)
{
	struct bpf_sock *sk;
	struct pkt p;
	__u32 bypass;
	int verdict;

	if (skb->mark == MARK_FROM_EGRESS)
		return steer_outbound(skb);

	verdict = pkt_parse(skb, &p);
	if (verdict != PKT_OK)
		return parse_failed(skb, verdict);
	if (p.proto != IPPROTO_TCP)
		return TC_ACT_OK;
	direct_inbound_end(skb, &p);
	bypass = config_flags(skb) & CFG_BYPASS_INBOUND;
	if (p.syn) {
		struct flow f = {};

		flow_from_pod(&f, skb, &p, 0);
		/*
		 * A new connection on the 4-tuple of a direct flow no socket
		 * owns any more: that flow is over. (A SYN into a live flow only
		 * draws a challenge ACK from its socket and changes nothing.)
		 */
		if (bpf_map_lookup_elem(&direct_flows, &f) && !flow_owned(skb, &p))
			direct_delete(&f);
		if (bypass) {
			/* Remember it, so the app's answers leave directly too. */
			__u64 expires = bpf_ktime_get_ns() + DIRECT_PENDING_NS;

			bpf_map_update_elem(&inbound_pending, &f, &expires, BPF_ANY);
			COUNT(skb, bypassed);
		}
	}
	if (bypass)
		return TC_ACT_OK;
	if (is_probe_addr(&p.saddr, p.family)) {
		if (p.syn)
			COUNT(skb, bypassed);
		return TC_ACT_OK;
	}
	if (p.dport == bpf_htons(HBONE_PORT)) {
		if (p.syn)
			COUNT(skb, hbone_in);
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
		COUNT(skb, captured_in);
	return verdict;
}

/* rewrite_addr rewrites the source (dest=0) or destination (dest=1) address and port. */
static __always_inline int rewrite_addr(struct __sk_buff *skb, struct pkt *p, int dest,
					struct addr *to, __be16 port, int l4_csum_flags)
{
	if (pkt_set_addr(skb, p, dest, to, l4_csum_flags))
		return -1;
	return pkt_set_port(skb, p, dest, port, l4_csum_flags);
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

	/*
	 * The first fragment of a query: its later fragments (no ports) would
	 * still go to the original server. Dropped, like what cannot be parsed.
	 */
	if (p->frag) {
		COUNT(skb, dropped_unparsed);
		return TC_ACT_SHOT;
	}
	key.pod = pod_of(skb);
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
		COUNT(skb, captured_dns);
	return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

SEC("tc")
int capture_egress(struct __sk_buff *skb)
{
	struct flow f = {};
	struct pkt p;
	__u32 flags;
	int res;

	res = pkt_parse(skb, &p);
	if (res != PKT_OK)
		return parse_failed(skb, res);
	if (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP)
		return TC_ACT_OK;
	/*
	 * The proxy's own sockets are never captured. The mark says "proxy",
	 * as in Istio, but is not a credential: the socket's cgroup is
	 * (from_proxy). A marked packet from anywhere else is captured like
	 * any other.
	 */
	if ((skb->mark & MARK_MASK) == PROXY_MARK) {
		if (from_proxy(skb, &p)) {
			if (p.syn)
				COUNT(skb, bypassed);
			return TC_ACT_OK;
		}
		if (p.syn)
			COUNT(skb, mark_untrusted);
	}
	flags = config_flags(skb);
	if ((flags & CFG_DNS_CAPTURE) && p.dport == bpf_htons(DNS_PORT))
		return dns_to_proxy(skb, &p);
	if (p.proto != IPPROTO_TCP)
		return TC_ACT_OK;
	/* Replies to kubelet probes. */
	if (is_probe_addr(&p.daddr, p.family))
		return TC_ACT_OK;
	flow_from_pod(&f, skb, &p, 1);
	if (p.syn) {
		/* A new connection: whatever used this 4-tuple before is over. */
		direct_delete(&f);
		if (flags & CFG_BYPASS_INBOUND)
			bpf_map_delete_elem(&inbound_pending, &f);
	} else if (direct_outbound(skb, &p, &f, flags)) {
		COUNT(skb, direct);
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

	if (pkt_parse(skb, &p))
		return TC_ACT_OK;
	if ((p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP) ||
	    p.sport != bpf_htons(DNS_PROXY_PORT))
		return TC_ACT_OK;
	key.pod = pod_of(skb);
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
