//go:build linux

package agent

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/zds"
)

// admitProxy is the ZDS server's Admit hook. A connecting process must run
// as an allowed uid (root, or the agent's own uid, unless configured); its
// cgroup then becomes a proxy cgroup for every pod's datapath, before the
// process hears of any pod. That cgroup, not the 0x539 mark, is what lets
// the proxy's own connections leave a pod uncaptured (see docs/SECURITY.md).
func (a *Agent) admitProxy(p zds.Peer) error {
	allowed := a.cfg.ZDSAllowUIDs
	if len(allowed) == 0 {
		allowed = []int{0, os.Geteuid()}
	}
	if !slices.Contains(allowed, p.UID) {
		return fmt.Errorf("uid %d may not be a proxy (allowed: %v)", p.UID, allowed)
	}
	if want := a.cfg.ZDSProxyCgroup; want != "" {
		dir, err := cgroup.OfProcess(p.PID)
		if err != nil {
			return fmt.Errorf("proxy cgroup: %w", err)
		}
		mnt, err := cgroup.Mount()
		if err != nil {
			return fmt.Errorf("proxy cgroup: %w", err)
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(dir, mnt), "/")
		want = "/" + strings.Trim(want, "/")
		if rel != want && !strings.HasPrefix(rel, strings.TrimSuffix(want, "/")+"/") {
			return fmt.Errorf("process %d runs in cgroup %s, not under %s: not a proxy", p.PID, rel, want)
		}
	}
	a.pruneProxies()
	dir, id, err := a.dp.TrustProcess(p.PID)
	if err != nil {
		return err
	}
	log := a.log.With("pid", p.PID, "cgroup", dir, "cgroup_id", id)
	if mnt, err := cgroup.Mount(); err == nil && dir == mnt {
		log.Warn("the proxy runs in the root cgroup: every process there (apps in pods without a cgroup of their own included) " +
			"may send with the proxy mark uncaptured; run the proxy in a cgroup of its own")
	} else {
		log.Info("proxy cgroup trusted")
		a.attachFastPathProxy(dir)
	}
	return nil
}

// pruneProxies forgets proxy cgroups whose registered process is gone or
// has moved: a new proxy registers its own. Errors only leave an entry in
// place, which is harmless (cgroup ids are never reused).
func (a *Agent) pruneProxies() {
	list, err := a.dp.ProxyCgroups()
	if err != nil {
		a.log.Warn("list proxy cgroups", "err", err)
		return
	}
	for _, pc := range list {
		if a.stillProxy(pc.PID, pc.ID) {
			continue
		}
		if err := a.dp.ForgetProxy(pc.ID); err != nil {
			a.log.Warn("forget proxy cgroup", "cgroup_id", pc.ID, "err", err)
			continue
		}
		a.forgetFastPathProxy(pc.ID)
		a.log.Info("proxy cgroup forgotten: its process is gone", "cgroup_id", pc.ID, "pid", pc.PID)
	}
}

// stillProxy reports whether pid still runs in the cgroup with id.
func (a *Agent) stillProxy(pid uint32, id uint64) bool {
	dir, err := cgroup.OfProcess(int(pid))
	if err != nil {
		return !errors.Is(err, os.ErrNotExist) && !isDeleted(err)
	}
	got, err := cgroup.ID(dir)
	return err != nil || got == id
}

func isDeleted(err error) bool { return errors.Is(err, cgroup.ErrRemoved) }

// prepareHandoff sets tcp_migrate_req in a pod's netns, so that when an
// old proxy closes its listeners in a rolling upgrade, the connections
// queued on them go to the new proxy's. The agent does it, not the proxy:
// /proc/sys is read-only in the proxy's container. It runs before every
// Add, the snapshot's included, so pods enrolled by an older agent get it
// when the next proxy connects. A non-privileged agent cannot write it
// either (its /proc/sys is read-only too): ambpf-cni, which runs on the
// host, sets it at the pod's ADD, and then this finds it set. Failure only
// costs those queued connections in an upgrade: it is logged.
func (a *Agent) prepareHandoff(uid string, ns *netns.NS) {
	err := ns.SetSysctl(meshconst.MigrateReqSysctl, "1")
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("cannot set tcp_migrate_req in the pod's netns: an old proxy's listener queue is reset in an upgrade", "uid", uid, "err", err)
	}
}
