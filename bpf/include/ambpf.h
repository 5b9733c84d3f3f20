/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * Constants and map value layouts shared by the ambpf programs. The Go side
 * gets the struct layouts from bpf2go (-type), so the two cannot drift; the
 * numeric constants are Istio's wire facts (see docs/ARCHITECTURE.md) and
 * are mirrored in pkg/meshconst, checked by a Go test. The loader's own
 * values (config flags, attach modes, setup bits) are enums typing the
 * fields that hold them, so BTF carries them and bpf2go emits them as Go
 * constants: the Go side has no second list of them.
 */
#ifndef AMBPF_H
#define AMBPF_H

#include <linux/types.h>

#define OUTBOUND_PORT 15001
#define INBOUND_PORT 15006
#define HBONE_PORT 15008
#define DNS_PROXY_PORT 15053
#define DNS_PORT 53

#define MARK_MASK 0xfff
#define PROXY_MARK 0x539
#define LOCAL_ROUTE_MARK 0x111

/*
 * Set on packets that the egress program sends back into eth0 ingress, and
 * replaced there before routing. It lies outside Istio's 0xfff mask and is
 * never seen outside the pod: marks are scrubbed when a packet crosses a
 * network namespace, so a packet arriving from the veth peer cannot carry it.
 */
#define MARK_FROM_EGRESS 0x0a6b0000

/* The loopback device is always ifindex 1 in a network namespace. */
#define LOOPBACK_IFINDEX 1

/*
 * One set of the capture programs serves every pod of the node. Each pod
 * has its own small entry programs (bpf/podentry.c) on its devices: they
 * put the pod's index into the packet's control block and tail-call the
 * shared program in the node's capture_progs slot, which keys all per-pod
 * state by that index. The slot numbers are an ABI between builds: an
 * entry program of one build must reach the right body of the next.
 */
#define POD_CB 0	 /* __sk_buff.cb[] word carrying the pod index */
#define SLOT_CB 1	 /* __sk_buff.cb[] word the entry reads its slot back from */
#define SLOT_INGRESS 0	 /* capture_ingress: eth0 ingress */
#define SLOT_EGRESS 1	 /* capture_egress: eth0 egress */
#define SLOT_LO_EGRESS 2 /* dns_reply: lo egress */
#define NUM_SLOTS 3

/*
 * Sizes of the node-wide maps when the loader gives none (it sets them at
 * load time from its configuration; docs/ARCHITECTURE.md explains them).
 */
#define DEFAULT_MAX_PODS 1024
#define DEFAULT_DIRECT_FLOWS 16384
#define DEFAULT_INBOUND_PENDING 8192
#define DEFAULT_DNS_NAT 16384

/* config.flags: a set of these bits. */
enum cfg_flag {
	CFG_DNS_CAPTURE = 1 << 0,
	CFG_BYPASS_INBOUND = 1 << 1,
};

/* Per-pod options, written by the loader; pod_config[pod index]. */
struct config {
	enum cfg_flag flags; /* 4 bytes, as __u32 */
	__u32 direct_max; /* direct_flows entries the pod may hold at once */
	/*
	 * The loader's share of the pod's direct_flows count: flows it added
	 * (open at enrolment) minus flows it swept. The programs count theirs
	 * atomically in counters.direct_entries; the loader cannot add
	 * atomically to a map value, so it keeps its part here, where it is
	 * the only writer. The pod holds direct_entries + direct_adjust.
	 */
	__s64 direct_adjust;
};

/*
 * Per-pod counters, pod_counters[pod index], updated atomically. Connection counters move
 * once per connection (on its SYN), not per packet.
 */
struct counters {
	__u64 captured_in;	   /* inbound connections handed to 15006 */
	__u64 captured_out;	   /* outbound connections handed to 15001 */
	__u64 captured_dns;	   /* DNS datagrams and TCP DNS connections sent to 15053 */
	__u64 hbone_in;		   /* inbound connections to 15008, let through */
	__u64 bypassed;		   /* connections not captured: proxy mark, probe, bypass option */
	__u64 direct;		   /* packets of uncaptured flows (open before attach, bypassed inbound) */
	__u64 dropped_no_listener; /* captured connections dropped: no proxy listener (fail closed) */
	__u64 dropped_no_flow;	   /* captured packets dropped: their proxy socket is gone */
	__u64 assign_failed;	   /* bpf_sk_assign refused the socket (e.g. reuseport < 6.6) */
	__u64 mark_refused;	   /* setsockopt(SO_MARK) with a mesh mark refused in the pod cgroup */
	__u64 dropped_unparsed;	   /* IP packets that may carry TCP (or captured DNS) but could not be classified */
	__u64 direct_full;	   /* bypassed inbound flows not recorded: direct_flows full (fail closed) */
	__u64 mark_untrusted;	   /* connections carrying the proxy mark from outside the proxy's cgroups: captured */
	__s64 direct_entries;	   /* a gauge, not a counter: the programs' part of the pod's direct_flows entries (see config.direct_adjust) */
};

/*
 * A cgroup whose sockets are the proxy's (key: the cgroup v2 id). The node
 * agent adds the cgroup of every process that connects to its ZDS socket.
 */
struct proxy_cgroup {
	__u64 registered_unix_ns;
	__u32 pid; /* the process that connected, for operators */
	__u32 pad;
};

/* An address in network byte order; IPv4 uses the first 4 bytes. */
struct addr {
	__u8 b[16];
};

/* A TCP flow as the pod sees it: local end first. */
struct flow {
	struct addr local;
	struct addr remote;
	__be16 local_port;
	__be16 remote_port;
	__u8 family; /* AF_INET or AF_INET6 */
	__u8 pad[3];
	__u32 pod; /* the pod's index */
};

/* direct_flow.origin */
#define DIRECT_ATTACHED 1 /* open when the datapath was attached (recorded by the loader) */
#define DIRECT_INBOUND 2  /* inbound, let through by bypass-inbound */

/*
 * A flow in direct_flows. expires_ns is on the bpf_ktime_get_ns clock
 * (CLOCK_MONOTONIC): past it the entry is void, and whoever finds it
 * deletes it (the programs on lookup, the loader's sweep). Each direction
 * writes only its own FIN byte, so no update is lost between CPUs.
 */
struct direct_flow {
	__u64 expires_ns;
	__u8 origin;  /* DIRECT_ATTACHED or DIRECT_INBOUND */
	__u8 fin_out; /* the pod sent FIN */
	__u8 fin_in;  /* the peer sent FIN */
	__u8 pad[5];
};

/* The app end of a captured DNS exchange. */
struct dns_key {
	struct addr app;
	__be16 app_port;
	__u8 family;
	__u8 proto;
	__u32 pod; /* the pod's index */
};

/* Where the app sent its DNS query. */
struct dns_dest {
	struct addr addr;
	__be16 port;
	__u8 pad[2];
};

/*
 * How the loader attached TC programs (pod_info.mode, probe_info.mode).
 * pkg/tcattach's Mode has the same values; the loaders check that at
 * compile time.
 */
enum tc_mode {
	MODE_TCX = 1,
	MODE_CLSACT = 2,
};

/* pod_info.setup: what the loader changed in the pod, so detach undoes exactly that. */
enum pod_setup {
	SETUP_RULE4 = 1 << 0,
	SETUP_RULE6 = 1 << 1,
	SETUP_ROUTE4 = 1 << 2,
	SETUP_ROUTE6 = 1 << 3,
	SETUP_QDISC_ETH = 1 << 4, /* clsact qdisc on eth0 created by us */
	SETUP_QDISC_LO = 1 << 5,  /* clsact qdisc on lo created by us */
};

/* Number of sysctls the loader may set; orig_sysctl[i] = -1 when untouched. */
#define NUM_SYSCTLS 6

/*
 * What the loader attached and changed, pod_meta[pod index], written by the
 * loader and read by nobody in the kernel. An entry with an empty uid is a
 * free index. It lets a restarted agent (or an operator with
 * bpftool) see the pod without any other state file.
 */
struct pod_info {
	char uid[64];
	char ifname[16];
	__u64 netns_dev;
	__u64 netns_ino;
	__u64 cgroup_id;
	__u64 attached_unix_ns;
	__u32 ifindex;
	enum tc_mode mode;    /* 4 bytes, as __u32 */
	enum pod_setup setup; /* a set of SETUP_* bits */
	__s8 orig_sysctl[NUM_SYSCTLS];
	__u8 pad[2];
	__u8 program_tag[8]; /* first bytes of the object's SHA-256: which build is attached */
};

/*
 * The node's loaded capture programs, node_meta[0]: which build they are,
 * so a loader of another build knows to swap them.
 */
struct node_info {
	__u8 program_tag[8];
	__u64 loaded_unix_ns;
	/* The map sizes loaded (the loader's MapSizes). */
	__u32 max_pods;
	__u32 direct_flows;
	__u32 inbound_pending;
	__u32 dns_nat;
};

#endif
