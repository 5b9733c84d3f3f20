// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * ambpf SO_REUSEPORT steering probe: asks the kernel whether bpf_sk_assign
 * accepts a listener with SO_REUSEPORT (Linux 6.6, "bpf, net: Support
 * SO_REUSEPORT sockets with bpf_sk_assign"; before it the helper returns
 * -ESOCKTNOSUPPORT). Neither the kernel version, nor a symbol, nor a
 * BPF_PROG_TEST_RUN answers that (a test run is not at TC ingress, which
 * bpf_sk_assign checks first), so the loader (pkg/datapath, features.go)
 * runs this program on a real packet:
 *
 *   reuseport_probe  TC ingress on lo of a scratch network namespace
 *
 * For the TCP SYN to 127.0.0.1:target_port (where nothing listens) it
 * looks up the SO_REUSEPORT listener on 127.0.0.1:listen_port, assigns the
 * packet to it, and records what bpf_sk_assign returned in results.
 * Every packet passes (TC_ACT_OK): an assignment the kernel refused leaves
 * the SYN to reach the empty port, which answers with a reset.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual MIT/GPL";

/* The probe's ports, host order; set by the loader. */
volatile const __u16 listen_port = 0;
volatile const __u16 target_port = 0;

/* How far the program got with the probe's SYN. */
enum probe_stage {
	PROBE_NO_SYN = 0,      /* no SYN to target_port seen (zero value) */
	PROBE_NO_LISTENER = 1, /* the lookup found no listener on listen_port */
	PROBE_ASSIGNED = 2,    /* bpf_sk_assign was called: ret is its result */
};

struct probe_result {
	__s64 ret;   /* bpf_sk_assign's return value, when stage is PROBE_ASSIGNED */
	enum probe_stage stage;
	__u32 syns;  /* SYNs to target_port seen (a retransmission counts again) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_result);
} results SEC(".maps");

SEC("tc")
int reuseport_probe(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	struct bpf_sock_tuple t = {};
	struct probe_result *r;
	struct bpf_sock *sk;
	__u32 key = 0;

	/* lo's packets carry a zeroed Ethernet header; the probe's SYN has
	 * no IP options (ihl 5), so its TCP header follows at once. */
	if ((void *)(tcp + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	if (tcp->dest != bpf_htons(target_port) || !tcp->syn || tcp->ack)
		return TC_ACT_OK;
	r = bpf_map_lookup_elem(&results, &key);
	if (!r)
		return TC_ACT_OK;
	r->syns++;

	t.ipv4.saddr = ip->saddr;
	t.ipv4.daddr = ip->daddr;
	t.ipv4.sport = tcp->source;
	t.ipv4.dport = bpf_htons(listen_port);
	sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk) {
		r->stage = PROBE_NO_LISTENER;
		return TC_ACT_OK;
	}
	r->ret = bpf_sk_assign(skb, sk, 0);
	r->stage = PROBE_ASSIGNED;
	bpf_sk_release(sk);
	return TC_ACT_OK;
}
