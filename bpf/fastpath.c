// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * ambpf fast path: the in-pod leg between an app and the proxy without the
 * TCP stack. An app's outbound connection is captured (bpf/capture.c) and
 * accepted by the proxy's 15001 listener inside the pod's netns; the two
 * sockets are then TCP peers of each other in the same netns, with mirrored
 * 4-tuples. Once both are recorded here, every sendmsg on one is moved
 * straight into the other's receive queue (bpf_msg_redirect_hash with
 * BPF_F_INGRESS) instead of going egress -> redirect -> ingress -> TCP.
 *
 *   fastpath_app    sockops, each pod's cgroup   record the app's connected sockets
 *   fastpath_proxy  sockops, the proxy's cgroup  record an accepted socket whose
 *                                                peer is a recorded app socket
 *   fastpath_msg    sk_msg, on fp_socks          redirect to the peer, or pass to TCP
 *
 * Pairing. An app socket is recorded when its connect completes
 * (ACTIVE_ESTABLISHED), with its pod's index (fastpath_app is loaded per pod
 * with pod_index set). A proxy socket is recorded when the proxy's accept
 * side completes (PASSIVE_ESTABLISHED) only if the mirror of its 4-tuple in
 * the same netns is a recorded app socket: that is exactly the app <-> 15001
 * leg. The proxy's upstream sockets (it connects: ACTIVE in the proxy's
 * cgroup) and its accepted sockets whose peer is remote (15006, 15008) are
 * never recorded, so they stay on TCP.
 *
 * Ordering. A send that finds no peer goes through TCP, and its socket is
 * marked FP_TCP: it never redirects again. So a byte stream is either all
 * TCP, or redirected first and TCP after (when the peer is gone), and the
 * receiver reads its redirected queue before its TCP queue, which keeps the
 * order (TCP-then-redirect could overtake bytes still in the TCP queue).
 *
 * Fail closed. A socket leaves fp_socks when it closes (the kernel removes
 * it). An app whose proxy socket is gone sends through TCP, where capture
 * finds no proxy socket and drops; nothing ever goes around the proxy.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ambpf.h"

char __license[] SEC("license") = "Dual MIT/GPL";

#define AF_INET 2
#define AF_INET6 10

/* fp_sock.role */
#define ROLE_APP 1
#define ROLE_PROXY 2

/* fp_sock.flags */
#define FP_TCP (1 << 0)	       /* this end has sent through TCP: never redirect again */
#define FP_NO_INGRESS (1 << 1) /* app socket: the proxy's bytes to it go through TCP */

/* A socket, by its netns and its own view of the 4-tuple. */
struct fp_key {
	__u64 netns;	 /* netns cookie */
	__u32 local[4];	 /* IPv4 in local[0], rest zero; v4-mapped IPv6 as IPv4 */
	__u32 remote[4];
	__u16 lport; /* host byte order */
	__u16 rport; /* host byte order */
	__u32 family; /* AF_INET, AF_INET6 */
};

/* What is known of a recorded socket. */
struct fp_sock {
	__u32 pod;  /* pod index (the datapath's) */
	__u32 role; /* ROLE_* */
	__u32 flags; /* FP_*, written by the socket's own sendmsg only */
	__u32 pad;
};

/* Per-pod counters, fp_stats[pod index], updated atomically. */
struct fp_counters {
	__u64 app_socks;      /* app sockets recorded */
	__u64 paired;	      /* proxy sockets recorded as an app socket's peer */
	__u64 msgs_to_proxy;  /* sendmsg calls redirected app -> proxy */
	__u64 bytes_to_proxy;
	__u64 msgs_to_app;    /* proxy -> app */
	__u64 bytes_to_app;
	__u64 fallback;	      /* connections that went (on) through TCP: no peer, or it was gone */
	__u64 full;	      /* sockets not recorded: a map was full */
};

/*
 * The recorded sockets, node-wide. The kernel takes no BTF for a sockhash;
 * fp_meta, with the same keys, is the view bpftool prints with field names.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct fp_key);
	__type(value, __u64);
} fp_socks SEC(".maps");

/* Role, pod and state of each socket in fp_socks, by the same key. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fp_key);
	__type(value, struct fp_sock);
} fp_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_MAX_PODS);
	__type(key, __u32);
	__type(value, struct fp_counters);
} fp_stats SEC(".maps");

/*
 * Which build of this object the node's pinned programs are (the first 8
 * bytes of the object's SHA-256, written by the loader), so a loader of
 * another build knows to swap them.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} fp_build SEC(".maps");

/* The pod of this instance of fastpath_app; set by the loader. */
volatile const __u32 pod_index = 0;
/*
 * FP_NO_INGRESS, or 0 when the proxy's bytes may be redirected into the
 * app's sockets too. A redirected byte waits in a queue of the socket that
 * only recvmsg reads: an app that reads its socket with splice(2) would not
 * see it, so redirecting toward the app is the pod's choice.
 */
volatile const __u32 app_flags = FP_NO_INGRESS;

#define COUNT(pod, field, n)                                          \
	do {                                                          \
		__u32 __k = (pod);                                    \
		struct fp_counters *__c = bpf_map_lookup_elem(&fp_stats, &__k); \
		if (__c)                                              \
			__sync_fetch_and_add(&__c->field, (n));       \
	} while (0)

static __always_inline int v4mapped(const __u32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

/*
 * fill_key builds a key from a context's fields. sock_ops and sk_msg
 * present them alike (remote_port in network order in the upper half on
 * little-endian kernels, local_port in host order), and both are read the
 * same way here, so the two programs always agree on a socket's key.
 */
static __always_inline void fill_key(struct fp_key *k, __u32 family, __u32 lip4, __u32 rip4,
				     const __u32 lip6[4], const __u32 rip6[4], __u32 lport, __u32 rport)
{
	k->lport = (__u16)lport;
	k->rport = (__u16)bpf_ntohl(rport);
	if (family == AF_INET) {
		k->family = AF_INET;
		k->local[0] = lip4;
		k->remote[0] = rip4;
		return;
	}
	if (v4mapped(lip6) && v4mapped(rip6)) {
		k->family = AF_INET;
		k->local[0] = lip6[3];
		k->remote[0] = rip6[3];
		return;
	}
	k->family = AF_INET6;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		k->local[i] = lip6[i];
		k->remote[i] = rip6[i];
	}
}

/*
 * ctx_key fills *k from a sock_ops or an sk_msg context, whose address
 * fields have the same names; it is 0 when the socket is no IP socket. A
 * macro rather than a function: the two context types differ, and each
 * read must stay a direct context access, which the verifier rewrites.
 */
#define ctx_key(ctx, k)                                                                            \
	({                                                                                         \
		__u32 __lip6[4], __rip6[4];                                                        \
		__u32 __family = (ctx)->family;                                                    \
		int __ok = 1;                                                                      \
		if (__family == AF_INET6) {                                                        \
			__lip6[0] = (ctx)->local_ip6[0];                                           \
			__lip6[1] = (ctx)->local_ip6[1];                                           \
			__lip6[2] = (ctx)->local_ip6[2];                                           \
			__lip6[3] = (ctx)->local_ip6[3];                                           \
			__rip6[0] = (ctx)->remote_ip6[0];                                          \
			__rip6[1] = (ctx)->remote_ip6[1];                                          \
			__rip6[2] = (ctx)->remote_ip6[2];                                          \
			__rip6[3] = (ctx)->remote_ip6[3];                                          \
		} else if (__family == AF_INET) {                                                  \
			__builtin_memset(__lip6, 0, sizeof(__lip6));                               \
			__builtin_memset(__rip6, 0, sizeof(__rip6));                               \
		} else {                                                                           \
			__ok = 0;                                                                  \
		}                                                                                  \
		if (__ok) {                                                                        \
			fill_key(k, __family, __family == AF_INET ? (ctx)->local_ip4 : 0,           \
				 __family == AF_INET ? (ctx)->remote_ip4 : 0, __lip6, __rip6,      \
				 (ctx)->local_port, (ctx)->remote_port);                           \
			(k)->netns = bpf_get_netns_cookie(ctx);                                    \
		}                                                                                  \
		__ok;                                                                              \
	})

/* ops_key reads skops' key; 0 when it is no IP socket. */
static __always_inline int ops_key(struct bpf_sock_ops *o, struct fp_key *k)
{
	return ctx_key(o, k);
}

static __always_inline void mirror(const struct fp_key *k, struct fp_key *m)
{
	m->netns = k->netns;
	m->family = k->family;
	m->lport = k->rport;
	m->rport = k->lport;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		m->local[i] = k->remote[i];
		m->remote[i] = k->local[i];
	}
}

/* local_peer: the peer is this host's own loopback or the socket's own address. */
static __always_inline int local_peer(const struct fp_key *k)
{
	if (k->family == AF_INET)
		return (bpf_ntohl(k->remote[0]) >> 24) == 127 || k->remote[0] == k->local[0];
	if (k->remote[0] == 0 && k->remote[1] == 0 && k->remote[2] == 0 && k->remote[3] == bpf_htonl(1))
		return 1;
	return k->remote[0] == k->local[0] && k->remote[1] == k->local[1] &&
	       k->remote[2] == k->local[2] && k->remote[3] == k->local[3];
}

/*
 * record puts skops' socket in fp_socks with meta. The state callback is
 * asked for so that the meta entry goes when the socket closes (the kernel
 * removes the socket from fp_socks itself).
 */
static __always_inline void record(struct bpf_sock_ops *skops, struct fp_key *k, struct fp_sock *meta)
{
	if (bpf_map_update_elem(&fp_meta, k, meta, BPF_ANY) != 0) {
		COUNT(meta->pod, full, 1);
		return;
	}
	if (bpf_sock_hash_update(skops, &fp_socks, k, BPF_ANY) != 0) {
		bpf_map_delete_elem(&fp_meta, k);
		COUNT(meta->pod, full, 1);
		return;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	if (meta->role == ROLE_APP)
		COUNT(meta->pod, app_socks, 1);
	else
		COUNT(meta->pod, paired, 1);
}

/* forget deletes a closing socket's meta entry. */
static __always_inline void forget(struct bpf_sock_ops *skops)
{
	struct fp_key k = {};

	if (skops->args[1] != BPF_TCP_CLOSE)
		return;
	if (ops_key(skops, &k))
		bpf_map_delete_elem(&fp_meta, &k);
}

SEC("sockops")
int fastpath_app(struct bpf_sock_ops *skops)
{
	struct fp_key k = {};
	struct fp_sock meta = {};

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (!ops_key(skops, &k) || local_peer(&k))
			return 1; /* in-pod loopback is no capture leg */
		meta.pod = pod_index;
		meta.role = ROLE_APP;
		meta.flags = app_flags & FP_NO_INGRESS;
		record(skops, &k, &meta);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		forget(skops);
		break;
	}
	return 1;
}

SEC("sockops")
int fastpath_proxy(struct bpf_sock_ops *skops)
{
	struct fp_key k = {}, peer = {};
	struct fp_sock meta = {}, *app;

	switch (skops->op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (!ops_key(skops, &k))
			return 1;
		mirror(&k, &peer);
		app = bpf_map_lookup_elem(&fp_meta, &peer);
		if (!app || app->role != ROLE_APP)
			return 1; /* the peer is not an app socket of this netns: stays on TCP */
		meta.pod = app->pod;
		meta.role = ROLE_PROXY;
		record(skops, &k, &meta);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		forget(skops);
		break;
	}
	return 1;
}

/*
 * fall_back sends this message through TCP, and every later one of this
 * socket. Only the socket's own sendmsg writes its flags, under the socket
 * lock, so a plain store is enough.
 */
static __always_inline int fall_back(struct fp_sock *m)
{
	m->flags |= FP_TCP;
	COUNT(m->pod, fallback, 1);
	return SK_PASS;
}

SEC("sk_msg")
int fastpath_msg(struct sk_msg_md *msg)
{
	struct fp_key k = {}, peer = {};
	struct fp_sock *m, *p;
	__u64 size = msg->size;

	if (!ctx_key(msg, &k))
		return SK_PASS;

	m = bpf_map_lookup_elem(&fp_meta, &k);
	if (!m || (m->flags & FP_TCP))
		return SK_PASS;
	mirror(&k, &peer);
	p = bpf_map_lookup_elem(&fp_meta, &peer);
	if (!p || p->role == m->role)
		return fall_back(m);
	if (p->flags & FP_NO_INGRESS) {
		m->flags |= FP_TCP; /* by choice, not a fallback */
		return SK_PASS;
	}
	if (bpf_msg_redirect_hash(msg, &fp_socks, &peer, BPF_F_INGRESS) != SK_PASS)
		return fall_back(m); /* the peer left fp_socks: it is closing */
	if (m->role == ROLE_APP) {
		COUNT(m->pod, msgs_to_proxy, 1);
		COUNT(m->pod, bytes_to_proxy, size);
	} else {
		COUNT(m->pod, msgs_to_app, 1);
		COUNT(m->pod, bytes_to_app, size);
	}
	return SK_PASS;
}
