//go:build linux

package agent

import (
	"errors"
	"fmt"
	"time"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
)

// reconcile makes the state file and the pins agree, before anything is
// served: the datapath verifies its pins (removing pods whose netns is
// gone, upgrading old builds), a pinned pod the state does not know is
// detached, a known pod without (working) pins is attached again when its
// netns is still there and dropped otherwise. Pods attached again are
// pending until a proxy acks them; pods still pinned keep their state, so
// the agent's status after a restart matches the one before. The probe
// SNAT is then reconciled with the remaining pods (reconcileProbes).
// With a Controller, pinned pods the state does not know are left for
// it to claim (a lost state file must not uncapture running pods);
// dropUnclaimed detaches the rest once it has synced. So are they after a
// corrupt state file was set aside: they stay captured, fail closed, until
// their enrolment comes again (the CNI's next ADD, or an operator).
func (a *Agent) reconcile() error {
	start := time.Now()
	results, err := a.dp.Verify()
	if err != nil {
		// Verify reports leftovers it could not remove; the pods
		// themselves are still listed and reconciled below.
		a.log.Warn("datapath verify", "err", err)
	}
	broken := map[string]bool{}
	for _, r := range results {
		if r.Action == "broken" {
			broken[r.UID] = true
		}
	}
	pinned, err := a.dp.List()
	if err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	pinnedNetns := map[string]datapath.Status{}
	for _, st := range pinned {
		pinnedNetns[st.UID] = st
	}

	a.mu.Lock()
	pods := a.pods
	a.mu.Unlock()
	var errs []error
	for _, st := range pinned {
		if _, ok := pods[st.UID]; !ok && a.cfg.Controller == nil && !a.lostState {
			a.log.Info("detaching a pinned pod the state does not know", "uid", st.UID)
			errs = append(errs, a.dp.Detach(st.UID))
		}
	}
	for uid, p := range pods {
		log := a.podLog(p)
		pin, isPinned := pinnedNetns[uid]
		ns, err := a.openPodNetns(p)
		if cur, ok := a.Pod(uid); ok {
			p = cur // openPodNetns may have moved it to a new path
		}
		if err != nil {
			log.Info("dropping a pod whose netns is gone", "reason", err)
			if isPinned {
				errs = append(errs, a.dp.Detach(uid))
			}
			delete(pods, uid)
			continue
		}
		if isPinned && !broken[uid] && pin.Netns == p.NetnsID {
			ns.Close()
			if p.State == agentapi.StatePending {
				a.retries[uid] = &backoff{delay: a.cfg.RetryMin}
			}
			continue
		}
		if isPinned {
			log.Warn("re-attaching a pod whose pins are broken", "reason", "missing attachment or other netns")
			if err := a.dp.Detach(uid); err != nil && !errors.Is(err, datapath.ErrNotAttached) {
				errs = append(errs, err)
			}
		}
		_, err = a.dp.Attach(datapathPod(p, ns))
		ns.Close()
		if err != nil {
			log.Error("dropping a pod that cannot be attached again", "err", err)
			delete(pods, uid)
			continue
		}
		p.State, p.Reason = agentapi.StatePending, "re-attached on agent start"
		pods[uid] = p
		a.retries[uid] = &backoff{delay: a.cfg.RetryMin}
		log.Info("pod re-attached")
	}
	a.reconcileProbes(pods)
	a.mu.Lock()
	err = a.state.save(a.pods)
	a.mu.Unlock()
	a.reconcileFastPath()
	if err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	if err := errors.Join(errs...); err != nil {
		a.log.Warn("reconcile left errors", "err", err)
	}
	a.log.Info("reconciled state with the datapath", "pods", len(pods), "pinned_before", len(pinned), "took", time.Since(start))
	return nil
}

// dropUnclaimed detaches the pinned pods no enrolment claims, after the
// controller rebuilt its pods.
func (a *Agent) dropUnclaimed() {
	pinned, err := a.dp.List()
	if err != nil {
		a.log.Warn("list pinned pods", "err", err)
		return
	}
	for _, st := range pinned {
		a.dropIfUnclaimed(st.UID)
	}
}

// dropIfUnclaimed detaches uid unless an enrolment claims it. The check
// runs under the pod's lock: an enrolment that attached the pod but has
// not recorded it yet finishes first, and then claims it.
func (a *Agent) dropIfUnclaimed(uid string) {
	defer a.podOps.lock(uid)()
	if _, ok := a.Pod(uid); ok {
		return
	}
	a.log.Info("detaching a pinned pod no enrolment claims", "uid", uid)
	if err := a.detachFastPath(uid); err != nil {
		a.log.Warn("detach unclaimed pod's fast path", "uid", uid, "err", err)
	}
	if err := a.dp.Detach(uid); err != nil && !errors.Is(err, datapath.ErrNotAttached) {
		a.log.Warn("detach unclaimed pod", "uid", uid, "err", err)
	}
}
