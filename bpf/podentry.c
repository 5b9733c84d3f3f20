// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * ambpf pod entry programs: the only programs loaded per pod. Each is a few
 * instructions, so enrolling a pod verifies almost nothing; the capture
 * logic (bpf/capture.c) is loaded once per node and shared.
 *
 *   entry_ingress    TC ingress on eth0  -> capture_progs[SLOT_INGRESS]
 *   entry_egress     TC egress on eth0   -> capture_progs[SLOT_EGRESS]
 *   entry_lo_egress  TC egress on lo     -> capture_progs[SLOT_LO_EGRESS]
 *   guard_mark       cgroup/setsockopt   only the proxy may carry the proxy mark
 *
 * pod_index, a load-time constant, names the pod: the TC entries hand it to
 * the shared programs in cb[POD_CB]; the guard counts under it. The maps are
 * the node's (the loader passes them in): capture_progs, and pod_counters
 * shared with bpf/capture.c.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "ambpf.h"
#include "pkt.h"

#define SOL_SOCKET 1
#define SO_MARK 36
#define PAGE_SIZE 4096

char __license[] SEC("license") = "Dual MIT/GPL";

/* This pod's index in the node's maps; set by the loader for each pod. */
volatile const __u32 pod_index = 0;

/* The node's shared capture programs, by SLOT_*. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, NUM_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} capture_progs SEC(".maps");

/* The node's per-pod counters (bpf/capture.c defines the same map). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_MAX_PODS);
	__type(key, __u32);
	__type(value, struct counters);
} pod_counters SEC(".maps");

/*
 * enter runs the node's program in slot for this pod. An empty slot means
 * the node's programs are not loaded: the packet is dropped, so a broken
 * node fails closed instead of passing traffic uncaptured.
 */
static __always_inline int enter(struct __sk_buff *skb, __u32 slot)
{
	skb->cb[POD_CB] = pod_index;
	/*
	 * The slot is read back from the control block so that the verifier
	 * cannot see it as a constant. With a constant key the JIT emits a
	 * direct jump that the kernel patches in place (text_poke, which
	 * interrupts every CPU) when the program is loaded, freed, and
	 * whenever the slot changes: that patching was half the CPU of
	 * loading a pod's entry programs (docs/BENCHMARKS.md, "Burst
	 * enrolment"). An indirect tail call costs a few nanoseconds more
	 * per packet and patches nothing.
	 */
	skb->cb[SLOT_CB] = slot;
	bpf_tail_call(skb, &capture_progs, *(volatile __u32 *)&skb->cb[SLOT_CB]);
	return TC_ACT_SHOT;
}

SEC("tc")
int entry_ingress(struct __sk_buff *skb)
{
	return enter(skb, SLOT_INGRESS);
}

SEC("tc")
int entry_egress(struct __sk_buff *skb)
{
	return enter(skb, SLOT_EGRESS);
}

SEC("tc")
int entry_lo_egress(struct __sk_buff *skb)
{
	return enter(skb, SLOT_LO_EGRESS);
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
		COUNT_AT(pod_counters, pod_index, mark_refused);
		return 0;
	}
	return 1;
}
