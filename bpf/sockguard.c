// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * ambpf packet-socket guard: refuses AF_PACKET sockets to the processes of
 * an enrolled pod's cgroup (BPF_LSM_CGROUP, kernel 6.0+ with the bpf LSM
 * active). A packet socket with PACKET_QDISC_BYPASS hands frames straight
 * to the driver, past every TC program, so an app holding CAP_NET_RAW (in
 * the default capability set of common runtimes) could otherwise send TCP
 * around the capture. Raw IP sockets (SOCK_RAW) go through the IP stack and
 * TC like any other and stay allowed (ping needs them).
 *
 * Its own object: kernels without lsm_cgroup still load the capture
 * programs, and the loader reports the guard as unavailable.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define AF_PACKET 17

char __license[] SEC("license") = "Dual MIT/GPL";

/*
 * socket_create(int family, int type, int protocol, int kern): 1 allows,
 * 0 refuses with EPERM. Sockets the kernel makes for itself pass.
 */
SEC("lsm_cgroup/socket_create")
int guard_packet_socket(unsigned long long *ctx)
{
	int family = (int)ctx[0];
	int kern = (int)ctx[3];

	if (family == AF_PACKET && !kern)
		return 0;
	return 1;
}
