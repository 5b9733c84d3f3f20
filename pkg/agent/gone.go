//go:build linux

package agent

import (
	"context"
	"errors"
	"io/fs"
	"net/http"
	"time"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/netns"
)

// DefaultNetnsCheck is how often the agent checks that every enrolled
// pod's network namespace is still there (Config.NetnsCheckInterval).
const DefaultNetnsCheck = 5 * time.Second

// netnsGone reports whether err, from opening a pod's recorded netns,
// means the pod is gone: the path no longer exists, it no longer holds a
// network namespace (the runtime unmounted it and left the mount point),
// or it holds another one. Any other failure (out of descriptors, say)
// says nothing about the pod.
func netnsGone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, netns.ErrNotNetns) || errors.Is(err, errNetnsReplaced)
}

// watchNetns unenrols the pods whose netns has gone without a CNI DEL,
// every interval until ctx ends. Without it such a pod would stay with
// the proxy for good: the netns fd the proxy was handed keeps the
// namespace (and the pod's listeners, veth and addresses) alive after
// the runtime removed its bind mount, so nothing else would ever notice.
// A path check per pod is an open and an fstat: cheap at any pod count,
// and it needs no probe SNAT (host veths) or Kubernetes to work.
func (a *Agent) watchNetns(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, p := range a.snapshotPods() {
			if ctx.Err() != nil {
				return
			}
			ns, err := a.openPodNetns(p)
			if err == nil {
				ns.Close()
				continue
			}
			if netnsGone(err) {
				a.unenrollGone(ctx, p, err)
			}
		}
	}
}

// unenrollGone unenrols p when it is still enrolled with the same netns
// and that netns is still gone once the enrolment lock is held (an
// enrolment may have been running, or the pod re-enrolled meanwhile).
func (a *Agent) unenrollGone(ctx context.Context, p agentapi.PodState, reason error) {
	defer a.podOps.lock(p.UID)()
	cur, ok := a.Pod(p.UID)
	if !ok || cur.NetnsID != p.NetnsID {
		return
	}
	ns, err := a.openPodNetns(cur)
	if err == nil {
		ns.Close()
		return
	}
	if !netnsGone(err) {
		return
	}
	a.podLog(cur).Warn("the pod's netns is gone without a CNI DEL: unenrolling it", "netns", cur.Netns, "reason", reason)
	if aerr := a.unenrollLocked(ctx, cur.UID, false); aerr != nil && aerr.HTTPStatus != http.StatusNotFound {
		a.podLog(cur).Error("unenrol a pod whose netns is gone", "err", aerr.Message)
	}
}
