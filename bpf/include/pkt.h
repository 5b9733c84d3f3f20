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

/* IPv6 extension headers (include/net/ipv6.h), walked to find L4. */
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60
#define NEXTHDR_MOBILITY 135
#define NEXTHDR_HIP 139
#define NEXTHDR_SHIM6 140
#define NEXTHDR_EXP1 253
#define NEXTHDR_EXP2 254

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define IP6_MF 0x0001
#define IP6_OFFSET 0xfff8

/*
 * Bounds of the parser. An IPv6 extension header is at most 2 KiB (a
 * segment routing header of 255 units), so the L4 header is found up to
 * 8 of them deep wherever it is; a longer chain, or more VLAN tags, is
 * PKT_DROP. The loops are unrolled, so any kernel's verifier (5.10 on)
 * sees straight-line code.
 */
#define PKT_MAX_EXT_HDRS 8
#define PKT_MAX_VLAN 2

/* pkt_parse results. */
#define PKT_OK 0    /* parsed: family, addresses, proto (and ports for TCP/UDP) are set */
#define PKT_PASS 1  /* not IPv4 or IPv6 (ARP, LLDP, ...): no program here classifies it */
#define PKT_DROP -1 /* may carry TCP, but cannot be classified: see pkt_parse */

/* pkt.frag */
#define PKT_FRAG_FIRST 1 /* the first fragment of a fragmented datagram: L4 header present */
#define PKT_FRAG_LATER 2 /* a later fragment: no L4 header, ports zero */

/*
 * COUNT_AT adds one to a field of entry key of a counters map (array or u32-keyed
 * hash: no entry, no count), atomically (CPUs run it at once). The value type comes
 * from the map's BTF definition (__type(value, ...)). COUNT_IN is the same
 * for a map of a single entry.
 */
#define COUNT_AT(map, key, field)                                                                  \
	do {                                                                                       \
		__u32 key__ = (key);                                                               \
		typeof((map).value) c__ = bpf_map_lookup_elem(&(map), &key__);                     \
		if (c__)                                                                           \
			__sync_fetch_and_add(&c__->field, 1);                                      \
	} while (0)

#define COUNT_IN(map, field) COUNT_AT(map, 0, field)

/* A parsed IPv4/IPv6 packet. Ports, addresses and seq in network order. */
struct pkt {
	struct addr saddr;
	struct addr daddr;
	__be16 sport; /* TCP/UDP only, else 0 */
	__be16 dport; /* TCP/UDP only, else 0 */
	__be32 seq;   /* TCP only */
	__u16 l3_off;
	__u16 l4_off;
	__u8 family; /* AF_INET or AF_INET6 */
	__u8 proto;  /* the L4 protocol, after any IPv6 extension headers */
	__u8 frag;   /* 0, PKT_FRAG_FIRST or PKT_FRAG_LATER (then never TCP) */
	__u8 syn;    /* TCP SYN without ACK: the first packet of a connection */
	__u8 synack; /* TCP SYN with ACK: the answer to it */
	__u8 rst;    /* TCP RST */
	__u8 fin;    /* TCP FIN */
	__u8 pad;
};

/* ipv6_ext_hdr reports whether next names an IPv6 extension header. */
static __always_inline int ipv6_ext_hdr(__u8 next)
{
	switch (next) {
	case NEXTHDR_HOP:
	case NEXTHDR_ROUTING:
	case NEXTHDR_FRAGMENT:
	case NEXTHDR_AUTH:
	case NEXTHDR_DEST:
	case NEXTHDR_MOBILITY:
	case NEXTHDR_HIP:
	case NEXTHDR_SHIM6:
	case NEXTHDR_EXP1:
	case NEXTHDR_EXP2:
		return 1;
	}
	return 0;
}

/* pkt_parse_l4 reads the TCP or UDP header at off (p->proto says which). */
static __always_inline int pkt_parse_l4(struct __sk_buff *skb, struct pkt *p, __u32 off)
{
	p->l4_off = off;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr th;

		/*
		 * A fragment's TCP header may be cut anywhere (tiny fragments put
		 * the flags into the second one), and reassembly in the stack
		 * drops the socket bpf_sk_assign gave it: no TCP fragment can be
		 * captured, so none is classified.
		 */
		if (p->frag)
			return PKT_DROP;
		if (bpf_skb_load_bytes(skb, off, &th, sizeof(th)))
			return PKT_DROP;
		p->sport = th.source;
		p->dport = th.dest;
		p->seq = th.seq;
		p->syn = th.syn && !th.ack;
		p->synack = th.syn && th.ack;
		p->rst = th.rst;
		p->fin = th.fin;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr uh;

		if (bpf_skb_load_bytes(skb, off, &uh, sizeof(uh)))
			return PKT_DROP;
		p->sport = uh.source;
		p->dport = uh.dest;
	}
	return PKT_OK;
}

static __always_inline int pkt_parse_ipv4(struct __sk_buff *skb, struct pkt *p, __u32 off)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) || ip.ihl < 5)
		return PKT_DROP;
	p->family = AF_INET;
	p->proto = ip.protocol;
	__builtin_memcpy(p->saddr.b, &ip.saddr, 4);
	__builtin_memcpy(p->daddr.b, &ip.daddr, 4);
	if (ip.frag_off & bpf_htons(IP_OFFSET)) {
		/* A later fragment: no L4 header, nothing to match it to a flow by. */
		p->frag = PKT_FRAG_LATER;
		return ip.protocol == IPPROTO_TCP ? PKT_DROP : PKT_OK;
	}
	if (ip.frag_off & bpf_htons(IP_MF))
		p->frag = PKT_FRAG_FIRST;
	/* IHL > 5: options (an app may set them with IP_OPTIONS) come first. */
	return pkt_parse_l4(skb, p, off + ip.ihl * 4);
}

static __always_inline int pkt_parse_ipv6(struct __sk_buff *skb, struct pkt *p, __u32 off)
{
	struct ipv6hdr ip6;
	__u8 next;

	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
		return PKT_DROP;
	p->family = AF_INET6;
	__builtin_memcpy(p->saddr.b, &ip6.saddr, 16);
	__builtin_memcpy(p->daddr.b, &ip6.daddr, 16);
	next = ip6.nexthdr;
	off += sizeof(ip6);
	/*
	 * Walk the extension headers, whatever their kind: an app adds
	 * hop-by-hop, destination options and routing headers (type 4, segment
	 * routing, too) with setsockopt, some of them without any privilege.
	 */
#pragma unroll
	for (int i = 0; i < PKT_MAX_EXT_HDRS; i++) {
		struct ipv6_opt_hdr h;

		if (!ipv6_ext_hdr(next))
			break;
		if (next == NEXTHDR_FRAGMENT) {
			struct frag_hdr {
				__u8 nexthdr;
				__u8 reserved;
				__be16 frag_off;
				__be32 identification;
			} fh;

			if (bpf_skb_load_bytes(skb, off, &fh, sizeof(fh)))
				return PKT_DROP;
			if (fh.frag_off & bpf_htons(IP6_OFFSET)) {
				/* A later fragment: what follows is not a header. */
				p->frag = PKT_FRAG_LATER;
				p->proto = fh.nexthdr;
				if (fh.nexthdr == IPPROTO_TCP || ipv6_ext_hdr(fh.nexthdr))
					return PKT_DROP;
				return PKT_OK;
			}
			/* Offset 0 without M is an atomic fragment: not fragmented at all. */
			if (fh.frag_off & bpf_htons(IP6_MF))
				p->frag = PKT_FRAG_FIRST;
			next = fh.nexthdr;
			off += sizeof(fh);
			continue;
		}
		if (bpf_skb_load_bytes(skb, off, &h, sizeof(h)))
			return PKT_DROP;
		/* AH counts its length in 4-byte units, less 2; the others in 8-byte units, less 1. */
		if (next == NEXTHDR_AUTH)
			off += (h.hdrlen + 2) * 4;
		else
			off += (h.hdrlen + 1) * 8;
		next = h.nexthdr;
	}
	if (ipv6_ext_hdr(next))
		return PKT_DROP; /* a longer chain than the walk's bound */
	p->proto = next;
	return pkt_parse_l4(skb, p, off);
}

/*
 * pkt_parse reads the headers of an Ethernet packet into p: up to
 * PKT_MAX_VLAN 802.1Q/802.1ad tags, IPv4 with options, IPv6 with up to
 * PKT_MAX_EXT_HDRS extension headers, and the TCP or UDP header. It reads
 * with bpf_skb_load_bytes, so headers in paged data (GSO, a driver that
 * left them in frags) parse like linear ones and nothing is pulled.
 *
 * It returns PKT_OK, PKT_PASS for a frame that is not IP, or PKT_DROP for
 * an IP packet that may carry TCP but cannot be classified: truncated or
 * malformed headers, more VLAN tags or extension headers than the bounds,
 * any fragment of a TCP segment, and a later IPv6 fragment whose next
 * header is not known to be anything but TCP. A fragment of anything else
 * is PKT_OK with p->frag set (ports zero for later fragments). Ports,
 * seq, syn, rst and fin are set for TCP (ports for UDP); other protocols
 * parse with them zero.
 */
static __always_inline int pkt_parse(struct __sk_buff *skb, struct pkt *p)
{
	__u32 off = offsetof(struct ethhdr, h_proto);
	__be16 proto;

	__builtin_memset(p, 0, sizeof(*p));
	if (bpf_skb_load_bytes(skb, off, &proto, sizeof(proto)))
		return PKT_PASS; /* a runt: not even an Ethernet header */
	off += sizeof(proto);
#pragma unroll
	for (int i = 0; i < PKT_MAX_VLAN; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		/* A tag is TCI then the inner EtherType. */
		if (bpf_skb_load_bytes(skb, off + 2, &proto, sizeof(proto)))
			return PKT_DROP;
		off += 4;
	}
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		return PKT_DROP;
	p->l3_off = off;
	if (proto == bpf_htons(ETH_P_IP))
		return pkt_parse_ipv4(skb, p, off);
	if (proto == bpf_htons(ETH_P_IPV6))
		return pkt_parse_ipv6(skb, p, off);
	return PKT_PASS;
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
