/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * Packet helpers shared by the ambpf TC programs (capture.c, hostprobe.c):
 * header parsing, address comparison, socket lookup tuples, and address and
 * port rewrites with incremental checksum updates. Each program keeps only
 * its own policy. Everything is static __always_inline, loops are bounded
 * and unrolled, and only helpers present in kernel 5.10 are used.
 *
 * Include after <linux/bpf.h>, <bpf/bpf_helpers.h> and "ambpf.h".
 */
#ifndef AMBPF_PKT_H
#define AMBPF_PKT_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_DEST 60

/* At most this many IPv6 extension headers are walked before L4. */
#define PKT_MAX_EXT_HDRS 4
/* Headers are pulled into the linear area up to this many bytes. */
#define PKT_PULL_LEN 256

/*
 * COUNT_IN adds one to a field of the single entry of a counters array
 * map, atomically (several CPUs run a program at once). The value type
 * comes from the map's BTF definition (__type(value, ...)).
 */
#define COUNT_IN(map, field)                                                                       \
	do {                                                                                       \
		__u32 zero__ = 0;                                                                  \
		typeof((map).value) c__ = bpf_map_lookup_elem(&(map), &zero__);                    \
		if (c__)                                                                           \
			__sync_fetch_and_add(&c__->field, 1);                                      \
	} while (0)

/* A parsed IPv4/IPv6 packet. Ports and addresses in network order. */
struct pkt {
	struct addr saddr;
	struct addr daddr;
	__be16 sport; /* TCP/UDP only, else 0 */
	__be16 dport; /* TCP/UDP only, else 0 */
	__u16 l3_off;
	__u16 l4_off;
	__u8 family; /* AF_INET or AF_INET6 */
	__u8 proto;  /* the L4 protocol, after any IPv6 extension headers */
	__u8 syn;    /* TCP SYN without ACK: the first packet of a connection */
	__u8 rst;    /* TCP RST */
};

static __always_inline int pkt_parse_headers(struct __sk_buff *skb, struct pkt *p)
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
		/* Later fragments carry no L4 header: nothing to look at. */
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
		 * an option header cannot smuggle a connection past a program.
		 */
#pragma unroll
		for (int i = 0; i < PKT_MAX_EXT_HDRS; i++) {
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
	/* Keeps the offset small enough for the verifier to track. */
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
		p->rst = th->rst;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = data + off;

		if ((void *)(uh + 1) > end)
			return -1;
		p->sport = uh->source;
		p->dport = uh->dest;
	}
	return 0;
}

/*
 * pkt_parse reads the headers of an Ethernet IPv4/IPv6 packet into p,
 * pulling them into the linear area first when the packet arrived split
 * (GSO, or a driver that left headers in frags). It returns 0, or -1 for
 * anything else, for later IPv4 fragments and for truncated headers. Ports,
 * syn and rst are set for TCP (and ports for UDP); other protocols parse
 * with them zero.
 */
static __always_inline int pkt_parse(struct __sk_buff *skb, struct pkt *p)
{
	__builtin_memset(p, 0, sizeof(*p));
	if (pkt_parse_headers(skb, p) == 0)
		return 0;
	if (bpf_skb_pull_data(skb, skb->len < PKT_PULL_LEN ? skb->len : PKT_PULL_LEN))
		return -1;
	__builtin_memset(p, 0, sizeof(*p));
	return pkt_parse_headers(skb, p);
}

/* addr_eq compares two addresses of the same family (unused bytes zero). */
static __always_inline int addr_eq(const struct addr *a, const struct addr *b)
{
	__u8 diff = 0;

	/* Byte by byte: struct addr has no alignment the verifier could rely on. */
#pragma unroll
	for (int i = 0; i < 16; i++)
		diff |= a->b[i] ^ b->b[i];
	return diff == 0;
}

/*
 * probe_addr sets a to Istio's kubelet-probe source of the family:
 * 169.254.7.127 or fd16:9254:7127:1337:ffff:ffff:ffff:ffff.
 */
static __always_inline void probe_addr(struct addr *a, __u8 family)
{
	static const __u8 probe6[16] = {0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37,
					0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

	__builtin_memset(a, 0, sizeof(*a));
	if (family == AF_INET) {
		a->b[0] = 169;
		a->b[1] = 254;
		a->b[2] = 7;
		a->b[3] = 127;
		return;
	}
	__builtin_memcpy(a->b, probe6, 16);
}

/* is_probe_addr reports whether a is the probe source of the family. */
static __always_inline int is_probe_addr(const struct addr *a, __u8 family)
{
	struct addr probe;

	probe_addr(&probe, family);
	return addr_eq(&probe, a);
}

/*
 * sock_tuple fills a socket lookup tuple and returns its length for
 * bpf_sk*_lookup_*. A NULL src leaves the source address zero (any), as
 * a listener lookup by destination port wants.
 */
static __always_inline __u32 sock_tuple(struct bpf_sock_tuple *t, __u8 family,
					const struct addr *src, __be16 sport,
					const struct addr *dst, __be16 dport)
{
	__builtin_memset(t, 0, sizeof(*t));
	if (family == AF_INET) {
		if (src)
			__builtin_memcpy(&t->ipv4.saddr, src->b, 4);
		__builtin_memcpy(&t->ipv4.daddr, dst->b, 4);
		t->ipv4.sport = sport;
		t->ipv4.dport = dport;
		return sizeof(t->ipv4);
	}
	if (src)
		__builtin_memcpy(t->ipv6.saddr, src->b, 16);
	__builtin_memcpy(t->ipv6.daddr, dst->b, 16);
	t->ipv6.sport = sport;
	t->ipv6.dport = dport;
	return sizeof(t->ipv6);
}

/* The L4 checksum's offset in a parsed TCP or UDP packet. */
static __always_inline __u32 pkt_l4_csum_off(const struct pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
						    : offsetof(struct udphdr, check));
}

/*
 * pkt_set_addr rewrites the source (dest=0) or destination (dest=1) address
 * of a parsed TCP or UDP packet, updating the IPv4 header checksum and the
 * L4 checksum (its pseudo header) incrementally. l4_csum_flags is OR-ed into
 * the L4 updates: BPF_F_MARK_MANGLED_0 for UDP, whose zero checksum means
 * "none". p keeps the old address. Returns 0 or -1.
 */
static __always_inline int pkt_set_addr(struct __sk_buff *skb, const struct pkt *p, int dest,
					const struct addr *to, int l4_csum_flags)
{
	const struct addr *from = dest ? &p->daddr : &p->saddr;
	__u32 csum_off = pkt_l4_csum_off(p);
	__u32 addr_off;
	__s64 diff;

	if (p->family == AF_INET) {
		__be32 o, n;

		addr_off = p->l3_off + (dest ? offsetof(struct iphdr, daddr)
					     : offsetof(struct iphdr, saddr));
		__builtin_memcpy(&o, from->b, 4);
		__builtin_memcpy(&n, to->b, 4);
		if (bpf_l4_csum_replace(skb, csum_off, o, n, BPF_F_PSEUDO_HDR | 4 | l4_csum_flags))
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
	if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | l4_csum_flags))
		return -1;
	return bpf_skb_store_bytes(skb, addr_off, to->b, 16, 0) ? -1 : 0;
}

/*
 * pkt_set_port rewrites the source (dest=0) or destination (dest=1) port of
 * a parsed TCP or UDP packet and updates its L4 checksum incrementally
 * (l4_csum_flags as for pkt_set_addr). Returns 0 or -1.
 */
static __always_inline int pkt_set_port(struct __sk_buff *skb, const struct pkt *p, int dest,
					__be16 to, int l4_csum_flags)
{
	__be16 from = dest ? p->dport : p->sport;
	/* TCP and UDP keep their ports at the same offsets. */
	__u32 port_off = p->l4_off + (dest ? offsetof(struct tcphdr, dest)
					   : offsetof(struct tcphdr, source));

	if (bpf_l4_csum_replace(skb, pkt_l4_csum_off(p), from, to, 2 | l4_csum_flags))
		return -1;
	return bpf_skb_store_bytes(skb, port_off, &to, 2, 0) ? -1 : 0;
}

#endif
