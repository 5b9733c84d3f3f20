//go:build linux

package proxy

import (
	"cmp"
	"os"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/zds"
)

// A pod whose start failed (a port in use; the ZDS client retries it) is
// still enrolled: its datapath captures its traffic. Unknown to discovery,
// its addresses would be a non-mesh destination and other pods would
// reach it in plaintext. So its IPs stay published in the ZDS layer as a
// mesh workload: connections to it go over HBONE and fail closed until its
// pod proxy runs. The entry goes when the pod starts (AddWorkload puts the
// running pod's entry), when the agent deletes it (ForgetWorkload) or when
// a snapshot no longer names it (Reconcile).

var _ zds.Forgetter = (*Proxy)(nil)

// publishFailed publishes the addresses of a pod that failed to start,
// read from its netns. Without a readable address nothing is published.
func (p *Proxy) publishFailed(uid string, info zds.WorkloadInfo, nsFile *os.File) {
	if nsFile == nil {
		return
	}
	ns, err := netns.FromFd(int(nsFile.Fd()))
	if err != nil {
		return
	}
	defer ns.Close()
	ips, err := podIPs(ns)
	if err != nil {
		p.log.Warn("pod that failed to start has no readable address", "uid", uid, "err", err)
		return
	}
	p.mu.Lock()
	if p.closed || p.pods[uid] != nil {
		p.mu.Unlock()
		return
	}
	p.failed[uid] = true
	p.mu.Unlock()
	p.zdsL.PutWorkload(discovery.Workload{
		UID: uid, Name: info.Name, Namespace: info.Namespace, ServiceAccount: cmp.Or(info.ServiceAccount, "default"),
		IPs: ips, Protocol: discovery.ProtocolHBONE,
	})
	p.log.Info("pod proxy failed to start; its addresses are kept as a mesh workload (fail closed)", "uid", uid, "ips", ips)
}

// ForgetWorkload implements zds.Forgetter: the agent no longer enrols a
// pod whose start had failed.
func (p *Proxy) ForgetWorkload(uid string) {
	p.mu.Lock()
	was := p.failed[uid]
	delete(p.failed, uid)
	p.mu.Unlock()
	if was {
		p.zdsL.DeleteWorkload(uid)
	}
}

// reconcileFailed forgets the failed pods a snapshot does not name.
func (p *Proxy) reconcileFailed(keep map[string]bool) {
	p.mu.Lock()
	var gone []string
	for uid := range p.failed {
		if !keep[uid] {
			gone = append(gone, uid)
		}
	}
	p.mu.Unlock()
	for _, uid := range gone {
		p.ForgetWorkload(uid)
	}
}

// startedPod forgets uid as failed: its pod proxy runs.
func (p *Proxy) startedPod(uid string) {
	p.mu.Lock()
	delete(p.failed, uid)
	p.mu.Unlock()
}
