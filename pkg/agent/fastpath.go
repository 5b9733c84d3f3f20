//go:build linux

package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/dpstate"
	"github.com/ambpf/ambpf/pkg/fastpath"
)

// The in-pod fast path (pkg/fastpath), when Config.FastPath is on: each
// enrolled pod with a cgroup gets the app program, each trusted proxy
// cgroup the proxy program. Nothing here can fail an enrolment: a pod
// without the fast path keeps today's TCP leg, which is correct, only
// slower; the reason is logged and reported (ambpfctl inspect).

// openFastPath opens the loader, or returns why the agent runs without.
func openFastPath(cfg Config) (*fastpath.Loader, error) {
	if cfg.FastPath == "" || cfg.FastPath == fastpath.Off {
		return nil, nil
	}
	l, err := fastpath.New(fastpath.Config{Root: cfg.BPFRoot, Logger: cfg.Logger})
	if errors.Is(err, fastpath.ErrUnsupported) {
		cfg.Logger.Warn("fast path unavailable on this kernel: the in-pod leg stays on TCP", "err", err)
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("fast path: %w", err)
	}
	cfg.Logger.Info("fast path on", "mode", cfg.FastPath)
	return l, nil
}

// fastPathOff says why pod st has no fast path by its own or the node's
// choice ("" when it is to have it): the pod's request (its
// ambpf.io/fastpath annotation) wins over the node's default.
func (a *Agent) fastPathOff(st agentapi.PodState) string {
	switch {
	case st.FastPath == agentapi.FastPathDisabled:
		return "the pod's ambpf.io/fastpath annotation says " + agentapi.FastPathDisabled
	case st.FastPath != agentapi.FastPathEnabled && a.cfg.FastPathOptIn:
		return "the node's default is " + agentapi.FastPathDisabled + " (--fastpath-default) and the pod's ambpf.io/fastpath annotation does not say " + agentapi.FastPathEnabled
	}
	return ""
}

// attachFastPath gives an attached pod the fast path, or takes it away
// when the pod is not to have it (its choice changed); idempotent.
func (a *Agent) attachFastPath(st agentapi.PodState) {
	if a.fp == nil {
		return
	}
	log := a.podLog(st)
	if why := a.fastPathOff(st); why != "" {
		err := a.detachFastPath(st.UID)
		if err != nil {
			log.Warn("fast path: detach from a pod that is not to have it", "err", err)
		}
		a.setFastPathErr(st.UID, err)
		return
	}
	if st.Cgroup == "" {
		log.Info("fast path skipped: the pod has no cgroup")
		a.setFastPathErr(st.UID, errors.New("the pod has no cgroup"))
		return
	}
	dp, err := a.dp.Get(st.UID)
	if err == nil {
		err = a.fp.AttachPod(st.UID, dp.Index, st.Cgroup, a.cfg.FastPath)
	}
	if err != nil {
		log.Warn("fast path not attached: the pod keeps the TCP leg", "err", err)
	}
	a.setFastPathErr(st.UID, err)
}

func (a *Agent) setFastPathErr(uid string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err == nil {
		delete(a.fpErrs, uid)
	} else {
		a.fpErrs[uid] = err.Error()
	}
}

// detachFastPath removes a pod's fast path (a no-op without one).
func (a *Agent) detachFastPath(uid string) error {
	a.setFastPathErr(uid, nil)
	if a.fp == nil {
		return nil
	}
	return a.fp.DetachPod(uid)
}

// reconcileFastPath brings the fast path in line with the pods: attached
// to every pod (and trusted proxy cgroup) the agent has, and to nothing
// else. Without the fast path, what an earlier run left is removed: its
// programs would go on redirecting the pods' new connections while the
// proxy, told of no fast path, splices (and loses the redirected bytes).
func (a *Agent) reconcileFastPath() {
	if a.fp == nil {
		a.removeLeftFastPath()
		return
	}
	if err := a.fp.Verify(); err != nil {
		a.log.Warn("fast path: load or upgrade the node's programs", "err", err)
	}
	a.mu.Lock()
	pods := make(map[string]agentapi.PodState, len(a.pods))
	for uid, p := range a.pods {
		pods[uid] = p
	}
	a.mu.Unlock()
	if uids, err := a.fp.Pods(); err == nil {
		for _, uid := range uids {
			if _, ok := pods[uid]; !ok {
				if err := a.fp.DetachPod(uid); err != nil {
					a.log.Warn("fast path: detach a pod the agent does not have", "uid", uid, "err", err)
				}
			}
		}
	}
	for _, p := range pods {
		a.attachFastPath(p)
	}
}

// attachFastPathProxy gives a trusted proxy cgroup the proxy program.
func (a *Agent) attachFastPathProxy(dir string) {
	if a.fp == nil {
		return
	}
	if err := a.fp.AttachProxy(dir); err != nil {
		a.log.Warn("fast path not attached to the proxy's cgroup: the in-pod leg stays on TCP", "cgroup", dir, "err", err)
	}
}

// forgetFastPathProxy removes the proxy program from a forgotten cgroup.
func (a *Agent) forgetFastPathProxy(id uint64) {
	if a.fp == nil {
		return
	}
	if err := a.fp.DetachProxy(id); err != nil {
		a.log.Warn("fast path: detach from a forgotten proxy cgroup", "cgroup_id", id, "err", err)
	}
}

// fastPathStatus is what inspect shows of a pod's fast path.
func (a *Agent) fastPathStatus(uid string) *dpstate.FastPath {
	if a.cfg.FastPath == "" || a.cfg.FastPath == fastpath.Off {
		return nil
	}
	out := &dpstate.FastPath{Mode: string(a.cfg.FastPath)}
	if a.fp == nil {
		out.Error = a.fpUnavailable
		return out
	}
	st, err := a.fp.PodStatus(uid)
	if err == nil {
		out = &st
	}
	a.mu.Lock()
	out.Error = a.fpErrs[uid]
	pod := a.pods[uid]
	a.mu.Unlock()
	if out.Disabled = a.fastPathOff(pod); out.Disabled != "" && errors.Is(err, fastpath.ErrNotAttached) {
		return out // off by choice: not attached is no error
	}
	if err != nil && out.Error == "" {
		out.Error = err.Error()
	}
	return out
}

// removeLeftFastPath removes the fast path an earlier run with it left
// behind (an agent started without it); nothing there, nothing to do.
func (a *Agent) removeLeftFastPath() {
	if _, err := os.Stat(filepath.Join(a.cfg.BPFRoot, fastpath.Dir)); err != nil {
		return
	}
	l, err := fastpath.New(fastpath.Config{Root: a.cfg.BPFRoot, Logger: a.cfg.Logger})
	if err == nil {
		err = removeFastPath(l)
	}
	if err != nil {
		a.log.Warn("fast path off, but what an earlier run attached could not be removed", "err", err)
		return
	}
	a.log.Info("fast path off: what an earlier run attached is removed")
}

// removeFastPath detaches l's fast path from every pod and proxy cgroup
// it is still attached to and removes its node-wide pins (an uninstall,
// or an agent started without the fast path).
func removeFastPath(l *fastpath.Loader) error {
	var errs []error
	pods, err := l.Pods()
	errs = append(errs, err)
	for _, uid := range pods {
		errs = append(errs, l.DetachPod(uid))
	}
	proxies, err := l.Proxies()
	errs = append(errs, err)
	for _, id := range proxies {
		errs = append(errs, l.DetachProxy(id))
	}
	errs = append(errs, l.RemoveNodeState())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("fast path: %w", err)
	}
	return nil
}
